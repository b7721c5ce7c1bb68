package httplock_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

// TestLostLockCancelsRequest: in Session scope, when the lock's connection
// dies while the handler runs, the request's context is cancelled with cause
// pglock.ErrLockLost; the pool gets no broken connection back.
func TestLostLockCancelsRequest(t *testing.T) {
	t.Parallel()
	rep := newReplica(t, 2)
	watch := pgtest.Pool(t, 2)
	id := pgtest.UniqueKey(t)
	key := lockKey(t, rep.locker, id)
	inside := make(chan struct{})
	var cause error
	h, err := httplock.Handler(rep.locker, func(*http.Request) (string, bool, error) { return id, true, nil },
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			close(inside)
			select {
			case <-r.Context().Done():
				cause = context.Cause(r.Context())
			case <-time.After(10 * time.Second):
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/", nil))
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
	noConnsLeft(t, rep.pool)
}

// TestSessionPanic: in Session scope a panicking handler's lock is released
// and the panic raised again.
func TestSessionPanic(t *testing.T) {
	t.Parallel()
	rep := newReplica(t, 2)
	watch := pgtest.Pool(t, 2)
	id := pgtest.UniqueKey(t)
	h, err := httplock.Handler(rep.locker, func(*http.Request) (string, bool, error) { return id, true, nil },
		http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic(http.ErrAbortHandler) }))
	if err != nil {
		t.Fatal(err)
	}
	var recovered any
	func() {
		defer func() { recovered = recover() }()
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/", nil))
	}()
	if recovered != http.ErrAbortHandler {
		t.Fatalf("recovered %v, want http.ErrAbortHandler", recovered)
	}
	pgtest.WaitFree(t, watch, lockKey(t, rep.locker, id))
	noConnsLeft(t, rep.pool)
}
