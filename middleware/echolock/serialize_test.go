package echolock_test

import (
	"errors"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/echolock"
)

// TestSerializeAcrossReplicas: 20 concurrent requests for one key over two
// Echo servers with their own pools and Lockers never overlap in the
// handler, and with waiting on all of them succeed.
func TestSerializeAcrossReplicas(t *testing.T) {
	t.Parallel()
	id := pgtest.UniqueKey(t)
	var o locktest.Overlap
	reps := twoReplicas(t, echolock.Config{Wait: time.Minute}, func(c echo.Context) error {
		o.Enter()
		defer o.Leave()
		time.Sleep(10 * time.Millisecond)
		return c.String(http.StatusOK, "ok")
	})
	for i, r := range fire(reps, 20, func(int) string { return id }) {
		if r.Err != nil || r.Status != http.StatusOK {
			t.Errorf("request %d: status %d, err %v", i, r.Status, r.Err)
		}
	}
	if m := o.Max(); m != 1 {
		t.Fatalf("max handlers at once for one key = %d, want 1", m)
	}
	watch := pgtest.Pool(t, 2)
	pgtest.WaitFree(t, watch, lockKey(t, reps[0].Locker, id))
	locktest.NoConnsLeft(t, reps[0].Pool, reps[1].Pool)
}

// TestFailFastBusy: without waiting, the requests that overlap a holder get
// 409 with Retry-After as an *echo.HTTPError, from either replica; the
// holder and the requests after it succeed.
func TestFailFastBusy(t *testing.T) {
	t.Parallel()
	id := pgtest.UniqueKey(t)
	var o locktest.Overlap
	inside, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	var denied []error
	var mu sync.Mutex
	cfg := echolock.Config{DenyHandler: func(c echo.Context, key string, err error) error {
		mu.Lock()
		denied = append(denied, err)
		mu.Unlock()
		return echolock.DefaultConfig.DenyHandler(c, key, err)
	}}
	reps := twoReplicas(t, cfg, func(c echo.Context) error {
		o.Enter()
		defer o.Leave()
		if c.QueryParam("hold") != "" {
			once.Do(func() { close(inside) })
			<-release
		}
		return c.NoContent(http.StatusOK)
	})
	holder := make(chan locktest.Result, 1)
	go func() { holder <- locktest.Do(reps[0].Server, http.MethodPost, "/orders/"+id+"?hold=1") }()
	<-inside
	for i, r := range fire(reps, 19, func(int) string { return id }) {
		if r.Err != nil || r.Status != http.StatusConflict || r.RetryAfter != "1" {
			t.Errorf("overlapping request %d: status %d, Retry-After %q, err %v", i, r.Status, r.RetryAfter, r.Err)
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
	if len(denied) != 19 || !errors.Is(denied[0], echolock.ErrBusy) {
		t.Fatalf("DenyHandler called %d times, first with %v", len(denied), denied[0])
	}
	mu.Unlock()
	watch := pgtest.Pool(t, 2)
	pgtest.WaitFree(t, watch, lockKey(t, reps[0].Locker, id))
	locktest.NoConnsLeft(t, reps[0].Pool, reps[1].Pool)
}

// TestDifferentKeysOverlap: requests for different keys run at the same time.
func TestDifferentKeysOverlap(t *testing.T) {
	t.Parallel()
	base := pgtest.UniqueKey(t)
	var o locktest.Overlap
	reps := twoReplicas(t, echolock.Config{Wait: 30 * time.Second}, func(c echo.Context) error {
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

// TestSharedReads: with SharedForSafeMethods, GETs of one key run together
// and a POST is refused while they run.
func TestSharedReads(t *testing.T) {
	t.Parallel()
	id := pgtest.UniqueKey(t)
	var o locktest.Overlap
	release := make(chan struct{})
	reps := twoReplicas(t, echolock.Config{ModeFunc: echolock.SharedForSafeMethods}, func(c echo.Context) error {
		if c.Request().Method == http.MethodGet {
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
	key := lockKey(t, reps[0].Locker, id)
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
