package pglock_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// A session the Locker closes is gone from the server when the close
// returns: after Locker.Close, the keys it held are free at once for
// another session (no wait for the server to notice), and none of its
// sessions is left in pg_stat_activity. This is what makes the session
// budget exact as the server counts it (a waiting connection given up is
// gone before its place is taken again; see TestLockerSessionsBoundedByLockAndWaitConns)
// and what lets another process take a closed Locker's keys at once.
func TestCloseEndsTheServerSessions(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	const rounds = 20
	late := 0
	for r := range rounds {
		app := "pglock-close-" + randomSuffix()
		cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
		if err != nil {
			t.Fatal(err)
		}
		cfg.ConnConfig.RuntimeParams["application_name"] = app
		pool, err := pgxpool.NewWithConfig(bg, cfg)
		if err != nil {
			t.Fatal(err)
		}
		lk, err := pglock.NewLocker(pool)
		if err != nil {
			t.Fatal(err)
		}
		l, err := lk.NewLock(pgtest.UniqueKey(t))
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Acquire(bg); err != nil {
			t.Fatal(err)
		}
		if err := lk.Close(); err != nil {
			t.Fatal(err)
		}
		var sessions int
		if err := watch.QueryRow(bg, `SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1 AND backend_type = 'client backend'`, app).Scan(&sessions); err != nil {
			t.Fatal(err)
		}
		sessions -= int(pool.Stat().TotalConns())
		var free bool
		if err := watch.QueryRow(bg, `SELECT pg_try_advisory_lock($1) AND pg_advisory_unlock($1)`, l.Key().Int64()).Scan(&free); err != nil {
			t.Fatal(err)
		}
		if sessions != 0 || !free {
			late++
			t.Errorf("round %d: just after Close, %d of the Locker's sessions in pg_stat_activity, its key free: %v", r, sessions, free)
		}
		pool.Close()
	}
	if late > 0 {
		t.Errorf("%d of %d Closes returned before the server ended their sessions", late, rounds)
	}
}

// Close on a silent network (a blackholed proxy, before the watches see
// it) does not wait for the server once per connection: it ends the
// Locker's sessions side by side, within about one bound of endSession (a
// second), not one per lock connection. (A wait under way on such a network
// is another matter: its cancel request is bounded by the release timeout.)
func TestCloseOnASilentNetwork(t *testing.T) {
	t.Parallel()
	const conns = 4
	bg := context.Background()
	proxy, pool := faultProxyPool(t, 4)
	lk, err := pglock.NewLocker(pool, pglock.WithLockConns(conns), pglock.WithLostCheckInterval(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	// Keys held on every lock connection: tries at once, so that some find
	// their home busy and open another.
	for i := 0; lk.Stats().LockConns < conns; i++ {
		if i > 100 {
			t.Fatalf("the Locker opened %d lock connections, want %d", lk.Stats().LockConns, conns)
		}
		var wg sync.WaitGroup
		for j := range 8 {
			l, err := lk.NewLock(fmt.Sprintf("%s-%d-%d", pgtest.UniqueKey(t), i, j))
			if err != nil {
				t.Fatal(err)
			}
			wg.Go(func() {
				if err := l.Acquire(bg); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
	}
	proxy.Blackhole()
	start := time.Now()
	if err := lk.Close(); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	t.Logf("Close of %d lock connections on a silent network took %v", conns, took.Round(time.Millisecond))
	if took > 2500*time.Millisecond {
		t.Errorf("Close took %v on a silent network, want about one second (endSession's bound), not one per connection", took)
	}
}
