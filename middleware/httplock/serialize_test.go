package httplock_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

// twoReplicas starts two HTTP servers, each with its own pool and Locker,
// serving POST /orders/{id} behind the middleware; h is the handler.
func twoReplicas(t *testing.T, h http.HandlerFunc, opts ...httplock.Option) ([2]*httptest.Server, [2]replica) {
	t.Helper()
	var srvs [2]*httptest.Server
	var reps [2]replica
	for i := range srvs {
		reps[i] = newReplica(t, 4)
		mw := mustMiddleware(t, reps[i].locker, httplock.PathValue("id"), opts...)
		mux := http.NewServeMux()
		mux.Handle("/orders/{id}", mw(h))
		srvs[i] = httptest.NewServer(mux)
		t.Cleanup(srvs[i].Close)
	}
	return srvs, reps
}

type result struct {
	status     int
	retryAfter string
	err        error
}

// fire sends n concurrent POSTs to /orders/{id}, alternating between the
// servers, released together.
func fire(srvs [2]*httptest.Server, n int, id func(i int) string) []result {
	res := make([]result, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			srv := srvs[i%2]
			<-start
			resp, err := srv.Client().Post(srv.URL+"/orders/"+id(i), "text/plain", nil)
			if err != nil {
				res[i].err = err
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			res[i] = result{status: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After")}
		})
	}
	close(start)
	wg.Wait()
	return res
}

// TestSerializeAcrossReplicas: 20 concurrent requests for one key, spread over
// two servers with their own pools and Lockers, never overlap in the handler,
// and with waiting on all of them succeed.
func TestSerializeAcrossReplicas(t *testing.T) {
	t.Parallel()
	id := pgtest.UniqueKey(t)
	var o overlap
	srvs, reps := twoReplicas(t, func(w http.ResponseWriter, r *http.Request) {
		o.enter()
		defer o.leave()
		time.Sleep(10 * time.Millisecond)
		fmt.Fprint(w, "ok")
	}, httplock.WithWait(60*time.Second))
	res := fire(srvs, 20, func(int) string { return id })
	for i, r := range res {
		if r.err != nil || r.status != http.StatusOK {
			t.Errorf("request %d: status %d, err %v", i, r.status, r.err)
		}
	}
	if m := o.max.Load(); m != 1 {
		t.Fatalf("max handlers at once for one key = %d, want 1", m)
	}
	watch := pgtest.Pool(t, 2)
	pgtest.WaitFree(t, watch, lockKey(t, reps[0].locker, id))
	noConnsLeft(t, reps[0].pool, reps[1].pool)
}

// TestFailFastBusy: without waiting, requests that arrive while another
// request holds the key get 409 with Retry-After, from either replica; the
// holder and every request after it succeed.
func TestFailFastBusy(t *testing.T) {
	t.Parallel()
	id := pgtest.UniqueKey(t)
	var o overlap
	inside := make(chan struct{})
	release := make(chan struct{})
	var first sync.Once
	srvs, reps := twoReplicas(t, func(w http.ResponseWriter, r *http.Request) {
		o.enter()
		defer o.leave()
		if r.URL.Query().Get("hold") != "" {
			first.Do(func() { close(inside) })
			<-release
		}
		fmt.Fprint(w, "ok")
	})

	// One request holds the key...
	holder := make(chan result, 1)
	go func() {
		resp, err := srvs[0].Client().Post(srvs[0].URL+"/orders/"+id+"?hold=1", "text/plain", nil)
		if err != nil {
			holder <- result{err: err}
			return
		}
		resp.Body.Close()
		holder <- result{status: resp.StatusCode}
	}()
	<-inside
	// ...so all 19 that overlap it are refused at once, on both replicas.
	start := time.Now()
	res := fire(srvs, 19, func(int) string { return id })
	for i, r := range res {
		if r.err != nil || r.status != http.StatusConflict || r.retryAfter != "1" {
			t.Errorf("overlapping request %d: status %d, Retry-After %q, err %v; want 409, 1", i, r.status, r.retryAfter, r.err)
		}
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("fail-fast answers took %v", d)
	}
	close(release)
	if r := <-holder; r.err != nil || r.status != http.StatusOK {
		t.Fatalf("holder: status %d, err %v", r.status, r.err)
	}
	// Requests that do not overlap succeed: one after another, none is refused.
	for i := range 4 {
		srv := srvs[i%2]
		resp, err := srv.Client().Post(srv.URL+"/orders/"+id, "text/plain", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("sequential request %d: status %d", i, resp.StatusCode)
		}
	}
	if m := o.max.Load(); m != 1 {
		t.Fatalf("max handlers at once = %d, want 1", m)
	}
	watch := pgtest.Pool(t, 2)
	pgtest.WaitFree(t, watch, lockKey(t, reps[0].locker, id))
	noConnsLeft(t, reps[0].pool, reps[1].pool)
}

// TestFailFastRace: 20 requests raced for one key without waiting: each gets
// 200 or 409 (with Retry-After), at least one gets 200, and the handler
// never runs twice at once.
func TestFailFastRace(t *testing.T) {
	t.Parallel()
	id := pgtest.UniqueKey(t)
	var o overlap
	srvs, reps := twoReplicas(t, func(w http.ResponseWriter, r *http.Request) {
		o.enter()
		defer o.leave()
		time.Sleep(20 * time.Millisecond)
	})
	res := fire(srvs, 20, func(int) string { return id })
	ok, busy := 0, 0
	for i, r := range res {
		switch {
		case r.err != nil:
			t.Errorf("request %d: %v", i, r.err)
		case r.status == http.StatusOK:
			ok++
		case r.status == http.StatusConflict && r.retryAfter == "1":
			busy++
		default:
			t.Errorf("request %d: status %d, Retry-After %q", i, r.status, r.retryAfter)
		}
	}
	if ok == 0 || ok+busy != 20 {
		t.Fatalf("%d succeeded, %d busy; want at least one success and 20 answers", ok, busy)
	}
	if m := o.max.Load(); m != 1 {
		t.Fatalf("max handlers at once = %d, want 1", m)
	}
	t.Logf("%d succeeded, %d got 409", ok, busy)
	watch := pgtest.Pool(t, 2)
	pgtest.WaitFree(t, watch, lockKey(t, reps[0].locker, id))
	noConnsLeft(t, reps[0].pool, reps[1].pool)
}

// TestDifferentKeysOverlap: requests for different keys run at the same time.
func TestDifferentKeysOverlap(t *testing.T) {
	t.Parallel()
	base := pgtest.UniqueKey(t)
	var o overlap
	srvs, reps := twoReplicas(t, func(w http.ResponseWriter, r *http.Request) {
		o.enter()
		defer o.leave()
		// Stay until a second handler is inside (or give up after 5 s).
		deadline := time.Now().Add(5 * time.Second)
		for o.max.Load() < 2 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(50 * time.Millisecond)
	}, httplock.WithWait(30*time.Second))
	res := fire(srvs, 6, func(i int) string { return fmt.Sprintf("%s-%d", base, i) })
	for i, r := range res {
		if r.err != nil || r.status != http.StatusOK {
			t.Errorf("request %d: status %d, err %v", i, r.status, r.err)
		}
	}
	if m := o.max.Load(); m < 2 {
		t.Fatalf("max handlers at once for different keys = %d, want > 1", m)
	}
	t.Logf("max overlap for 6 different keys: %d", o.max.Load())
	noConnsLeft(t, reps[0].pool, reps[1].pool)
}

// TestWaitLimit: a request that waits longer than the limit gets the busy
// answer, and leaves neither a waiter nor a connection behind.
func TestWaitLimit(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	id := pgtest.UniqueKey(t)
	rep := newReplica(t, 2)
	watch := pgtest.Pool(t, 2)
	holder := newReplica(t, 1)
	// The Locker's first lock opens its lock connection and tests the
	// server, and its first wait opens a waiting connection; on a loaded
	// machine either can take more than the 300 ms limit (answered 503,
	// unavailable). Both are warmed first, with one real wait: the limit
	// is the point here.
	warmKey := lockKey(t, rep.locker, id+"-warm")
	warm, err := pglock.NewLock(holder.pool, warmKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := warm.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	warmCtx, cancelWarm := context.WithTimeout(ctx, 30*time.Second)
	defer cancelWarm()
	warmDone := make(chan error, 1)
	go func() {
		warmDone <- rep.locker.Do(warmCtx, httplock.DefaultNamespace+id+"-warm", func(context.Context) error { return nil })
	}()
	waitFor(t, "the warm-up wait in pg_locks", func() bool {
		select {
		case err := <-warmDone:
			warmDone <- err
			return true
		default:
		}
		return waiters(t, watch, warmKey) > 0
	})
	if err := warm.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-warmDone; err != nil {
		t.Fatalf("warm-up Do: %v", err)
	}
	key := lockKey(t, rep.locker, id)
	hl, err := pglock.NewLock(holder.pool, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := hl.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	defer hl.Release(ctx)

	ran := false
	h, err := httplock.Handler(rep.locker, func(*http.Request) (string, bool, error) { return id, true, nil },
		http.HandlerFunc(func(http.ResponseWriter, *http.Request) { ran = true }),
		httplock.WithWait(300*time.Millisecond), httplock.WithRetryAfter(2500*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	start := time.Now()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
	took := time.Since(start)
	if rec.Code != http.StatusConflict || rec.Header().Get("Retry-After") != "3" || ran {
		t.Fatalf("status %d, Retry-After %q, ran %v; want 409, 3, false", rec.Code, rec.Header().Get("Retry-After"), ran)
	}
	if took < 250*time.Millisecond || took > 5*time.Second {
		t.Fatalf("busy answer after %v, want about 300ms", took)
	}
	if n := waiters(t, watch, key); n != 0 {
		t.Fatalf("%d sessions still wait for the key", n)
	}
	noConnsLeft(t, rep.pool)
}

// TestSharedReads: with SharedForSafeMethods, GETs of one key run together
// and a POST is refused while they run.
func TestSharedReads(t *testing.T) {
	t.Parallel()
	id := pgtest.UniqueKey(t)
	var o overlap
	release := make(chan struct{})
	srvs, reps := twoReplicas(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			o.enter()
			defer o.leave()
			<-release
		}
	}, httplock.WithModeFunc(httplock.SharedForSafeMethods))
	// Let the handlers out if the test fails early, or closing the servers
	// (cleanups run last first) would wait for them forever.
	var releaseOnce sync.Once
	letOut := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(letOut)

	var wg sync.WaitGroup
	codes := make([]int, 4)
	for i := range codes {
		wg.Go(func() {
			srv := srvs[i%2]
			resp, err := srv.Client().Get(srv.URL + "/orders/" + id)
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			codes[i] = resp.StatusCode
		})
	}
	waitFor(t, "4 GETs inside the handler at once", func() bool { return o.cur.Load() == 4 })
	watch := pgtest.Pool(t, 2)
	key := lockKey(t, reps[0].locker, id)
	// Each replica's Locker holds the key in share mode, once: the readers of
	// one Locker share its server-side lock.
	if hs := pgtest.Granted(t, watch, key); len(hs) != 2 || hs[0].Mode != "ShareLock" || hs[1].Mode != "ShareLock" {
		t.Errorf("pg_locks with 4 readers inside (2 per replica) = %+v, want 2 ShareLock holders", hs)
	}
	resp, err := srvs[1].Client().Post(srvs[1].URL+"/orders/"+id, "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusConflict {
		t.Errorf("POST while readers hold the key: status %d, want 409", resp.StatusCode)
	}
	letOut()
	wg.Wait()
	for i, c := range codes {
		if c != http.StatusOK {
			t.Errorf("GET %d: status %d", i, c)
		}
	}
	pgtest.WaitFree(t, watch, key)
	noConnsLeft(t, reps[0].pool, reps[1].pool)
}

// TestDatabaseError: a lock that cannot be taken because the database is
// unreachable is answered 503 (or by the error handler), never passed.
//
// The database is a port where nothing listens (pgtest.UnreachablePool).
func TestDatabaseError(t *testing.T) {
	t.Parallel()
	lk, err := pglock.NewLocker(pgtest.UnreachablePool(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	rep := replica{locker: lk}
	ran := false
	next := http.HandlerFunc(func(http.ResponseWriter, *http.Request) { ran = true })
	key := func(*http.Request) (string, bool, error) { return "k", true, nil }

	h, err := httplock.Handler(rep.locker, key, next)
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
	if rec.Code != http.StatusServiceUnavailable || ran {
		t.Fatalf("status %d, ran %v; want 503, false", rec.Code, ran)
	}

	var got error
	h, err = httplock.Handler(rep.locker, key, next, httplock.WithWait(time.Second),
		httplock.WithErrorHandler(func(w http.ResponseWriter, r *http.Request, err error) {
			got = err
			w.WriteHeader(http.StatusTeapot)
		}))
	if err != nil {
		t.Fatal(err)
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
	if rec.Code != http.StatusTeapot || ran {
		t.Fatalf("status %d, ran %v; want 418, false", rec.Code, ran)
	}
	if !errorsIs(got, httplock.ErrDatabase) || !errorsIs(got, pglock.ErrNotAcquired) {
		t.Fatalf("error handler got %v, want ErrDatabase and pglock.ErrNotAcquired", got)
	}
}
