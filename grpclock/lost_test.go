package grpclock_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// When the connection of a held session lock dies, the handler's context
// is cancelled with cause pglock.ErrLockLost: for a unary call and for a
// stream keyed by its first message.
func TestLostLockCancelsHandler(t *testing.T) {
	t.Parallel()
	w := newWorker()
	r := startReplica(t, w, []pglock.Option{pglock.WithLostCheckInterval(100 * time.Millisecond)})
	admin := pgtest.Pool(t, 2)
	for _, kind := range []struct {
		name string
		call func(ctx context.Context, req *workRequest) (*workResponse, error)
	}{
		{"unary", r.work},
		{"stream", func(ctx context.Context, req *workRequest) (*workResponse, error) { return r.stream(ctx, req) }},
	} {
		t.Run(kind.name, func(t *testing.T) {
			key := pgtest.UniqueKey(t)
			k := lockKey(t, r, key)
			errc := make(chan error, 1)
			go func() {
				_, err := kind.call(t.Context(), &workRequest{Key: key, UntilDone: true})
				errc <- err
			}()
			var pid int32
			waitFor(t, "the lock to be held", func() bool {
				hs := pgtest.Granted(t, admin, k)
				if len(hs) == 1 {
					pid = hs[0].PID
				}
				return len(hs) == 1
			})
			pgtest.Terminate(t, admin, pid)
			select {
			case err := <-errc:
				if err == nil || !strings.Contains(err.Error(), pglock.ErrLockLost.Error()) {
					t.Fatalf("call: %v, want the handler to see %v", err, pglock.ErrLockLost)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the handler's context was not cancelled within 5s of the lost connection")
			}
			pgtest.WaitFree(t, admin, k)
		})
	}
}
