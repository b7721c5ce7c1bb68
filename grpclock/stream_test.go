package grpclock_test

import (
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/pglockkit/kit/grpclock"
	"github.com/pglockkit/kit/internal/pgtest"
)

// Two streams with the same key, on two replicas, run one after the other:
// the lock, taken on the first message, spans the rest of the stream.
func TestStreamSameKeySerializes(t *testing.T) {
	t.Parallel()
	for _, mode := range []struct {
		name string
		opts []grpclock.Option
		md   bool
	}{
		{"first-message", nil, false},
		{"metadata", []grpclock.Option{grpclock.WithStreamKeyFunc(grpclock.MetadataKey("x-lock-key"))}, true},
	} {
		t.Run(mode.name, func(t *testing.T) {
			t.Parallel()
			w := newWorker()
			opts := append([]grpclock.Option{grpclock.WithWait(time.Minute)}, mode.opts...)
			a := startReplica(t, w, nil, opts...)
			b := startReplica(t, w, nil, opts...)
			key := pgtest.UniqueKey(t)
			var md []string
			if mode.md {
				md = []string{"x-lock-key", key}
			}

			const streams = 4
			errs := make([]error, streams)
			var wg sync.WaitGroup
			start := time.Now()
			for i := range streams {
				r := a
				if i%2 == 1 {
					r = b
				}
				wg.Go(func() {
					_, errs[i] = r.stream(t.Context(), &workRequest{Key: key, Sleep: 200 * time.Millisecond}, md...)
				})
			}
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Errorf("stream %d: %v", i, err)
				}
			}
			if got := w.ran.Load(); got != streams {
				t.Errorf("handler ran %d times, want %d", got, streams)
			}
			if got := w.maxOverlap(key); got != 1 {
				t.Errorf("max overlap %d, want 1", got)
			}
			if d := time.Since(start); d < streams*200*time.Millisecond {
				t.Errorf("%d streams of 200ms took %v: they overlapped", streams, d)
			}
			pgtest.WaitFree(t, a.pool, lockKey(t, a, key))
		})
	}
}

// Fail-fast on a stream: the second stream's first receive fails, and the
// client gets Aborted.
func TestStreamBusyAborted(t *testing.T) {
	t.Parallel()
	w := newWorker()
	r := startReplica(t, w, nil)
	key := pgtest.UniqueKey(t)
	k, release := holdKey(t, key)
	if _, err := r.stream(t.Context(), &workRequest{Key: key}); codeOf(err) != codes.Aborted {
		t.Fatalf("stream on a busy key: %v, want Aborted", err)
	}
	if w.ran.Load() != 0 {
		t.Errorf("handler ran %d times, want 0", w.ran.Load())
	}
	release()
	if _, err := r.stream(t.Context(), &workRequest{Key: key}); err != nil {
		t.Fatalf("stream after release: %v", err)
	}
	if _, err := r.stream(t.Context(), &workRequest{}); err != nil {
		t.Fatalf("stream without a key: %v", err)
	}
	pgtest.WaitFree(t, r.pool, k)
}
