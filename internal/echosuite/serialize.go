package echosuite

import (
	"errors"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

// serializeAcrossReplicas: 20 concurrent requests for one key over two Echo
// servers with their own pools and Lockers never overlap in the handler,
// and with waiting all of them succeed. A counter that the handlers read,
// and write back one more after a pause, with no atomics or mutex of its
// own, ends exact: an overlap would lose an update (and -race would report
// it).
func (s *suite[C]) serializeAcrossReplicas(t *testing.T) {
	a := s.a
	id := uniqueID(t)
	var o locktest.Overlap
	counter := 0
	reps := s.twoReplicas(t, config[C]{Wait: time.Minute}, App{}, func(c C) error {
		o.Enter()
		defer o.Leave()
		n := counter
		time.Sleep(10 * time.Millisecond)
		counter = n + 1
		return a.String(c, http.StatusOK, "ok")
	})
	const requests = 20
	for i, r := range fire(reps, requests, func(int) string { return id }) {
		if r.Err != nil || r.Status != http.StatusOK {
			t.Errorf("request %d: %+v", i, r)
		}
	}
	if m := o.Max(); m != 1 {
		t.Fatalf("max handlers at once for one key = %d, want 1", m)
	}
	if counter != requests {
		t.Fatalf("counter = %d after %d requests: updates were lost", counter, requests)
	}
	watch := pgtest.Pool(t, 2)
	pgtest.WaitFree(t, watch, s.lockKey(t, reps[0].Locker, id))
	locktest.NoConnsLeft(t, reps[0].Pool, reps[1].Pool)
}

// failFastBusy: without waiting, the requests that overlap a holder get 409
// with Retry-After, returned to Echo's HTTPErrorHandler as an
// *echo.HTTPError that matches ErrBusy, from either replica; the holder and
// the requests after it succeed.
func (s *suite[C]) failFastBusy(t *testing.T) {
	a := s.a
	id := uniqueID(t)
	var o locktest.Overlap
	inside, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	var mu sync.Mutex
	var denied, handled []error
	cfg := config[C]{DenyHandler: func(c C, key string, err error) error {
		mu.Lock()
		denied = append(denied, err)
		mu.Unlock()
		return a.DefaultDeny(c, key, err)
	}}
	app := App{Handled: func(err error) {
		mu.Lock()
		handled = append(handled, err)
		mu.Unlock()
	}}
	reps := s.twoReplicas(t, cfg, app, func(c C) error {
		o.Enter()
		defer o.Leave()
		if a.QueryParam(c, "hold") != "" {
			once.Do(func() { close(inside) })
			<-release
		}
		return a.NoContent(c, http.StatusOK)
	})
	holder := make(chan locktest.Result, 1)
	go func() { holder <- locktest.Do(reps[0].Server, http.MethodPost, "/orders/"+id+"?hold=1") }()
	<-inside
	for i, r := range fire(reps, 19, func(int) string { return id }) {
		if r.Err != nil || r.Status != http.StatusConflict || r.RetryAfter != "1" {
			t.Errorf("overlapping request %d: %+v", i, r)
		}
	}
	close(release)
	if r := <-holder; r.Err != nil || r.Status != http.StatusOK {
		t.Fatalf("holder: %+v", r)
	}
	for i := range 4 {
		if r := post(reps[i%2], id); r.Status != http.StatusOK {
			t.Fatalf("sequential request %d: %+v", i, r)
		}
	}
	if m := o.Max(); m != 1 {
		t.Fatalf("max handlers at once = %d, want 1", m)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(denied) != 19 || !errors.Is(denied[0], a.Errors.Busy) {
		t.Fatalf("DenyHandler called %d times, first with %v", len(denied), denied)
	}
	if len(handled) != 19 {
		t.Fatalf("HTTPErrorHandler called %d times, want 19", len(handled))
	}
	for _, err := range handled {
		if code, ok := a.HTTPErrorCode(err); !ok || code != http.StatusConflict || !errors.Is(err, a.Errors.Busy) {
			t.Fatalf("HTTPErrorHandler got %v, want a 409 *echo.HTTPError matching ErrBusy", err)
		}
	}
	watch := pgtest.Pool(t, 2)
	pgtest.WaitFree(t, watch, s.lockKey(t, reps[0].Locker, id))
	locktest.NoConnsLeft(t, reps[0].Pool, reps[1].Pool)
}

// waitGetsTheLock: with Wait > 0 a request for a key held elsewhere waits
// in PostgreSQL's queue and runs its handler once the holder lets go, in
// both scopes.
func (s *suite[C]) waitGetsTheLock(t *testing.T) {
	a := s.a
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		t.Run(scope.String(), func(t *testing.T) {
			t.Parallel()
			id := uniqueID(t)
			ran := make(chan time.Time, 1)
			rep := s.replica(t, config[C]{Wait: 30 * time.Second, Scope: &scope}, App{}, func(c C) error {
				ran <- time.Now()
				return a.String(c, http.StatusOK, "got it")
			})
			key := s.lockKey(t, rep.Locker, id)
			held := locktest.HoldElsewhere(t, key)
			res := make(chan locktest.Result, 1)
			go func() { res <- post(rep, id) }()
			watch := pgtest.Pool(t, 2)
			locktest.WaitFor(t, "the request to wait for the key", func() bool { return locktest.Waiters(t, watch, key) == 1 })
			time.Sleep(50 * time.Millisecond)
			select {
			case <-ran:
				t.Fatal("the handler ran while the key was held elsewhere")
			default:
			}
			released := time.Now()
			if err := held.Release(t.Context()); err != nil {
				t.Fatal(err)
			}
			if r := <-res; r.Err != nil || r.Status != http.StatusOK || r.Body != "got it" {
				t.Fatalf("waiting request: %+v", r)
			}
			if at := <-ran; at.Before(released) {
				t.Fatalf("the handler ran at %v, before the holder let go at %v", at, released)
			}
			pgtest.WaitFree(t, watch, key)
			locktest.NoConnsLeft(t, rep.Pool)
		})
	}
}

// differentKeysOverlap: requests for different keys run at the same time.
func (s *suite[C]) differentKeysOverlap(t *testing.T) {
	base := uniqueID(t)
	var o locktest.Overlap
	reps := s.twoReplicas(t, config[C]{Wait: 30 * time.Second}, App{}, func(C) error {
		o.Enter()
		defer o.Leave()
		deadline := time.Now().Add(5 * time.Second)
		for o.Max() < 2 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(50 * time.Millisecond)
		return nil
	})
	for i, r := range fire(reps, 6, func(i int) string { return fmt.Sprintf("%s-%d", base, i) }) {
		if r.Err != nil || r.Status != http.StatusOK {
			t.Errorf("request %d: %+v", i, r)
		}
	}
	if m := o.Max(); m < 2 {
		t.Fatalf("max handlers at once for different keys = %d, want > 1", m)
	}
	t.Logf("max overlap for 6 different keys: %d", o.Max())
	locktest.NoConnsLeft(t, reps[0].Pool, reps[1].Pool)
}

// sharedReads: with SharedForSafeMethods, GETs of one key run together and
// a POST is refused while they run.
func (s *suite[C]) sharedReads(t *testing.T) {
	a := s.a
	id := uniqueID(t)
	var o locktest.Overlap
	release := make(chan struct{})
	reps := s.twoReplicas(t, config[C]{ModeFunc: a.SharedForSafeMethods}, App{}, func(c C) error {
		if a.Request(c).Method == http.MethodGet {
			o.Enter()
			defer o.Leave()
			<-release
		}
		return nil
	})
	// Let the handlers out if the test fails early, or closing the servers
	// (cleanups run last first) would wait for them forever.
	var releaseOnce sync.Once
	letOut := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(letOut)
	var wg sync.WaitGroup
	res := make([]locktest.Result, 4)
	for i := range res {
		wg.Go(func() { res[i] = locktest.Do(reps[i%2].Server, http.MethodGet, "/orders/"+id) })
	}
	locktest.WaitFor(t, "4 GETs inside the handler at once", func() bool { return o.Now() == 4 })
	watch := pgtest.Pool(t, 2)
	key := s.lockKey(t, reps[0].Locker, id)
	// Each replica's Locker holds the key in share mode, once: the readers of
	// one Locker share its server-side lock.
	if hs := pgtest.Granted(t, watch, key); len(hs) != 2 || hs[0].Mode != "ShareLock" || hs[1].Mode != "ShareLock" {
		t.Errorf("pg_locks with 4 readers inside (2 per replica) = %+v, want 2 ShareLock holders", hs)
	}
	if r := post(reps[1], id); r.Status != http.StatusConflict {
		t.Errorf("POST while readers hold the key: %+v, want 409", r)
	}
	letOut()
	wg.Wait()
	for i, r := range res {
		if r.Status != http.StatusOK {
			t.Errorf("GET %d: %+v", i, r)
		}
	}
	pgtest.WaitFree(t, watch, key)
	locktest.NoConnsLeft(t, reps[0].Pool, reps[1].Pool)
}

// sharesKeysWithHTTPLock: an Echo service and a net/http service (package
// httplock) that name the same key contend for one lock, each through its
// own pool and Locker.
func (s *suite[C]) sharesKeysWithHTTPLock(t *testing.T) {
	a := s.a
	id := uniqueID(t)
	inside, release := make(chan struct{}), make(chan struct{})
	var letOut sync.Once
	t.Cleanup(func() { letOut.Do(func() { close(release) }) })
	std := locktest.NewReplica(t, 2, func(lk *pglock.Locker) http.Handler {
		mw, err := httplock.Middleware(lk, httplock.PathValue("id"))
		if err != nil {
			t.Fatal(err)
		}
		mux := http.NewServeMux()
		mux.Handle("POST /orders/{id}", mw(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			close(inside)
			<-release
		})))
		return mux
	})
	rep := s.replica(t, config[C]{}, App{}, func(c C) error { return a.NoContent(c, http.StatusOK) })
	holder := make(chan locktest.Result, 1)
	go func() { holder <- locktest.Do(std.Server, http.MethodPost, "/orders/"+id) }()
	<-inside
	if r := post(rep, id); r.Status != http.StatusConflict {
		t.Errorf("Echo request while net/http holds the key: %+v, want 409", r)
	}
	letOut.Do(func() { close(release) })
	if r := <-holder; r.Status != http.StatusOK {
		t.Fatalf("net/http holder: %+v", r)
	}
	if r := post(rep, id); r.Status != http.StatusOK {
		t.Errorf("Echo request after net/http let go: %+v", r)
	}
	if a.Namespace != httplock.DefaultNamespace {
		t.Errorf("namespaces %q and %q differ", a.Namespace, httplock.DefaultNamespace)
	}
	pgtest.WaitFree(t, pgtest.Pool(t, 1), s.lockKey(t, rep.Locker, id))
}
