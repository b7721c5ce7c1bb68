package echosuite

import (
	"context"
	"errors"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// clientGoneWhileWaiting: a client that disconnects while its request waits
// for a held key stops the wait at once; the handler never runs, the
// middleware returns an error matching ErrRequestEnded, and no lock, waiter
// or pool connection is left behind, in both scopes.
func (s *suite[C]) clientGoneWhileWaiting(t *testing.T) {
	a := s.a
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		t.Run(scope.String(), func(t *testing.T) {
			t.Parallel()
			id := uniqueID(t)
			var ran atomic.Bool
			var returned atomic.Int64
			var ended atomic.Value
			app := App{Returned: func(err error) {
				if err != nil {
					ended.Store(err)
				}
				returned.Add(1)
			}}
			rep := s.replica(t, config[C]{Wait: time.Minute, Scope: &scope}, app, func(C) error {
				ran.Store(true)
				return nil
			})
			watch := pgtest.Pool(t, 2)
			key := s.lockKey(t, rep.Locker, id)
			held := locktest.HoldElsewhere(t, key)

			cctx, cancel := context.WithCancel(context.Background())
			errc := make(chan error, 1)
			go func() {
				req, _ := http.NewRequestWithContext(cctx, http.MethodPost, rep.Server.URL+"/orders/"+id, nil)
				resp, err := rep.Server.Client().Do(req)
				if err == nil {
					resp.Body.Close()
				}
				errc <- err
			}()
			locktest.WaitFor(t, "the request to wait for the key", func() bool { return locktest.Waiters(t, watch, key) == 1 })
			cancel()
			if err := <-errc; !errors.Is(err, context.Canceled) {
				t.Fatalf("client: %v, want context.Canceled", err)
			}
			locktest.WaitFor(t, "the middleware to return", func() bool { return returned.Load() == 1 })
			if ran.Load() {
				t.Fatal("the handler ran without the lock")
			}
			if err, _ := ended.Load().(error); !errors.Is(err, a.Errors.RequestEnded) || !errors.Is(err, pglock.ErrNotAcquired) {
				t.Fatalf("the middleware returned %v, want ErrRequestEnded and pglock.ErrNotAcquired", err)
			}
			if n := locktest.Waiters(t, watch, key); n != 0 {
				t.Fatalf("%d sessions still wait for the key", n)
			}
			locktest.NoConnsLeft(t, rep.Pool)
			if err := held.Release(context.Background()); err != nil {
				t.Fatal(err)
			}
			pgtest.WaitFree(t, watch, key)
			if r := post(rep, id); r.Status != http.StatusOK || !ran.Load() {
				t.Fatalf("request after the holder left: %+v, ran %v", r, ran.Load())
			}
			pgtest.WaitFree(t, watch, key)
			locktest.NoConnsLeft(t, rep.Pool)
		})
	}
}

// waitLimit: a request that waits longer than Wait gets the busy answer,
// with Retry-After rounded up to whole seconds.
func (s *suite[C]) waitLimit(t *testing.T) {
	id := uniqueID(t)
	rep := s.replica(t, config[C]{Wait: 300 * time.Millisecond, RetryAfter: 2500 * time.Millisecond}, App{},
		func(C) error { t.Error("handler ran"); return nil })
	key := s.lockKey(t, rep.Locker, id)
	locktest.HoldElsewhere(t, key)
	start := time.Now()
	r := post(rep, id)
	if took := time.Since(start); took < 250*time.Millisecond || took > 5*time.Second {
		t.Fatalf("busy answer after %v, want about 300ms", took)
	}
	if r.Status != http.StatusConflict || r.RetryAfter != "3" {
		t.Fatalf("%+v, want 409 with Retry-After 3", r)
	}
	watch := pgtest.Pool(t, 2)
	if n := locktest.Waiters(t, watch, key); n != 0 {
		t.Fatalf("%d sessions still wait", n)
	}
	locktest.NoConnsLeft(t, rep.Pool)
}
