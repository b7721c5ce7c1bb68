package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Issue 20, item 3: locks stacked on a caller's own connection or
// transaction are guarded too. On a throwaway server (a lock table of 2,560
// slots, about 5,000 in fact), NewLock on one caller-owned session takes keys
// until refused: it stops near three quarters of the table with
// ErrTooManyLocks (naming the server's figures), never with "out of shared
// memory", and a bystander session can still create a table and new
// connections can still be opened while the stack is at its peak. Every
// acquire that returned nil is held until released; nothing is left.
func TestGuardCountsCallerOwnedSessions(t *testing.T) {
	srv := pgtest.ThrowawayT(t, map[string]string{"max_locks_per_transaction": "64", "max_connections": "40"})
	const capacity, tries = 64 * 40, 7000
	bg := context.Background()
	connect := func() *pgx.Conn {
		c, err := pgx.Connect(bg, srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	bystander := connect()
	defer bystander.Close(bg)
	watch := connect()
	defer watch.Close(bg)
	pool, err := pgxpool.New(bg, srv.URL+"&pool_max_conns=2")
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()

	cases := []struct {
		name string
		// open returns what NewLock gets, the options, and how to end it.
		open func(t *testing.T) (conn any, opts []pglock.Option, end func())
	}{
		{"pgx.Conn", func(t *testing.T) (any, []pglock.Option, func()) {
			c := connect()
			return c, nil, func() { _ = c.Close(bg) }
		}},
		{"pgxpool.Conn", func(t *testing.T) (any, []pglock.Option, func()) {
			pc, err := pool.Acquire(bg)
			if err != nil {
				t.Fatal(err)
			}
			return pc, nil, func() { _ = pc.Conn().Close(bg); pc.Release() }
		}},
		{"pgx.Tx", func(t *testing.T) (any, []pglock.Option, func()) {
			c := connect()
			tx, err := c.Begin(bg)
			if err != nil {
				t.Fatal(err)
			}
			return tx, nil, func() { _ = tx.Rollback(bg); _ = c.Close(bg) }
		}},
		{"sql.Conn", func(t *testing.T) (any, []pglock.Option, func()) {
			cfg, err := pgx.ParseConfig(srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			db := stdlib.OpenDB(*cfg)
			c, err := db.Conn(bg)
			if err != nil {
				t.Fatal(err)
			}
			return c, nil, func() { _ = c.Close(); _ = db.Close() }
		}},
		{"sql.Tx", func(t *testing.T) (any, []pglock.Option, func()) {
			cfg, err := pgx.ParseConfig(srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			db := stdlib.OpenDB(*cfg)
			tx, err := db.BeginTx(bg, nil)
			if err != nil {
				t.Fatal(err)
			}
			return tx, nil, func() { _ = tx.Rollback(); _ = db.Close() }
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			conn, opts, end := tc.open(t)
			var held []*pglock.Lock
			var refusal error
			for i := range tries {
				l, err := pglock.NewLock(conn, fmt.Sprintf("stack-%s-%d", tc.name, i), opts...)
				if err != nil {
					t.Fatal(err)
				}
				if err := l.Acquire(bg); err != nil {
					refusal = err
					break
				}
				held = append(held, l)
			}
			// The table is at its peak: a bystander must still work.
			if _, err := bystander.Exec(bg, "BEGIN; CREATE TEMP TABLE bystander (i int); ROLLBACK"); err != nil {
				t.Errorf("INVARIANT innocent-session-unharmed: with %d locks stacked, the bystander's CREATE TABLE: %v", len(held), err)
				_, _ = bystander.Exec(bg, "ROLLBACK")
			}
			if c, err := pgx.Connect(bg, srv.URL); err != nil {
				t.Errorf("INVARIANT innocent-session-unharmed: with %d locks stacked, a new connection: %v", len(held), err)
			} else {
				_ = c.Close(bg)
			}
			t.Logf("%s: %d locks stacked on one session; refusal: %v", tc.name, len(held), refusal)
			var pgErr *pgconn.PgError
			switch {
			case refusal == nil:
				t.Errorf("%d locks stacked on one session without a refusal", tries)
			case errors.As(refusal, &pgErr) && pgErr.Code == "53200":
				t.Errorf("the stack was stopped by the server running out of shared memory: %v", refusal)
			case !errors.Is(refusal, pglock.ErrTooManyLocks) || !errors.Is(refusal, pglock.ErrNotAcquired):
				t.Errorf("refusal = %v, want ErrNotAcquired and ErrTooManyLocks", refusal)
			}
			if limit := capacity*3/4 + capacity/64; len(held) > limit {
				t.Errorf("INVARIANT server-wide-guard: %d locks stacked, want at most %d (3/4 of the %d-slot table, and the guard's overshoot)", len(held), limit, capacity)
			}
			var granted int
			if err := watch.QueryRow(bg, `SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted`).Scan(&granted); err != nil {
				t.Fatal(err)
			}
			if granted != len(held) {
				t.Errorf("INVARIANT nil-means-held: pg_locks holds %d advisory locks, %d acquires returned nil", granted, len(held))
			}
			for _, l := range held {
				if err := l.Release(bg); err != nil {
					t.Fatalf("Release: %v", err)
				}
			}
			end()
			waitNoAdvisory(t, watch)
		})
	}
}

// waitNoAdvisory waits until the server holds no advisory lock (a closed
// session's locks go when its backend has ended).
func waitNoAdvisory(t *testing.T, watch *pgx.Conn) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int
		if err := watch.QueryRow(context.Background(), `SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d advisory locks left", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
