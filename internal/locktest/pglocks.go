package locktest

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// WaitFor polls cond every 10 ms until it holds, and fails the test after
// 10 s; what says what was awaited.
func WaitFor(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Key returns the pglock.Key that lk locks for name (after lk's namespace).
func Key(tb testing.TB, lk *pglock.Locker, name string) pglock.Key {
	tb.Helper()
	k, err := lk.Key(name)
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

// Waiters returns how many sessions wait for key (in pg_locks, not granted),
// read through watch, a pool other than the ones under test.
func Waiters(tb testing.TB, watch *pgxpool.Pool, key pglock.Key) int {
	tb.Helper()
	hs, err := pgtest.Holders(context.Background(), watch, key)
	if err != nil {
		tb.Fatal(err)
	}
	n := 0
	for _, h := range hs {
		if !h.Granted {
			n++
		}
	}
	return n
}

// NoConnsLeft waits until every pool has all its connections back, and
// fails the test if one keeps a connection acquired for 10 s.
func NoConnsLeft(tb testing.TB, pools ...*pgxpool.Pool) {
	tb.Helper()
	for _, p := range pools {
		WaitFor(tb, "pool connections to be released", func() bool { return p.Stat().AcquiredConns() == 0 })
	}
}

// HoldElsewhere takes key in Session scope on a pool of its own, as another
// replica would, and returns the lock; it is released when the test ends
// if the test did not release it.
func HoldElsewhere(tb testing.TB, key pglock.Key) *pglock.Lock {
	tb.Helper()
	l, err := pglock.NewLock(pgtest.Pool(tb, 1), key)
	if err != nil {
		tb.Fatal(err)
	}
	if err := l.Acquire(context.Background()); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = l.Release(context.Background()) })
	return l
}
