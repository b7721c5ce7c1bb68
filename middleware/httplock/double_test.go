package httplock_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/pglock/pglocktest"
)

// httplock on pglocktest's in-memory double, unchanged: handlers of one key
// serialize across replicas, a key held elsewhere is 409, and a lost lock
// cancels the handler's request context.
func TestOnDouble(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	var now, peak atomic.Int32
	release := make(chan struct{})
	entered := make(chan struct{}, 4)
	causes := make(chan error, 4)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n := now.Add(1); n > peak.Load() {
			peak.Store(n)
		}
		defer now.Add(-1)
		entered <- struct{}{}
		select {
		case <-release:
		case <-r.Context().Done():
			causes <- context.Cause(r.Context())
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	var servers []*httptest.Server
	var lockers []*pglock.Locker
	for range 2 {
		lk, err := pglocktest.NewLocker(srv)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { lk.Close() })
		wrapped, err := httplock.Handler(lk, httplock.Query("id"), h, httplock.WithWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		s := httptest.NewServer(wrapped)
		t.Cleanup(s.Close)
		servers, lockers = append(servers, s), append(lockers, lk)
	}
	key, err := lockers[0].Key(httplock.DefaultNamespace + "42")
	if err != nil {
		t.Fatal(err)
	}
	get := func(s *httptest.Server, id string) (int, error) {
		resp, err := http.Get(s.URL + "?id=" + id)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}

	// Two handlers of key 42, one per replica: the second waits for the first.
	codes := make(chan int, 2)
	var wg sync.WaitGroup
	for _, s := range servers {
		wg.Go(func() {
			c, err := get(s, "42")
			if err != nil {
				t.Error(err)
			}
			codes <- c
		})
	}
	<-entered
	waitFor(t, "the second handler waits", func() bool { return len(srv.Waiters(key)) == 1 })
	release <- struct{}{}
	<-entered
	release <- struct{}{}
	wg.Wait()
	if c1, c2 := <-codes, <-codes; c1 != http.StatusNoContent || c2 != http.StatusNoContent || peak.Load() != 1 {
		t.Fatalf("codes %d, %d; peak %d (want 204, 204, 1)", c1, c2, peak.Load())
	}

	// Held by another replica: without a wait, 409 at once.
	noWait, err := httplock.Handler(lockers[0], httplock.Query("id"), h)
	if err != nil {
		t.Fatal(err)
	}
	let := srv.HoldElsewhere(key)
	rec := httptest.NewRecorder()
	noWait.ServeHTTP(rec, httptest.NewRequest("GET", "/?id=42", nil))
	let()
	if rec.Code != http.StatusConflict || rec.Header().Get("Retry-After") == "" {
		t.Fatalf("key held elsewhere: %d %q, want 409 with Retry-After", rec.Code, rec.Header().Get("Retry-After"))
	}

	// Lost while the handler runs: its request context ends, cause
	// ErrLockLost.
	done := make(chan error, 1)
	go func() {
		_, err := get(servers[1], "42")
		done <- err
	}()
	<-entered
	if n := srv.Lose(key); n != 1 {
		t.Fatalf("Lose = %d", n)
	}
	if cause := <-causes; !errors.Is(cause, pglock.ErrLockLost) {
		t.Fatalf("handler's context ended with %v, want ErrLockLost", cause)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if len(srv.Keys()) != 0 {
		t.Fatalf("keys left %v", srv.Keys())
	}
}
