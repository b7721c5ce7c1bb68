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

// Inside Do on a Locker on one connection, a Lock of the same Locker taken
// with the function's context nests on the connection (here a Session lock
// inside a Transaction-scope Do, whose transaction keeps the connection);
// another goroutine's acquire waits for the connection until its context
// ends, TryAcquire too.
func TestLockerOnOneConnNesting(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	conn := faultConnect(t)
	watch := pgtest.Pool(t, 2)
	lk, err := pglock.NewLocker(conn)
	if err != nil {
		t.Fatal(err)
	}
	outer, _ := lk.Lock(pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction))
	inner, _ := lk.Lock(pgtest.UniqueKey(t))
	other, _ := lk.Lock(pgtest.UniqueKey(t))
	err = outer.Do(ctx, func(ctx context.Context) error {
		tx, ok := pglock.TxFromContext(ctx)
		if !ok {
			return errors.New("no transaction in Do's context")
		}
		var one int
		if err := tx.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
			return err
		}
		nctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if err := inner.Acquire(nctx); err != nil {
			return fmt.Errorf("nested Acquire: %w", err)
		}
		if len(pgtest.Granted(t, watch, inner.Key())) != 1 {
			return errors.New("nested lock not in pg_locks")
		}
		if err := inner.Release(ctx); err != nil {
			return fmt.Errorf("nested Release: %w", err)
		}
		// Another goroutine (no nesting context) waits for the connection.
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
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// With the connection free again, the other goroutine gets it.
	if ok, err := other.TryAcquire(ctx); !ok || err != nil {
		t.Fatalf("TryAcquire after Do = %v, %v", ok, err)
	}
	if err := other.Release(ctx); err != nil {
		t.Fatal(err)
	}
	for _, l := range []*pglock.Lock{outer, inner, other} {
		pgtest.WaitFree(t, watch, l.Key())
	}
}
