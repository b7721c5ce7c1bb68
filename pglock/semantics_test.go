package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// opener makes a fresh connection value of one supported kind for a test.
type opener struct {
	name string
	open func(t *testing.T) any
}

func openSQLDB(t *testing.T) *sql.DB {
	t.Helper()
	db, err := sql.Open("pgx", pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(4)
	t.Cleanup(func() { db.Close() })
	return db
}

func openPgxConn(t *testing.T) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

var openers = []opener{
	{"pgxpool.Pool", func(t *testing.T) any { return pgtest.Pool(t, 4) }},
	{"pgx.Conn", func(t *testing.T) any { return openPgxConn(t) }},
	{"pgxpool.Conn", func(t *testing.T) any {
		c, err := pgtest.Pool(t, 2).Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Release)
		return c
	}},
	{"sql.DB", func(t *testing.T) any { return openSQLDB(t) }},
	{"sql.Conn", func(t *testing.T) any {
		c, err := openSQLDB(t).Conn(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}},
}

// Item 1: exclusive excludes exclusive and shared; shared admits shared; in
// both scopes; on every kind of connection, checked in pg_locks.
func TestModesExclude(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	for _, o := range openers {
		for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
			t.Run(fmt.Sprintf("%s/%s", o.name, scope), func(t *testing.T) {
				t.Parallel()
				ctx := context.Background()
				key := pgtest.UniqueKey(t)
				a, b := o.open(t), o.open(t)
				mk := func(conn any, m pglock.Mode) *pglock.Lock {
					l, err := pglock.NewLock(conn, key, pglock.WithScope(scope), pglock.WithMode(m))
					if err != nil {
						t.Fatal(err)
					}
					return l
				}
				try := func(l *pglock.Lock) bool {
					ok, err := l.TryAcquire(ctx)
					if err != nil {
						t.Fatal(err)
					}
					return ok
				}
				release := func(l *pglock.Lock) {
					if err := l.Release(ctx); err != nil {
						t.Fatal(err)
					}
				}

				ex := mk(a, pglock.Exclusive)
				if !try(ex) {
					t.Fatal("exclusive on a free key: busy")
				}
				if h := pgtest.Granted(t, watch, ex.Key()); len(h) != 1 || h[0].Mode != "ExclusiveLock" {
					t.Fatalf("pg_locks = %+v, want one ExclusiveLock", h)
				}
				if try(mk(b, pglock.Exclusive)) {
					t.Fatal("exclusive admitted a second exclusive holder")
				}
				if try(mk(b, pglock.Shared)) {
					t.Fatal("exclusive admitted a shared holder")
				}
				release(ex)
				pgtest.WaitFree(t, watch, ex.Key())

				sh1, sh2 := mk(a, pglock.Shared), mk(b, pglock.Shared)
				if !try(sh1) || !try(sh2) {
					t.Fatal("shared did not admit shared")
				}
				if h := pgtest.Granted(t, watch, sh1.Key()); len(h) != 2 || h[0].Mode != "ShareLock" {
					t.Fatalf("pg_locks = %+v, want two ShareLock holders", h)
				}
				c := o.open(t)
				if try(mk(c, pglock.Exclusive)) {
					t.Fatal("shared admitted an exclusive holder")
				}
				release(sh1)
				release(sh2)
				pgtest.WaitFree(t, watch, sh1.Key())
			})
		}
	}
}

// A blocked Acquire is granted as soon as the holder releases, on every kind
// of connection and in both scopes; a wait that times out leaves nothing held.
func TestWaitIsGrantedOnRelease(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	for _, o := range openers {
		for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
			t.Run(fmt.Sprintf("%s/%s", o.name, scope), func(t *testing.T) {
				t.Parallel()
				ctx := context.Background()
				key := pgtest.UniqueKey(t)
				holder, _ := pglock.NewLock(o.open(t), key, pglock.WithScope(scope))
				waiter, _ := pglock.NewLock(o.open(t), key, pglock.WithScope(scope))
				if err := holder.Acquire(ctx); err != nil {
					t.Fatal(err)
				}
				short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
				err := waiter.Acquire(short)
				cancel()
				if !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("Acquire past deadline = %v", err)
				}
				if h := pgtest.Granted(t, watch, holder.Key()); len(h) != 1 {
					t.Fatalf("after the timed-out wait: pg_locks = %+v, want the holder only", h)
				}
				got := make(chan error, 1)
				go func() { got <- waiter.Acquire(ctx) }()
				time.Sleep(150 * time.Millisecond)
				released := time.Now()
				if err := holder.Release(ctx); err != nil {
					t.Fatal(err)
				}
				select {
				case err := <-got:
					if err != nil {
						t.Fatal(err)
					}
				case <-time.After(5 * time.Second):
					t.Fatal("waiter not granted 5 s after release")
				}
				if d := time.Since(released); d > 2*time.Second {
					t.Errorf("granted %v after release", d)
				}
				if err := waiter.Release(ctx); err != nil {
					t.Fatal(err)
				}
				pgtest.WaitFree(t, watch, holder.Key())
			})
		}
	}
}
