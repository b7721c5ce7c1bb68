package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// A Locker on one *pgx.Conn whose Do functions use that connection, from
// several goroutines: the holds take turns on the connection, so the work's
// queries never meet another goroutine's lock statements (pgx would report
// "conn busy", and -race a data race).
func TestLockerOnOneConnWorkUsesConn(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	conn := faultConnect(t)
	watch := pgtest.Pool(t, 2)
	lk, err := pglock.NewLocker(conn)
	if err != nil {
		t.Fatal(err)
	}
	base := pgtest.UniqueKey(t)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 20 {
				err := lk.Do(ctx, fmt.Sprintf("%s:%d:%d", base, g, i), func(ctx context.Context) error {
					_, err := conn.Exec(ctx, "SELECT pg_sleep(0.002)")
					return err
				})
				if err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	var n int
	if err := watch.QueryRow(ctx, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1", conn.PgConn().PID()).Scan(&n); err != nil || n != 0 {
		t.Fatalf("%d advisory locks left on the connection (err %v)", n, err)
	}
}

// A Locker on one connection holds one lock at a time: inside a
// Transaction-scope Do, an acquire of another key (with the function's
// context, or from another goroutine, TryAcquire too) waits for the
// connection until its context ends, and breaks nothing: the outer
// transaction still holds its lock and commits its work. (Nesting would send
// a second BEGIN into the outer transaction, whose COMMIT would then end the
// outer lock early.)
func TestLockerOnOneConnOneHoldAtATime(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	conn := faultConnect(t)
	watch := pgtest.Pool(t, 2)
	lk, err := pglock.NewLocker(conn, pglock.WithScope(pglock.Transaction))
	if err != nil {
		t.Fatal(err)
	}
	outer, _ := lk.NewLock(pgtest.UniqueKey(t))
	inner, _ := lk.NewLock(pgtest.UniqueKey(t))
	other, _ := lk.NewLock(pgtest.UniqueKey(t), pglock.WithScope(pglock.Session))
	table := "pglock_one_hold_" + randomSuffix()
	err = outer.Do(ctx, func(ctx context.Context) error {
		tx, ok := pglock.TxFromContext(ctx)
		if !ok {
			return errors.New("no transaction in Do's context")
		}
		if _, err := tx.Exec(ctx, "CREATE TEMP TABLE "+table+" (v int)"); err != nil {
			return err
		}
		nctx, cancel := context.WithTimeout(ctx, 150*time.Millisecond)
		defer cancel()
		if err := inner.Do(nctx, func(context.Context) error { return nil }); !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, pglock.ErrNotAcquired) {
			return fmt.Errorf("nested Do while the connection is held = %v, want a deadline", err)
		}
		res := make(chan error, 1)
		go func() {
			octx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
			defer cancel()
			_, err := other.TryAcquire(octx)
			res <- err
		}()
		if err := <-res; !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, pglock.ErrNotAcquired) {
			return fmt.Errorf("TryAcquire from another goroutine while the connection is held = %v, want a deadline", err)
		}
		if len(pgtest.Granted(t, watch, outer.Key())) != 1 {
			return errors.New("the outer lock is no longer held")
		}
		_, err := tx.Exec(ctx, "INSERT INTO "+table+" VALUES (1)")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	// With the connection free again, the others get it.
	if ok, err := other.TryAcquire(ctx); !ok || err != nil {
		t.Fatalf("TryAcquire after Do = %v, %v", ok, err)
	}
	if err := other.Release(ctx); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM "+table).Scan(&n); err != nil || n != 1 {
		t.Fatalf("the outer transaction's work: %d rows (err %v), want 1", n, err)
	}
	for _, l := range []*pglock.Lock{outer, inner, other} {
		pgtest.WaitFree(t, watch, l.Key())
	}
}
