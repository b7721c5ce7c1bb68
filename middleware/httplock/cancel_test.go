package httplock_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
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
			rep := newReplica(t, 2)
			watch := pgtest.Pool(t, 2)
			holderPool := pgtest.Pool(t, 1)
			key := lockKey(t, rep.locker, id)
			hl, err := pglock.NewLock(holderPool, key)
			if err != nil {
				t.Fatal(err)
			}
			if err := hl.Acquire(ctx); err != nil {
				t.Fatal(err)
			}

			var ran atomic.Bool
			returned := make(chan struct{}, 1)
			mw := mustMiddleware(t, rep.locker, httplock.Query("id"),
				httplock.WithWait(time.Minute), httplock.WithScope(scope))
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				defer func() { returned <- struct{}{} }()
				mw(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { ran.Store(true) })).ServeHTTP(w, r)
			}))
			defer srv.Close()

			cctx, cancel := context.WithCancel(ctx)
			errc := make(chan error, 1)
			go func() {
				req, _ := http.NewRequestWithContext(cctx, http.MethodPost, srv.URL+"/?id="+id, nil)
				resp, err := srv.Client().Do(req)
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
			select {
			case <-returned:
			case <-time.After(10 * time.Second):
				t.Fatal("the middleware still waits 10 s after the client left")
			}
			if ran.Load() {
				t.Fatal("the handler ran without the lock")
			}
			if n := waiters(t, watch, key); n != 0 {
				t.Fatalf("%d sessions still wait for the key", n)
			}
			noConnsLeft(t, rep.pool)
			if hs := pgtest.Granted(t, watch, key); len(hs) != 1 {
				t.Fatalf("holders = %+v, want only the original holder", hs)
			}
			if err := hl.Release(ctx); err != nil {
				t.Fatal(err)
			}
			pgtest.WaitFree(t, watch, key)
			// The pool's connections are still good: the next request locks.
			resp, err := srv.Client().Post(srv.URL+"/?id="+id, "text/plain", nil)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || !ran.Load() {
				t.Fatalf("request after the holder left: %d, ran %v", resp.StatusCode, ran.Load())
			}
			pgtest.WaitFree(t, watch, key)
			noConnsLeft(t, rep.pool)
		})
	}
}
