package echosuite

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// lostLockCancelsRequest: in Session scope, when the lock's connection dies
// while the handler runs, the request's context is cancelled with cause
// pglock.ErrLockLost.
func (s *suite[C]) lostLockCancelsRequest(t *testing.T) {
	a := s.a
	watch := pgtest.Pool(t, 2)
	inside := make(chan struct{})
	var cause error
	rep := s.replica(t, config[C]{}, App{}, func(c C) error {
		ctx := a.Request(c).Context()
		close(inside)
		select {
		case <-ctx.Done():
			cause = context.Cause(ctx)
		case <-time.After(10 * time.Second):
		}
		return nil
	})
	id := uniqueID(t)
	key := s.lockKey(t, rep.Locker, id)
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

// sessionPanic: in Session scope a panicking handler's lock is released and
// the panic raised again (for Echo's Recover middleware, outside).
func (s *suite[C]) sessionPanic(t *testing.T) {
	watch := pgtest.Pool(t, 2)
	rep := s.replica(t, config[C]{}, App{}, func(C) error { panic("boom") })
	id := uniqueID(t)
	var recovered any
	func() {
		defer func() { recovered = recover() }()
		rep.e.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/orders/"+id, nil))
	}()
	if recovered != "boom" {
		t.Fatalf("recovered %v, want the handler's panic", recovered)
	}
	pgtest.WaitFree(t, watch, s.lockKey(t, rep.Locker, id))
	locktest.NoConnsLeft(t, rep.Pool)
}
