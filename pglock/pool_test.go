package pglock_test

import (
	"context"
	"testing"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Item 2: a session lock on a pool pins one connection for its whole life;
// after Release the connection goes back to the pool holding no advisory
// lock.
func TestPoolPinsOneConnection(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	watch := pgtest.Pool(t, 2)
	l, err := pglock.New(pool, pgtest.UniqueKey(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if n := pool.Stat().AcquiredConns(); n != 1 {
		t.Fatalf("held: %d acquired connections, want 1 pinned", n)
	}
	h := pgtest.Granted(t, watch, l.Key())
	if len(h) != 1 {
		t.Fatalf("pg_locks = %+v", h)
	}
	holder := h[0].PID
	// The pinned connection is not handed to anyone else while held.
	for range 3 {
		var pid int32
		if err := pool.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
			t.Fatal(err)
		}
		if pid == holder {
			t.Fatal("the pool handed out the pinned connection while the lock was held")
		}
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if n := pool.Stat().AcquiredConns(); n != 0 {
		t.Fatalf("released: %d acquired connections", n)
	}
	// The connection is back in the pool, alive, and holds no advisory lock.
	var locks int
	err = watch.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1`, holder).Scan(&locks)
	if err != nil || locks != 0 {
		t.Fatalf("connection %d holds %d advisory locks after release (err %v)", holder, locks, err)
	}
	var alive bool
	if err := watch.QueryRow(ctx, `SELECT EXISTS(SELECT 1 FROM pg_stat_activity WHERE pid = $1)`, holder).Scan(&alive); err != nil || !alive {
		t.Fatalf("healthy connection %d was destroyed instead of returned (err %v)", holder, err)
	}
}
