package pglock_test

import (
	"context"
	"testing"
	"time"

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
	l, err := pglock.NewLock(pool, pgtest.UniqueKey(t))
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

// Item 2: when the unlock's outcome is unknown (the network went silent
// under it), Release reports it and the pooled connection is destroyed,
// never handed out again; the server drops the lock with the session.
func TestPoolDestroysConnectionWhenUnlockOutcomeUnknown(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	proxy, pool := faultProxyPool(t, 2)
	watch := pgtest.Pool(t, 2)
	l, err := pglock.NewLock(pool, pgtest.UniqueKey(t),
		pglock.WithReleaseTimeout(300*time.Millisecond), pglock.WithLostCheckInterval(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	holder := pgtest.Granted(t, watch, l.Key())[0].PID

	proxy.Blackhole()
	start := time.Now()
	err = l.Release(ctx)
	if err == nil {
		t.Fatal("Release through a silent network reported success")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("Release took %v; the release timeout is 300ms", d)
	}
	if s := pool.Stat(); s.AcquiredConns() != 0 || s.TotalConns() != 0 {
		t.Fatalf("pool after a failed unlock: %d acquired, %d total; want the connection destroyed",
			s.AcquiredConns(), s.TotalConns())
	}
	proxy.Restore()
	pgtest.WaitFree(t, watch, l.Key())

	// The pool works on with a new connection, not the one in doubt.
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if pid := pgtest.Granted(t, watch, l.Key())[0].PID; pid == holder {
		t.Fatal("the destroyed connection was reused")
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, l.Key())
}

// database/sql runs Commit and Rollback under the transaction's context, not
// the caller's: the lock's own transaction must still end within the release
// timeout when the network goes silent.
func TestSQLTransactionReleaseIsBounded(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	proxy, db := faultProxySQLDB(t, 1)
	l, err := pglock.NewLock(db, pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction),
		pglock.WithReleaseTimeout(500*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	proxy.Blackhole()
	defer proxy.Restore()
	start := time.Now()
	if err := l.Release(ctx); err == nil {
		t.Fatal("a commit through a silent network reported success")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("Release took %v; the release timeout is 500ms", d)
	}
}
