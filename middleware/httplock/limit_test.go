package httplock_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

// limitReplicas starts k HTTP servers, each with its own pool and Locker,
// serving POST /orders/{id} behind the middleware; h is the handler.
func limitReplicas(t *testing.T, k int, h http.HandlerFunc, opts ...httplock.Option) ([]*httptest.Server, []replica) {
	t.Helper()
	srvs := make([]*httptest.Server, k)
	reps := make([]replica, k)
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

// fireAt sends n concurrent POSTs to /orders/id, spread over the servers,
// released together; done, if not nil, is told of each answer as it comes.
func fireAt(srvs []*httptest.Server, n int, id string, done chan<- result) []result {
	res := make([]result, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			srv := srvs[i%len(srvs)]
			<-start
			resp, err := srv.Client().Post(srv.URL+"/orders/"+id, "text/plain", nil)
			if err != nil {
				res[i].err = err
			} else {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				res[i] = result{status: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After")}
			}
			if done != nil {
				done <- res[i]
			}
		})
	}
	close(start)
	wg.Wait()
	return res
}

// slotsHeld counts the granted locks of the slots of the semaphore that the
// middleware makes for id with the default namespace, seen from watch.
func slotsHeld(t *testing.T, watch *pgxpool.Pool, lk *pglock.Locker, id string, n int) int {
	t.Helper()
	held := 0
	for i := range n {
		k, err := lk.Key(fmt.Sprintf("%s%s#%d", httplock.DefaultNamespace, id, i))
		if err != nil {
			t.Fatal(err)
		}
		held += len(pgtest.Granted(t, watch, k))
	}
	return held
}

// recv receives from ch within d, or fails the test.
func recv[T any](t *testing.T, ch <-chan T, d time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("timed out after %v waiting for %s", d, what)
		panic("unreachable")
	}
}

// Issue 24: WithLimit(3), no wait, 3 replicas, 12 requests for one key at
// once whose handlers stay inside until told: exactly 3 run (on any
// replica), the 9 others are answered 409 with Retry-After at once, and the
// slot locks seen in pg_locks are 3 while they run and 0 after. (Without the
// limit's effect 1 runs and 11 are refused.)
func TestLimitFailFast(t *testing.T) {
	t.Parallel()
	const n, requests = 3, 12
	id := pgtest.UniqueKey(t)
	watch := pgtest.Pool(t, 2)
	var o overlap
	release := make(chan struct{})
	srvs, reps := limitReplicas(t, 3, func(w http.ResponseWriter, r *http.Request) {
		o.enter()
		defer o.leave()
		select {
		case <-release:
		case <-r.Context().Done():
		}
		fmt.Fprint(w, "ok")
	}, httplock.WithLimit(n))
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) }) // before the servers close, on failure too

	answers := make(chan result, requests)
	resc := make(chan []result, 1)
	go func() { resc <- fireAt(srvs, requests, id, answers) }()
	for i := range requests - n {
		r := recv(t, answers, 20*time.Second, fmt.Sprintf("busy answer %d", i))
		if r.err != nil || r.status != http.StatusConflict || r.retryAfter != "1" {
			t.Errorf("answer %d while %d run: status %d, Retry-After %q, err %v; want 409, 1", i, n, r.status, r.retryAfter, r.err)
		}
	}
	waitFor(t, "3 handlers inside", func() bool { return o.cur.Load() == n })
	if held := slotsHeld(t, watch, reps[0].locker, id, n); held != n {
		t.Errorf("slot locks granted while %d handlers run: %d", n, held)
	}
	once.Do(func() { close(release) })
	ok, busy := 0, 0
	for i, r := range <-resc {
		switch {
		case r.err != nil:
			t.Errorf("request %d: %v", i, r.err)
		case r.status == http.StatusOK:
			ok++
		case r.status == http.StatusConflict:
			busy++
		default:
			t.Errorf("request %d: status %d", i, r.status)
		}
	}
	if ok != n || busy != requests-n {
		t.Errorf("%d ran, %d busy; want %d, %d", ok, busy, n, requests-n)
	}
	if m := o.max.Load(); m != n {
		t.Errorf("max handlers at once for one key = %d, want %d", m, n)
	}
	waitFor(t, "slot locks released", func() bool { return slotsHeld(t, watch, reps[0].locker, id, n) == 0 })
	noConnsLeft(t, reps[0].pool, reps[1].pool, reps[2].pool)
}

// Issue 24: WithLimit(3) with WithWait, 3 replicas, 15 requests for one key
// at once: all 15 run and answer 200, never more than 3 at a time, and 3 at
// a time is reached. (Without the limit's effect they run 1 at a time.)
func TestLimitWait(t *testing.T) {
	t.Parallel()
	const n, requests = 3, 15
	id := pgtest.UniqueKey(t)
	watch := pgtest.Pool(t, 2)
	var o overlap
	srvs, reps := limitReplicas(t, 3, func(w http.ResponseWriter, r *http.Request) {
		o.enter()
		defer o.leave()
		// Stay until n run at once (or a moment passes): the first n
		// requests overlap, whatever the scheduling.
		for deadline := time.Now().Add(300 * time.Millisecond); o.max.Load() < n && time.Now().Before(deadline); {
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(20 * time.Millisecond)
		fmt.Fprint(w, "ok")
	}, httplock.WithLimit(n), httplock.WithWait(time.Minute))

	for i, r := range fireAt(srvs, requests, id, nil) {
		if r.err != nil || r.status != http.StatusOK {
			t.Errorf("request %d: status %d, err %v; want 200", i, r.status, r.err)
		}
	}
	if m := o.max.Load(); m != n {
		t.Errorf("max handlers at once for one key = %d, want %d", m, n)
	}
	waitFor(t, "slot locks released", func() bool { return slotsHeld(t, watch, reps[0].locker, id, n) == 0 })
	noConnsLeft(t, reps[0].pool, reps[1].pool, reps[2].pool)
}

// Issue 24: the wait limit bounds the wait for a slot, not the handler.
// WithLimit(2), WithWait(200ms): two handlers hold the slots for longer than
// the limit and their contexts stay alive; a third request is answered busy
// once the limit passes, logged with ErrBusy, and its handler does not run;
// a fourth whose context ends while it waits is answered 503.
func TestLimitWaitBoundsOnlyTheWait(t *testing.T) {
	t.Parallel()
	const n = 2
	const wait = 200 * time.Millisecond
	rep := newReplica(t, 4)
	id := pgtest.UniqueKey(t)
	var o overlap
	inside := make(chan struct{}, n)
	release := make(chan struct{})
	var logs syncBuffer
	h, err := httplock.Handler(rep.locker, httplock.Query("id"), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		o.enter()
		defer o.leave()
		inside <- struct{}{}
		<-release
		if err := r.Context().Err(); err != nil {
			http.Error(w, "context ended: "+err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, "ok")
	}), httplock.WithLimit(n), httplock.WithWait(wait), httplock.WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) }) // on failure too
	serve := func(ctx context.Context) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequestWithContext(ctx, http.MethodPost, "/?id="+id, nil))
		return rec
	}
	holders := make(chan *httptest.ResponseRecorder, n)
	for range n {
		go func() { holders <- serve(context.Background()) }()
	}
	for i := range n {
		recv(t, inside, 10*time.Second, fmt.Sprintf("holder %d inside", i))
	}

	start := time.Now()
	rec := serve(context.Background())
	if waited := time.Since(start); rec.Code != http.StatusConflict || waited < wait {
		t.Errorf("request over the limit: status %d after %v; want 409 after %v", rec.Code, waited, wait)
	}
	if !strings.Contains(logs.String(), httplock.ErrBusy.Error()) {
		t.Errorf("busy answer not logged with ErrBusy: %s", logs.String())
	}

	ctx, cancel := context.WithTimeout(context.Background(), wait/4)
	rec = serve(ctx)
	cancel()
	if rec.Code != http.StatusServiceUnavailable {
		t.Errorf("request whose context ended while waiting: status %d, want 503", rec.Code)
	}

	time.Sleep(wait) // the holders run well past the wait limit
	once.Do(func() { close(release) })
	for i := range n {
		if rec := recv(t, holders, 10*time.Second, "holder's answer"); rec.Code != http.StatusOK {
			t.Errorf("holder %d: status %d, body %q; want 200", i, rec.Code, rec.Body.String())
		}
	}
	if m := o.max.Load(); m != n {
		t.Errorf("max handlers at once = %d, want %d", m, n)
	}
	watch := pgtest.Pool(t, 2)
	for i := range n {
		k, _ := rep.locker.Key(fmt.Sprintf("%s%s#%d", httplock.DefaultNamespace, id, i))
		pgtest.WaitFree(t, watch, k)
	}
	noConnsLeft(t, rep.pool)
}

// Issue 24: WithLimit's range and the options a semaphore cannot honour are
// errors at construction that name both options; WithLimit(1) is the plain
// lock and combines with everything.
func TestLimitConstruction(t *testing.T) {
	t.Parallel()
	rep := newReplica(t, 2)
	txLocker := newReplica(t, 2, pglock.WithScope(pglock.Transaction)).locker
	sharedLocker := newReplica(t, 2, pglock.WithMode(pglock.Shared)).locker
	key := httplock.MethodPath()
	bad := []struct {
		name string
		lk   *pglock.Locker
		opts []httplock.Option
		says []string
	}{
		{"zero", rep.locker, []httplock.Option{httplock.WithLimit(0)}, []string{"WithLimit(0)"}},
		{"negative", rep.locker, []httplock.Option{httplock.WithLimit(-2)}, []string{"WithLimit(-2)"}},
		{"too large", rep.locker, []httplock.Option{httplock.WithLimit(5000)}, []string{"WithLimit(5000)", "1024"}},
		{"WithScope(Transaction)", rep.locker, []httplock.Option{httplock.WithLimit(2), httplock.WithScope(pglock.Transaction)},
			[]string{"WithLimit(2)", "WithScope(pglock.Transaction)"}},
		{"Locker in Transaction scope", txLocker, []httplock.Option{httplock.WithLimit(2)},
			[]string{"WithLimit(2)", "Transaction scope", "the Locker's scope"}},
		{"Locker in Transaction scope, WithScope(Session)", txLocker, []httplock.Option{httplock.WithLimit(2), httplock.WithScope(pglock.Session)},
			[]string{"WithLimit(2)", "Locker in Transaction scope", "WithScope(pglock.Session)"}},
		{"WithModeFunc", rep.locker, []httplock.Option{httplock.WithLimit(2), httplock.WithModeFunc(httplock.SharedForSafeMethods)},
			[]string{"WithLimit(2)", "WithModeFunc"}},
		{"WithMode(Shared)", rep.locker, []httplock.Option{httplock.WithLimit(2), httplock.WithMode(pglock.Shared)},
			[]string{"WithLimit(2)", "WithMode(pglock.Shared)"}},
		{"Locker in Shared mode", sharedLocker, []httplock.Option{httplock.WithLimit(2)},
			[]string{"WithLimit(2)", "Shared mode", "WithMode(pglock.Exclusive)"}},
	}
	for _, c := range bad {
		mw, err := httplock.Middleware(c.lk, key, c.opts...)
		if mw != nil || !errors.Is(err, httplock.ErrInvalidOption) {
			t.Errorf("%s: %v, want ErrInvalidOption", c.name, err)
			continue
		}
		for _, s := range c.says {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("%s: error %q does not say %q", c.name, err, s)
			}
		}
	}
	good := []struct {
		name string
		lk   *pglock.Locker
		opts []httplock.Option
	}{
		{"limit 1 in Transaction scope", rep.locker, []httplock.Option{httplock.WithLimit(1), httplock.WithScope(pglock.Transaction)}},
		{"limit 1 with a mode func", rep.locker, []httplock.Option{httplock.WithLimit(1), httplock.WithModeFunc(httplock.SharedForSafeMethods)}},
		{"Shared Locker, WithMode(Exclusive)", sharedLocker, []httplock.Option{httplock.WithLimit(2), httplock.WithMode(pglock.Exclusive)}},
		{"largest", rep.locker, []httplock.Option{httplock.WithLimit(1024)}},
	}
	for _, c := range good {
		if _, err := httplock.Middleware(c.lk, key, c.opts...); err != nil {
			t.Errorf("%s: %v", c.name, err)
		}
	}
}
