package grpclock_test

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/pglockkit/kit/grpclock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Two replicas (two Lockers on two pools) that wait for the lock: 20
// concurrent calls with one key all succeed and never overlap.
func TestUnarySameKeyWaitNeverOverlaps(t *testing.T) {
	t.Parallel()
	w := newWorker()
	a := startReplica(t, w, nil, grpclock.WithWait(60*time.Second))
	b := startReplica(t, w, nil, grpclock.WithWait(60*time.Second))
	key := pgtest.UniqueKey(t)

	const calls = 20
	errs := make([]error, calls)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range calls {
		r := a
		if i%2 == 1 {
			r = b
		}
		wg.Go(func() {
			<-start
			_, errs[i] = r.work(t.Context(), &workRequest{Key: key, Sleep: 20 * time.Millisecond})
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("call %d: %v", i, err)
		}
	}
	if got := w.ran.Load(); got != calls {
		t.Errorf("handler ran %d times, want %d", got, calls)
	}
	if got := w.maxOverlap(key); got != 1 {
		t.Errorf("max overlap %d, want 1", got)
	}
	pgtest.WaitFree(t, a.pool, lockKey(t, a, key))
}

// Fail-fast (the default): of 20 concurrent calls with one key, the ones
// that find the key locked get codes.Aborted; the others never overlap.
func TestUnarySameKeyFailFastAborted(t *testing.T) {
	t.Parallel()
	w := newWorker()
	a := startReplica(t, w, nil)
	b := startReplica(t, w, nil)
	key := pgtest.UniqueKey(t)

	const calls = 20
	errs := make([]error, calls)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range calls {
		r := a
		if i%2 == 1 {
			r = b
		}
		wg.Go(func() {
			<-start
			_, errs[i] = r.work(t.Context(), &workRequest{Key: key, Sleep: 300 * time.Millisecond})
		})
	}
	close(start)
	wg.Wait()
	var ok, aborted int
	for i, err := range errs {
		switch codeOf(err) {
		case codes.OK:
			ok++
		case codes.Aborted:
			aborted++
		default:
			t.Errorf("call %d: %v (want OK or Aborted)", i, err)
		}
	}
	t.Logf("%d ran, %d aborted", ok, aborted)
	if ok < 1 || aborted < 1 {
		t.Errorf("%d ran and %d aborted: want both at least 1", ok, aborted)
	}
	if got := int(w.ran.Load()); got != ok {
		t.Errorf("handler ran %d times, %d calls succeeded", got, ok)
	}
	if got := w.maxOverlap(key); got != 1 {
		t.Errorf("max overlap %d, want 1", got)
	}
	pgtest.WaitFree(t, a.pool, lockKey(t, a, key))
}

// Calls with different keys do not wait for each other.
func TestUnaryDifferentKeysRunInParallel(t *testing.T) {
	t.Parallel()
	w := newWorker()
	a := startReplica(t, w, nil)
	b := startReplica(t, w, nil)

	const calls = 6
	errs := make([]error, calls)
	var wg sync.WaitGroup
	for i := range calls {
		r := a
		if i%2 == 1 {
			r = b
		}
		key := pgtest.UniqueKey(t)
		wg.Go(func() {
			_, errs[i] = r.work(t.Context(), &workRequest{Key: key, Sleep: 500 * time.Millisecond})
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("call %d: %v", i, err)
		}
	}
	if got := w.maxAll.Load(); got < 2 {
		t.Errorf("at most %d calls ran at once, want > 1", got)
	}
}

// A request with no key, and a method not in WithMethods, pass through:
// no lock, so no transaction in the handler's context.
func TestUnaryPassThrough(t *testing.T) {
	t.Parallel()
	w := newWorker()
	tx := []pglock.Option{pglock.WithScope(pglock.Transaction)}
	r := startReplica(t, w, tx)
	resp, err := r.work(t.Context(), &workRequest{Key: pgtest.UniqueKey(t)})
	if err != nil || !resp.HasTx {
		t.Fatalf("keyed call: has tx %v, err %v; want a transaction", resp.HasTx, err)
	}
	resp, err = r.work(t.Context(), &workRequest{})
	if err != nil || resp.HasTx {
		t.Fatalf("call without key: has tx %v, err %v; want no transaction", resp.HasTx, err)
	}

	other := startReplica(t, w, tx, grpclock.WithMethods("/other.Service/"))
	resp, err = other.work(t.Context(), &workRequest{Key: pgtest.UniqueKey(t)})
	if err != nil || resp.HasTx {
		t.Fatalf("call to an unselected method: has tx %v, err %v; want no transaction", resp.HasTx, err)
	}
	for _, methods := range [][]string{{"/other.Service/", methodWork}, {"/grpclock.test.Worker/"}} {
		selected := startReplica(t, w, tx, grpclock.WithMethods(methods...))
		resp, err = selected.work(t.Context(), &workRequest{Key: pgtest.UniqueKey(t)})
		if err != nil || !resp.HasTx {
			t.Fatalf("call to a method selected by %q: has tx %v, err %v; want a transaction", methods, resp.HasTx, err)
		}
	}
}

// A key function's error is InvalidArgument; so is an empty key with ok.
func TestUnaryKeyFuncError(t *testing.T) {
	t.Parallel()
	w := newWorker()
	r := startReplica(t, w, nil, grpclock.WithKeyFunc(func(_ context.Context, _ string, req any) (string, bool, error) {
		k := req.(*workRequest).Key
		if k == "bad" {
			return "", false, context.Canceled // any error
		}
		return k, true, nil
	}))
	if _, err := r.work(t.Context(), &workRequest{Key: "bad"}); codeOf(err) != codes.InvalidArgument {
		t.Errorf("key function error: %v, want InvalidArgument", err)
	}
	if _, err := r.work(t.Context(), &workRequest{Key: ""}); codeOf(err) != codes.InvalidArgument {
		t.Errorf("empty key with ok: %v, want InvalidArgument", err)
	}
	if w.ran.Load() != 0 {
		t.Errorf("handler ran %d times, want 0", w.ran.Load())
	}
}

// holdKey holds the interceptors' lock on key from outside any server, on
// a pool of its own, until the test ends or release is called.
func holdKey(t *testing.T, key string) (k pglock.Key, release func()) {
	t.Helper()
	p := pgtest.Pool(t, 2)
	l, err := pglock.NewLock(p, grpclock.DefaultNamespace+key)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(t.Context()); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	release = func() {
		once.Do(func() {
			if err := l.Release(context.Background()); err != nil {
				t.Error(err)
			}
		})
	}
	t.Cleanup(release)
	return l.Key(), release
}

// A busy key waits up to WithWait's limit, then gets the busy code; the
// code is configurable.
func TestUnaryWaitLimitAndBusyCode(t *testing.T) {
	t.Parallel()
	w := newWorker()
	r := startReplica(t, w, nil, grpclock.WithWait(300*time.Millisecond), grpclock.WithBusyCode(codes.ResourceExhausted))
	key := pgtest.UniqueKey(t)
	// A first call opens the Locker's connections: on a loaded machine that
	// alone can outlast the 300 ms limit, and a wait cut short while the
	// connection is opened is Unavailable, not busy.
	if _, err := r.work(t.Context(), &workRequest{Key: key + "-warm"}); err != nil {
		t.Fatal(err)
	}
	warm := w.ran.Load()
	k, release := holdKey(t, key)

	start := time.Now()
	_, err := r.work(t.Context(), &workRequest{Key: key})
	waited := time.Since(start)
	if codeOf(err) != codes.ResourceExhausted {
		t.Fatalf("busy call: %v, want ResourceExhausted", err)
	}
	if waited < 300*time.Millisecond {
		t.Errorf("busy call failed after %v, before the 300ms wait limit", waited)
	}

	// The call's deadline, shorter than the limit, ends the wait first.
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	if _, err := r.work(ctx, &workRequest{Key: key}); codeOf(err) != codes.DeadlineExceeded {
		t.Fatalf("call with a short deadline: %v, want DeadlineExceeded", err)
	}
	if n := w.ran.Load() - warm; n != 0 {
		t.Errorf("handler ran %d times on the busy key, want 0", n)
	}
	// The client gives up at its deadline; the server stops waiting at the
	// same deadline and then cleans up: its wait (on one of the Locker's
	// waiting connections, not a pool connection) is cancelled in the server.
	// Wait for that, so that the server cannot be granted the lock released
	// below as its cancel arrives (it would give it back at once, but a
	// 300ms limit is short on a busy machine).
	waitFor(t, "the server's wait to leave pg_locks", func() bool {
		hs, err := pgtest.Holders(t.Context(), r.pool, k)
		return err == nil && len(hs) == 1
	})
	waitFor(t, "the server's pool to have no acquired connection", func() bool {
		return r.pool.Stat().AcquiredConns() == 0
	})
	release()
	if _, err := r.work(t.Context(), &workRequest{Key: key}); err != nil {
		hs, _ := pgtest.Holders(context.Background(), r.pool, k)
		t.Fatalf("call after release: %v (pg_locks: %+v, server pool: %d acquired)", err, hs, r.pool.Stat().AcquiredConns())
	}
	pgtest.WaitFree(t, r.pool, k)
}

// A client that cancels while its call waits for the lock leaves nothing
// behind: no waiter or holder in pg_locks, no connection taken from the
// server's pool. Unary calls and streams alike.
func TestCancelWhileWaiting(t *testing.T) {
	t.Parallel()
	w := newWorker()
	r := startReplica(t, w, nil, grpclock.WithWait(time.Minute))
	for _, kind := range []struct {
		name string
		call func(ctx context.Context, req *workRequest) (*workResponse, error)
	}{
		{"unary", r.work},
		{"stream", func(ctx context.Context, req *workRequest) (*workResponse, error) { return r.stream(ctx, req) }},
	} {
		t.Run(kind.name, func(t *testing.T) {
			key := pgtest.UniqueKey(t)
			k, release := holdKey(t, key)

			ctx, cancel := context.WithCancel(t.Context())
			errc := make(chan error, 1)
			go func() {
				_, err := kind.call(ctx, &workRequest{Key: key})
				errc <- err
			}()
			waitFor(t, "the call waiting in pg_locks", func() bool {
				hs, err := pgtest.Holders(t.Context(), r.pool, k)
				return err == nil && len(hs) == 2 && !hs[1].Granted
			})
			cancel()
			if err := <-errc; codeOf(err) != codes.Canceled {
				t.Fatalf("cancelled call: %v, want Canceled", err)
			}
			// The server's wait runs on one of its Locker's waiting
			// connections (not a pool connection) and is cancelled in the
			// server with a cancel request, which lands a moment after the
			// call has returned: wait for it, while the key is still held
			// outside (a wait that was not cancelled would stay).
			cancelled := time.Now()
			waitFor(t, "the server's wait to leave pg_locks", func() bool {
				hs, err := pgtest.Holders(t.Context(), r.pool, k)
				return err == nil && len(hs) == 1
			})
			t.Logf("the wait left pg_locks %v after the call returned", time.Since(cancelled).Round(time.Millisecond))
			waitFor(t, "the server's pool to have no acquired connection", func() bool {
				return r.pool.Stat().AcquiredConns() == 0
			})
			hs, err := pgtest.Holders(t.Context(), r.pool, k)
			if err != nil {
				t.Fatal(err)
			}
			if len(hs) != 1 || !hs[0].Granted {
				t.Fatalf("pg_locks after the cancel: %+v, want only the outside holder", hs)
			}
			if w.ran.Load() != 0 {
				t.Errorf("handler ran %d times, want 0", w.ran.Load())
			}
			release()
			pgtest.WaitFree(t, r.pool, k)
		})
	}
}

// waitFor polls cond for up to 10 seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A database that fails while the lock is taken is Unavailable; the
// handler does not run.
//
// The database is a port where nothing listens (pgtest.UnreachablePool).
func TestUnaryDatabaseErrorUnavailable(t *testing.T) {
	t.Parallel()
	w := newWorker()
	r := startReplicaOn(t, pgtest.UnreachablePool(t), w, nil)
	if _, err := r.work(t.Context(), &workRequest{Key: pgtest.UniqueKey(t)}); codeOf(err) != codes.Unavailable {
		t.Fatalf("call on an unreachable database: %v, want Unavailable", err)
	}
	if _, err := r.stream(t.Context(), &workRequest{Key: pgtest.UniqueKey(t)}); codeOf(err) != codes.Unavailable {
		t.Fatalf("stream on an unreachable database: %v, want Unavailable", err)
	}
	if w.ran.Load() != 0 {
		t.Errorf("handler ran %d times, want 0", w.ran.Load())
	}
}

// WithLogger logs what the client cannot be told in detail.
func TestUnaryLogger(t *testing.T) {
	t.Parallel()
	var buf syncBuffer
	logger := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	w := newWorker()
	r := startReplica(t, w, nil, grpclock.WithLogger(logger))
	key := pgtest.UniqueKey(t)
	_, release := holdKey(t, key)
	defer release()
	if _, err := r.work(t.Context(), &workRequest{Key: key}); codeOf(err) != codes.Aborted {
		t.Fatalf("busy call: %v, want Aborted", err)
	}
	out := buf.String()
	for _, want := range []string{`msg="grpclock: busy"`, "method=" + methodWork, "key=" + grpclock.DefaultNamespace + key} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
