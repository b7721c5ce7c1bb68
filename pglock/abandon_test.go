package pglock_test

// The proof of issue 12, item 2: the server ends the session of a lock
// connection whose client went silent within pglock.AbandonedSessionTimeout,
// so its locks go to another replica in that bound, and never before the
// holder has seen the loss; without the session bounds that a Locker sets,
// the server keeps the lock.

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// abandonSlack is what B's grant may take past the abandoned-session bound,
// measured from the start of the blackhole. The bound itself needs none:
//
//   - idle_session_timeout (PostgreSQL 14 and later) is the bound, in
//     milliseconds, from when the backend went idle after the last statement
//     it received. The holder's watch pings every check interval; the last
//     ping that reaches the server left before the blackhole (the proxy may
//     still pass a chunk it was writing then) and runs in well under a
//     millisecond, so the server's timer starts by the blackhole's start.
//   - Server-side keepalives (tcp_keepalives_idle = bound/2, then probes 1 s
//     apart, reset after 2 unanswered): Linux resets the connection bound/2 +
//     2 x 1 s after the last segment from the client, 5 s for the 6 s bound,
//     inside it for any bound of 4 s or more (the bound is at least 6 s).
//     Through this loopback proxy they never fire: the proxy's kernel answers
//     the probes, as a middlebox that keeps TCP open would, so here
//     idle_session_timeout ends the session.
//
// What is left is the backend's exit (its locks are released as it exits),
// the wake-up of B's backend queued for the key, B's answer over loopback and
// the goroutine's scheduling: milliseconds, but under -race with the
// package's parallel tests on one server a few hundred at worst.
const abandonSlack = 500 * time.Millisecond

// TestAbandonedSessionFreedWithinBound: Locker A holds key K on a lock
// connection through a fault proxy; the network goes silent (blackhole, not
// restored during the check). A sees the loss within two check intervals;
// Locker B, on a direct pool, waiting for K from the blackhole on, gets it
// after A's Lost() closed and within the abandoned-session bound plus
// abandonSlack of the blackhole, because the server ended A's session.
//
// Control, blackholed at the same moment: a plain *pgx.Conn holding key KC
// with pg_advisory_lock, with the server's default session settings
// (keepalives after about 2 h, no idle_session_timeout). After the same
// bound and slack, pg_locks still shows its session holding KC: the server
// would keep it for hours. It is then ended with pg_terminate_backend.
func TestAbandonedSessionFreedWithinBound(t *testing.T) {
	t.Parallel()
	const interval = 200 * time.Millisecond
	bound := max(pglock.AbandonedSessionTimeout, 4*interval) // as the Locker computes it
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	if v := abandonServerVersion(t, watch); v < 140000 {
		// Through the proxy only idle_session_timeout can end the session
		// (see abandonSlack), and it exists from PostgreSQL 14 on.
		t.Skipf("server_version_num %d: idle_session_timeout needs PostgreSQL 14", v)
	}

	// A: a Locker whose lock connections go through the proxy.
	proxyA, poolA := faultProxyPool(t, 2)
	t.Cleanup(proxyA.Restore) // runs before the pool and the proxy close
	lkA := muxLocker(t, poolA, pglock.WithLostCheckInterval(interval))
	names, keys := muxKeys(t, lkA, 2)
	key, controlKey := keys[0], keys[1]
	la, err := lkA.NewLock(names[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := la.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	hs := pgtest.Granted(t, watch, key)
	if len(hs) != 1 {
		t.Fatalf("pg_locks of K while A holds it = %+v, want one holder", hs)
	}
	pidA := hs[0].PID

	// B: a second Locker (another replica), on a direct pool.
	lkB := muxLocker(t, pgtest.Pool(t, 2))
	lb, err := lkB.NewLock(names[0])
	if err != nil {
		t.Fatal(err)
	}

	// The control: a plain connection through another proxy, no library.
	cfg, err := pgx.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	proxyC := faultProxy(t, cfg)
	t.Cleanup(proxyC.Restore)
	control, err := pgx.ConnectConfig(bg, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(bg, time.Second)
		defer cancel()
		_ = control.Close(ctx)
	})
	var pidC int32
	var keepIdle, idleTimeout string
	if err := control.QueryRow(bg, `SELECT pg_backend_pid(), current_setting('tcp_keepalives_idle'),
		current_setting('idle_session_timeout'), pg_advisory_lock($1::bigint)::text`, controlKey.Int64()).
		Scan(&pidC, &keepIdle, &idleTimeout, new(string)); err != nil {
		t.Fatal(err)
	}
	if hs := pgtest.Granted(t, watch, controlKey); len(hs) != 1 || hs[0].PID != pidC {
		t.Fatalf("pg_locks of KC = %+v, want the control session %d", hs, pidC)
	}

	time.Sleep(100 * time.Millisecond) // A's watch is running (it starts 50 ms into a hold)

	start := time.Now()
	proxyA.Blackhole()
	proxyC.Blackhole()

	type grant struct {
		at  time.Time
		err error
	}
	granted := make(chan grant, 1)
	bctx, bcancel := context.WithTimeout(bg, pglock.AbandonedSessionTimeout+10*time.Second)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer bcancel() // before the Wait: a failed test does not wait for B's context
	wg.Go(func() {
		err := lb.Acquire(bctx)
		granted <- grant{time.Now(), err}
	})

	var lostAt time.Time
	select {
	case <-la.Lost():
		lostAt = time.Now()
	case <-time.After(2*interval + time.Second):
		t.Fatalf("A's Lost() not closed %v after the blackhole", time.Since(start))
	}
	g := <-granted
	if g.err != nil {
		t.Fatalf("B's Acquire of the abandoned key: %v after %v", g.err, g.at.Sub(start))
	}
	seen, freed := lostAt.Sub(start), g.at.Sub(start)
	t.Logf("blackhole: A saw the loss after %v (2 x check %v = %v); B got K after %v (bound %v + slack %v = %v)",
		seen.Round(time.Millisecond), interval, 2*interval,
		freed.Round(time.Millisecond), bound, abandonSlack, bound+abandonSlack)
	if !g.at.After(lostAt) {
		t.Errorf("B got K (%v) before A's Lost() closed (%v): two holders at once", freed, seen)
	}
	if freed > bound+abandonSlack {
		t.Errorf("B got K %v after the blackhole, want within %v + %v", freed, bound, abandonSlack)
	}
	if h := pgtest.Granted(t, watch, key); len(h) != 1 || h[0].PID == pidA {
		t.Errorf("pg_locks of K after B's grant = %+v, want one holder, not A's session %d", h, pidA)
	}
	// The server ended A's session (the lock did not just go): it leaves
	// pg_stat_activity a moment after its locks.
	if !abandonBackendGone(t, watch, pidA, time.Second) {
		t.Errorf("A's session %d is still alive after B got K", pidA)
	}

	// The control, blackholed as long as A and then some: still held.
	time.Sleep(time.Until(start.Add(bound + abandonSlack)))
	held := time.Since(start)
	hs = pgtest.Granted(t, watch, controlKey)
	t.Logf("control (tcp_keepalives_idle %s s, idle_session_timeout %s): after %v pg_locks of KC = %+v (session %d)",
		keepIdle, idleTimeout, held.Round(time.Millisecond), hs, pidC)
	if len(hs) != 1 || hs[0].PID != pidC {
		t.Errorf("without session bounds the server freed KC within %v (pg_locks %+v), want it still held by %d", held, hs, pidC)
	}

	if err := lb.Release(bg); err != nil {
		t.Errorf("B's Release: %v", err)
	}
	if err := la.Release(bg); !errors.Is(err, pglock.ErrLockLost) {
		t.Errorf("A's Release after the loss = %v, want ErrLockLost", err)
	}
	pgtest.Terminate(t, watch, pidC)
	proxyC.Restore()
	proxyA.Restore()
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}
	if rows := proofRows(t, watch, keys); len(rows) != 0 {
		t.Errorf("pg_locks still has %d rows of the keys at the end, e.g. %+v", len(rows), rows[0])
	}
}

func abandonServerVersion(t *testing.T, db *pgxpool.Pool) int {
	t.Helper()
	var v int
	if err := db.QueryRow(context.Background(), "SELECT current_setting('server_version_num')::int").Scan(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

// abandonBackendGone waits up to within for backend pid to leave
// pg_stat_activity, and reports whether it did.
func abandonBackendGone(t *testing.T, db *pgxpool.Pool, pid int32, within time.Duration) bool {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		var alive bool
		if err := db.QueryRow(context.Background(),
			"SELECT EXISTS (SELECT FROM pg_catalog.pg_stat_activity WHERE pid = $1)", pid).Scan(&alive); err != nil {
			t.Fatal(err)
		}
		if !alive {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}
