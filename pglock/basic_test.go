package pglock_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

func TestSessionAcquireRelease(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	watch := pgtest.Pool(t, 2)
	l, err := pglock.NewLock(pool, pgtest.UniqueKey(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if got := pgtest.Granted(t, watch, l.Key()); len(got) != 1 || got[0].Mode != "ExclusiveLock" {
		t.Fatalf("pg_locks while held = %+v", got)
	}
	if err := l.Acquire(ctx); !errors.Is(err, pglock.ErrAlreadyHeld) {
		t.Fatalf("second Acquire = %v, want ErrAlreadyHeld", err)
	}
	other, _ := pglock.NewLock(pool, l.Key())
	ok, err := other.TryAcquire(ctx)
	if err != nil || ok {
		t.Fatalf("TryAcquire while held = %v, %v", ok, err)
	}
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = other.Acquire(short)
	if !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Acquire past deadline = %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Acquire took %v after its deadline", d)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatalf("second Release = %v", err)
	}
	pgtest.WaitFree(t, watch, l.Key())
	if s := pool.Stat(); s.AcquiredConns() != 0 {
		t.Fatalf("pool has %d acquired conns after release", s.AcquiredConns())
	}
}
