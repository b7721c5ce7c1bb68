package echolock_test

import (
	"context"
	"errors"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/echolock"
	"github.com/pglockkit/kit/pglock"
)

// TestClientGoneWhileWaiting: a client that disconnects while its request
// waits for a held key stops the wait at once; the handler never runs, and
// no lock, waiter or pool connection is left behind, in both scopes.
func TestClientGoneWhileWaiting(t *testing.T) {
	t.Parallel()
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		t.Run(scope.String(), func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			id := pgtest.UniqueKey(t)
			var ran atomic.Bool
			var returned atomic.Int64
			rep := newReplica(t, echolock.Config{Wait: time.Minute, Scope: scope}, func(c echo.Context) error {
				ran.Store(true)
				return nil
			})
			rep.e.Use(func(next echo.HandlerFunc) echo.HandlerFunc {
				return func(c echo.Context) error {
					defer returned.Add(1)
					return next(c)
				}
			})
			watch := pgtest.Pool(t, 2)
			key := lockKey(t, rep.locker, id)
			hl, err := pglock.New(pgtest.Pool(t, 1), key)
			if err != nil {
				t.Fatal(err)
			}
			if err := hl.Acquire(ctx); err != nil {
				t.Fatal(err)
			}

			cctx, cancel := context.WithCancel(ctx)
			errc := make(chan error, 1)
			go func() {
				req, _ := http.NewRequestWithContext(cctx, http.MethodPost, rep.srv.URL+"/orders/"+id, nil)
				resp, err := rep.srv.Client().Do(req)
				if err == nil {
					resp.Body.Close()
				}
				errc <- err
			}()
			waitFor(t, "the request to wait for the key", func() bool { return waiters(t, watch, key) == 1 })
			cancel()
			if err := <-errc; !errors.Is(err, context.Canceled) {
				t.Fatalf("client: %v, want context.Canceled", err)
			}
			waitFor(t, "the middleware to return", func() bool { return returned.Load() == 1 })
			if ran.Load() {
				t.Fatal("the handler ran without the lock")
			}
			if n := waiters(t, watch, key); n != 0 {
				t.Fatalf("%d sessions still wait for the key", n)
			}
			noConnsLeft(t, rep.pool)
			if err := hl.Release(ctx); err != nil {
				t.Fatal(err)
			}
			pgtest.WaitFree(t, watch, key)
			if r := do(rep.srv, http.MethodPost, "/orders/"+id); r.status != http.StatusOK || !ran.Load() {
				t.Fatalf("request after the holder left: %+v, ran %v", r, ran.Load())
			}
			pgtest.WaitFree(t, watch, key)
			noConnsLeft(t, rep.pool)
		})
	}
}

// TestWaitLimit: a request that waits longer than Wait gets the busy answer.
func TestWaitLimit(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	id := pgtest.UniqueKey(t)
	rep := newReplica(t, echolock.Config{Wait: 300 * time.Millisecond, RetryAfter: 2500 * time.Millisecond},
		func(c echo.Context) error { t.Error("handler ran"); return nil })
	key := lockKey(t, rep.locker, id)
	hl, _ := pglock.New(pgtest.Pool(t, 1), key)
	if err := hl.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	defer hl.Release(ctx)
	start := time.Now()
	r := do(rep.srv, http.MethodPost, "/orders/"+id)
	if took := time.Since(start); took < 250*time.Millisecond || took > 5*time.Second {
		t.Fatalf("busy answer after %v, want about 300ms", took)
	}
	if r.status != http.StatusConflict || r.retryAfter != "3" {
		t.Fatalf("%+v, want 409 with Retry-After 3", r)
	}
	watch := pgtest.Pool(t, 2)
	if n := waiters(t, watch, key); n != 0 {
		t.Fatalf("%d sessions still wait", n)
	}
	noConnsLeft(t, rep.pool)
}
