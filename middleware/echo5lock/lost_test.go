package echo5lock_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/labstack/echo/v5"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/echo5lock"
	"github.com/pglockkit/kit/pglock"
)

// TestLostLockCancelsRequest: in Session scope, when the lock's connection
// dies while the handler runs, the request's context is cancelled with cause
// pglock.ErrLockLost.
func TestLostLockCancelsRequest(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	inside := make(chan struct{})
	var cause error
	rep := newReplica(t, echo5lock.Config{}, func(c *echo.Context) error {
		close(inside)
		select {
		case <-c.Request().Context().Done():
			cause = context.Cause(c.Request().Context())
		case <-time.After(10 * time.Second):
		}
		return nil
	})
	id := pgtest.UniqueKey(t)
	key := lockKey(t, rep.Locker, id)
	done := make(chan struct{})
	go func() {
		defer close(done)
		rep.e.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/orders/"+id, nil))
	}()
	<-inside
	hs := pgtest.Granted(t, watch, key)
	if len(hs) != 1 {
		t.Fatalf("holders = %+v", hs)
	}
	pgtest.Terminate(t, watch, hs[0].PID)
	<-done
	if !errors.Is(cause, pglock.ErrLockLost) {
		t.Fatalf("request context cause = %v, want pglock.ErrLockLost", cause)
	}
	pgtest.WaitFree(t, watch, key)
	locktest.NoConnsLeft(t, rep.Pool)
}

// TestSessionPanic: in Session scope a panicking handler's lock is released
// and the panic raised again (for Echo's Recover middleware, outside).
func TestSessionPanic(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	rep := newReplica(t, echo5lock.Config{}, func(*echo.Context) error { panic("boom") })
	id := pgtest.UniqueKey(t)
	var recovered any
	func() {
		defer func() { recovered = recover() }()
		rep.e.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/orders/"+id, nil))
	}()
	if recovered != "boom" {
		t.Fatalf("recovered %v, want the handler's panic", recovered)
	}
	pgtest.WaitFree(t, watch, lockKey(t, rep.Locker, id))
	locktest.NoConnsLeft(t, rep.Pool)
}
