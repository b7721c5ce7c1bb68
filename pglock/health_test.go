package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// probeHealth asks h as a Kubernetes probe would, and returns the status
// and body.
func probeHealth(h http.Handler) (int, string) {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/healthz", nil))
	return rec.Code, rec.Body.String()
}

// waitStatus probes h every 5 ms until it answers status, and returns when
// it did and its body; it fails the test after limit.
func waitStatus(t *testing.T, h http.Handler, status int, limit time.Duration) (time.Time, string) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		code, body := probeHealth(h)
		if code == status {
			return time.Now(), body
		}
		if time.Now().After(deadline) {
			t.Fatalf("the health handler did not answer %d within %v; last %d %q", status, limit, code, body)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// HealthHandler answers 200 "ok" or 503 with the error's text on one line,
// for any method, HEAD without a body, and 503 for a nil check.
func TestHealthHandler(t *testing.T) {
	t.Parallel()
	ok := pglock.HealthHandler(func(context.Context) error { return nil })
	if code, body := probeHealth(ok); code != http.StatusOK || body != "ok\n" {
		t.Errorf("healthy: %d %q", code, body)
	}
	bad := pglock.HealthHandler(func(context.Context) error {
		return fmt.Errorf("%w: no answer\nfrom the server", pglock.ErrUnavailable)
	})
	code, body := probeHealth(bad)
	if want := pglock.ErrUnavailable.Error() + ": no answer from the server\n"; code != http.StatusServiceUnavailable || body != want {
		t.Errorf("unhealthy: %d %q", code, body)
	}
	if strings.Count(body, "\n") != 1 {
		t.Errorf("unhealthy body %q is not one line", body)
	}
	rec := httptest.NewRecorder()
	bad.ServeHTTP(rec, httptest.NewRequest(http.MethodHead, "/healthz", nil))
	if rec.Code != http.StatusServiceUnavailable || rec.Body.Len() != 0 || rec.Header().Get("Cache-Control") != "no-store" {
		t.Errorf("HEAD: %d %q %v", rec.Code, rec.Body.String(), rec.Header())
	}
	long := pglock.HealthHandler(func(context.Context) error { return errors.New(strings.Repeat("é", 1000)) })
	if _, body := probeHealth(long); len(body) > 520 {
		t.Errorf("a long error gives a body of %d bytes", len(body))
	}
	if code, body := probeHealth(pglock.HealthHandler(nil)); code != http.StatusServiceUnavailable || !strings.Contains(body, "nil") {
		t.Errorf("nil check: %d %q", code, body)
	}
}

// Issue 25. A Locker's health: healthy on a reachable server; unhealthy
// (ErrUnavailable, 503) within twice the check interval of its network
// going silent, lock connections included; healthy again once the network
// is back; healthy after a cut (the server closes nothing, and reconnecting
// works); unhealthy on a server that does not listen. Many probes cost one
// check per interval. Closed, it is unhealthy.
func TestLockerHealthUnreachable(t *testing.T) {
	const interval = 200 * time.Millisecond
	bg := context.Background()
	proxy, pool := faultProxyPool(t, 4)
	defer proxy.Restore()
	lk, err := pglock.NewLocker(pool, pglock.WithLostCheckInterval(interval), pglock.WithReleaseTimeout(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	h := pglock.HealthHandler(lk.CheckHealth)
	if err := lk.CheckHealth(bg); err != nil {
		t.Fatalf("CheckHealth on a reachable server = %v", err)
	}
	if s := lk.Stats(); s.LockConns != 1 {
		t.Errorf("after the first check, %d lock connections, want 1 (the one a lock would open)", s.LockConns)
	}
	// A held lock: its connection is watched, and the check shares it.
	l, err := lk.NewLock(pgtest.UniqueKey(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	// Many probes at once cost one check per interval.
	before := pglock.HealthChecks(lk)
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() {
			if code, body := probeHealth(h); code != http.StatusOK {
				t.Errorf("a probe on a reachable server: %d %q", code, body)
			}
		})
	}
	wg.Wait()
	if n := pglock.HealthChecks(lk) - before; n > 2 {
		t.Errorf("50 concurrent probes ran %d checks, want 1 (2 if the interval passed)", n)
	}

	cut := time.Now()
	proxy.Blackhole()
	at, body := waitStatus(t, h, http.StatusServiceUnavailable, 5*time.Second)
	t.Logf("unhealthy %v after the network went silent: %q", at.Sub(cut).Round(time.Millisecond), body)
	if d := at.Sub(cut); d > interval+2*interval+300*time.Millisecond {
		t.Errorf("unhealthy %v after the network went silent, want within a cached interval and twice the interval (%v)", d, 3*interval)
	}
	if err := lk.CheckHealth(bg); !errors.Is(err, pglock.ErrUnavailable) {
		t.Errorf("CheckHealth with the network silent = %v, want ErrUnavailable", err)
	}
	restored := time.Now()
	proxy.Restore()
	at, _ = waitStatus(t, h, http.StatusOK, 10*time.Second)
	t.Logf("healthy %v after the network came back", at.Sub(restored).Round(time.Millisecond))
	_ = l.Release(bg) // lost with its connection

	// A cut ends the connections; the server is reachable, and a new lock
	// connection opens.
	proxy.Cut()
	waitStatus(t, h, http.StatusOK, 5*time.Second)

	// Nothing listens: unhealthy at once.
	down, err := pglock.NewLocker(pgtest.UnreachablePool(t))
	if err != nil {
		t.Fatal(err)
	}
	defer down.Close()
	start := time.Now()
	if err := down.CheckHealth(bg); !errors.Is(err, pglock.ErrUnavailable) {
		t.Errorf("CheckHealth with no server = %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("CheckHealth with no server took %v", d)
	}

	_ = lk.Close()
	if err := lk.CheckHealth(bg); !errors.Is(err, pglock.ErrLockerClosed) {
		t.Errorf("CheckHealth after Close = %v, want ErrLockerClosed", err)
	}
	var nilLocker *pglock.Locker
	if err := nilLocker.CheckHealth(bg); !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Errorf("CheckHealth on a nil Locker = %v, want ErrUnsupportedConn", err)
	}
}

// Issue 25. A Locker on a server that stops is unhealthy, and healthy again
// once it is back; so is a Locker that does not multiplex (it pings its
// pool).
func TestLockerHealthServerStopped(t *testing.T) {
	bg := context.Background()
	srv := pgtest.ThrowawayT(t, nil)
	pool := func() *pgxpool.Pool {
		p, err := pgxpool.New(bg, srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		return p
	}
	mux, err := pglock.NewLocker(pool(), pglock.WithLostCheckInterval(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer mux.Close()
	perHold, err := pglock.NewLocker(pool(), pglock.WithMultiplexing(false), pglock.WithLostCheckInterval(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer perHold.Close()
	lockers := map[string]http.Handler{
		"multiplexing": pglock.HealthHandler(mux.CheckHealth),
		"per-hold":     pglock.HealthHandler(perHold.CheckHealth),
	}
	for name, h := range lockers {
		if code, body := probeHealth(h); code != http.StatusOK {
			t.Fatalf("%s Locker on a running server: %d %q", name, code, body)
		}
	}
	if err := srv.StopServer(bg); err != nil {
		t.Fatal(err)
	}
	for name, h := range lockers {
		_, body := waitStatus(t, h, http.StatusServiceUnavailable, 5*time.Second)
		t.Logf("%s Locker with the server stopped: %q", name, body)
	}
	if err := srv.Start(bg); err != nil {
		t.Fatal(err)
	}
	for _, h := range lockers {
		waitStatus(t, h, http.StatusOK, 10*time.Second)
	}
}
