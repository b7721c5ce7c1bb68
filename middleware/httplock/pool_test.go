package httplock_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

var appSeq atomic.Int64

// tracedPool returns a pool of maxConns connections whose sessions carry an
// application_name no other test or run uses. A multiplexing Locker's lock
// and waiting connections copy the pool's connection settings, so they carry
// it too: pg_stat_activity then shows every session the pool and the Locker
// use, and no other.
func tracedPool(t *testing.T, maxConns int32) (*pgxpool.Pool, string) {
	t.Helper()
	app := fmt.Sprintf("httplock-pool-%d-%d-%d", os.Getpid(), time.Now().UnixNano()%1e9, appSeq.Add(1))
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = maxConns
	cfg.ConnConfig.RuntimeParams["application_name"] = app
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool, app
}

// sessionPeak is the most that sampleSessions saw at once.
type sessionPeak struct {
	backends   int // sessions with the pool's application_name
	lockPIDs   int // of them, sessions holding or waiting for an advisory lock
	heldKeys   int // Locker.Stats().HeldKeys
	lockConns  int // Locker.Stats().LockConns
	waitConns  int // Locker.Stats().WaitConns
	samples    int
	sampleErrs []error
}

// sampleSessions reads pg_stat_activity and pg_locks (through watch, a pool
// of its own with another application_name) and the Locker's Stats every
// 5 ms until stop is called, which returns the peaks.
func sampleSessions(watch *pgxpool.Pool, app string, lk *pglock.Locker) (stop func() sessionPeak) {
	var (
		peak sessionPeak
		done = make(chan struct{})
		wg   sync.WaitGroup
	)
	sample := func() {
		s := lk.Stats()
		peak.heldKeys = max(peak.heldKeys, s.HeldKeys)
		peak.lockConns = max(peak.lockConns, s.LockConns)
		peak.waitConns = max(peak.waitConns, s.WaitConns)
		var backends, lockPIDs int
		err := watch.QueryRow(context.Background(), `
			SELECT (SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1),
			       (SELECT count(DISTINCT l.pid) FROM pg_catalog.pg_locks l
			          JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
			         WHERE l.locktype = 'advisory' AND a.application_name = $1)`, app).Scan(&backends, &lockPIDs)
		if err != nil {
			if len(peak.sampleErrs) < 3 {
				peak.sampleErrs = append(peak.sampleErrs, err)
			}
			return
		}
		peak.samples++
		peak.backends = max(peak.backends, backends)
		peak.lockPIDs = max(peak.lockPIDs, lockPIDs)
	}
	wg.Go(func() {
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			sample()
			select {
			case <-done:
				return
			case <-tick.C:
			}
		}
	})
	return func() sessionPeak {
		close(done)
		wg.Wait()
		return peak
	}
}

// burst sends n concurrent POSTs to srv's /items/{id}, one id each, released
// together, and returns their statuses (0 with an error when the client gave
// up) and how long the burst took.
func burst(t *testing.T, srv *httptest.Server, n int) ([]int, []error, time.Duration) {
	t.Helper()
	base := pgtest.UniqueKey(t)
	client := srv.Client()
	client.Timeout = 10 * time.Second // the clients of the issue gave up after 10 s
	statuses := make([]int, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			resp, err := client.Post(srv.URL+"/items/"+url.PathEscape(fmt.Sprintf("%s-%d", base, i)), "text/plain", nil)
			if err != nil {
				errs[i] = err
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			statuses[i] = resp.StatusCode
		})
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	return statuses, errs, time.Since(t0)
}

// queryHandler answers 200 after one 50 ms query on pool: the handler needs
// a pool connection of its own while the middleware holds the request's lock.
func queryHandler(pool *pgxpool.Pool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := pool.Exec(r.Context(), "SELECT pg_sleep(0.05)"); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, "ok")
	})
}

// TestPoolNotPinnedByHeldLocks is the deadlock of issue 10, which a
// multiplexing Locker removes: a held lock no longer costs a pool connection.
//
// A pgxpool of 4 connections, a Locker on it with 2 lock connections, the
// middleware with WithWait(5s) on POST /items/{id}, and a handler that runs
// one 50 ms query on the same pool. 64 concurrent requests on 64 distinct
// ids. When each held lock pinned a pool connection, 4 requests took the 4
// connections for their locks and their handlers waited for a fifth: a
// deadlock until the clients gave up (10 s), and 409 Busy for keys nobody
// held. Now all 64 answer 200, none 409; more locks are held at once than
// the pool has connections; and PostgreSQL never sees more sessions from
// this pool and Locker than the pool's 4 plus the Locker's 2 lock
// connections (no waiting connection: no key is held elsewhere), with the
// advisory locks on at most those 2.
func TestPoolNotPinnedByHeldLocks(t *testing.T) {
	t.Parallel()
	const (
		maxConns  = 4
		lockConns = 2
		requests  = 64
	)
	pool, lk, counts, took, peak := poolBurst(t, maxConns, lockConns, requests, httplock.WithWait(5*time.Second))
	t.Logf("%d requests on a pool of %d: %v in %v; peaks: %d sessions with the pool's application_name, %d holding advisory locks, %d keys held at once, Stats LockConns %d WaitConns %d (%d samples)",
		requests, maxConns, counts, took.Round(time.Millisecond), peak.backends, peak.lockPIDs, peak.heldKeys, peak.lockConns, peak.waitConns, peak.samples)
	if counts[http.StatusConflict] != 0 {
		t.Errorf("%d requests got 409 Busy on keys nobody else held", counts[http.StatusConflict])
	}
	if len(peak.sampleErrs) > 0 || peak.samples == 0 {
		t.Fatalf("sampling pg_stat_activity: %d samples, errors %v", peak.samples, peak.sampleErrs)
	}
	if peak.backends > maxConns+lockConns {
		t.Errorf("up to %d sessions with the pool's application_name, want at most %d (pool) + %d (lock connections)",
			peak.backends, maxConns, lockConns)
	}
	if peak.lockPIDs > lockConns {
		t.Errorf("advisory locks held by up to %d sessions, want at most the %d lock connections", peak.lockPIDs, lockConns)
	}
	if peak.lockConns > lockConns || lk.Stats().LockConns > lockConns {
		t.Errorf("Stats().LockConns up to %d (now %d), want at most %d", peak.lockConns, lk.Stats().LockConns, lockConns)
	}
	if peak.waitConns != 0 {
		t.Errorf("Stats().WaitConns up to %d, want 0: no key was held elsewhere", peak.waitConns)
	}
	if peak.heldKeys <= maxConns {
		t.Errorf("at most %d keys held at once, want more than the pool's %d connections (the handlers queue for the pool while their locks are held)",
			peak.heldKeys, maxConns)
	}
	if s := lk.Stats(); s.HeldKeys != 0 || s.ServerLocks != 0 || s.Queued != 0 {
		t.Errorf("after the burst: Stats %+v, want nothing held or queued", s)
	}
	noConnsLeft(t, pool)
}

// TestPoolOfOneFailFast: without WithWait (409 at once when the key is busy,
// TryDo), on a pool of a single connection, 16 concurrent requests on
// distinct keys whose handler queries the pool all answer 200. When a held
// lock pinned the pool's one connection, the handler could never get it.
func TestPoolOfOneFailFast(t *testing.T) {
	t.Parallel()
	const (
		maxConns  = 1
		lockConns = pglock.DefaultLockConns
		requests  = 16
	)
	pool, _, counts, took, peak := poolBurst(t, maxConns, lockConns, requests)
	t.Logf("%d requests on a pool of %d: %v in %v; peaks: %d sessions with the pool's application_name, %d keys held at once",
		requests, maxConns, counts, took.Round(time.Millisecond), peak.backends, peak.heldKeys)
	if len(peak.sampleErrs) > 0 {
		t.Fatalf("sampling pg_stat_activity: %v", peak.sampleErrs)
	}
	if peak.backends > maxConns+lockConns {
		t.Errorf("up to %d sessions with the pool's application_name, want at most %d (pool) + %d (lock connections)",
			peak.backends, maxConns, lockConns)
	}
	if peak.waitConns != 0 {
		t.Errorf("Stats().WaitConns up to %d, want 0: TryDo never waits", peak.waitConns)
	}
	noConnsLeft(t, pool)
}

// poolBurst serves requests concurrent requests on distinct ids through the
// middleware (with opts) on a Locker with lockConns lock connections over a
// pool of maxConns, whose handler runs a 50 ms query on that pool. It
// returns the statuses counted, the time taken and the peaks sampled from
// pg_stat_activity, pg_locks and the Locker's Stats; a status other than
// 200 is an error of the test.
func poolBurst(t *testing.T, maxConns int32, lockConns, requests int, opts ...httplock.Option) (*pgxpool.Pool, *pglock.Locker, map[int]int, time.Duration, sessionPeak) {
	t.Helper()
	pool, app := tracedPool(t, maxConns)
	lk, err := pglock.NewLocker(pool, pglock.WithLockConns(lockConns))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	mw := mustMiddleware(t, lk, httplock.PathValue("id"), opts...)
	mux := http.NewServeMux()
	mux.Handle("POST /items/{id}", mw(queryHandler(pool)))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	watch := pgtest.Pool(t, 1)
	stop := sampleSessions(watch, app, lk)
	statuses, errs, took := burst(t, srv, requests)
	peak := stop()

	counts := map[int]int{}
	for i, s := range statuses {
		counts[s]++
		if s != http.StatusOK {
			t.Errorf("request %d: status %d, err %v", i, s, errs[i])
		}
	}
	return pool, lk, counts, took, peak
}
