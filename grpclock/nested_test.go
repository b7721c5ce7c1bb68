package grpclock_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglockkit/kit/grpclock"
	"github.com/pglockkit/kit/internal/pgtest"
)

// Issue 24: a handler that locks the call's own key with the same Locker
// (Do on the call's context) runs at once in the call's hold, for a unary
// call and for a stream held from its first message (which holds its lock
// without Do: pglock.ContextWithHold); it used to wait for the call's own
// lock until the call's context ended.
func TestHandlerNestedDoOnItsKey(t *testing.T) {
	t.Parallel()
	w := newWorker()
	r := startReplica(t, w, nil, grpclock.WithWait(time.Minute))
	var ran atomic.Int32
	w.nest = func(ctx context.Context, key string) error {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		return r.locker.Do(ctx, grpclock.DefaultNamespace+key, func(context.Context) error { ran.Add(1); return nil })
	}
	key := pgtest.UniqueKey(t)
	if _, err := r.work(t.Context(), &workRequest{Key: key, Nested: true}); err != nil {
		t.Errorf("unary call whose handler locks its key again: %v", err)
	}
	if _, err := r.stream(t.Context(), &workRequest{Key: key, Nested: true}); err != nil {
		t.Errorf("stream whose handler locks its key again: %v", err)
	}
	if n := ran.Load(); n != 2 {
		t.Errorf("the nested Do ran %d times, want 2", n)
	}
}
