package grpclock_test

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/pglockkit/kit/grpclock"
	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/pglock/pglocktest"
)

// gate is a service whose calls run until the test lets them go (or their
// context ends), so that the test decides when a lock is held.
type gate struct {
	running locktest.Overlap
	entered chan struct{}
	release chan struct{}
	causes  chan error // why a call's context ended, when it did
}

const methodGate = "/grpclock.test.Gate/Enter"

// enter is the handler: it answers when released, and also when its
// context ends (the work it did stands, as a handler's that does not check
// its context would).
func (g *gate) enter(ctx context.Context, _ *workRequest) (*workResponse, error) {
	g.running.Enter()
	defer g.running.Leave()
	g.entered <- struct{}{}
	select {
	case <-g.release:
	case <-ctx.Done():
		g.causes <- context.Cause(ctx)
	}
	return &workResponse{}, nil
}

var gateDesc = grpc.ServiceDesc{
	ServiceName: "grpclock.test.Gate",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Enter",
		Handler: func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
			req := new(workRequest)
			if err := dec(req); err != nil {
				return nil, err
			}
			h := func(ctx context.Context, req any) (any, error) { return srv.(*gate).enter(ctx, req.(*workRequest)) }
			return ic(ctx, req, &grpc.UnaryServerInfo{Server: srv, FullMethod: methodGate}, h)
		},
	}},
}

// newDoubleReplica starts a server of the gate (and of a worker, for its
// stream) with the interceptors on a Locker on srv: one replica, with no
// pool.
func newDoubleReplica(t *testing.T, srv *pglocktest.Server, g *gate, opts ...grpclock.Option) *replica {
	t.Helper()
	lk, err := pglocktest.NewLocker(srv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	unary, err := grpclock.UnaryServerInterceptor(lk, opts...)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := grpclock.StreamServerInterceptor(lk, opts...)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(grpc.ChainUnaryInterceptor(recoverUnary, unary), grpc.ChainStreamInterceptor(recoverStream, stream))
	s.RegisterService(&gateDesc, g)
	s.RegisterService(&workerDesc, newWorker())
	return &replica{locker: lk, conn: serve(t, s)}
}

// enter calls the gate with key; the client gives up after 5 s (a handler
// that runs when it should not ends then, and the test fails, not hangs).
func (r *replica) enter(key string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return r.conn.Invoke(ctx, methodGate, &workRequest{Key: key}, new(workResponse))
}

// grpclock on pglocktest's in-memory double, unchanged: two calls of one
// key on two replicas that wait run one after the other; a key held
// elsewhere is codes.Aborted at once for a unary call and for a stream; a
// database error is codes.Unavailable; and a lock lost while the handler
// runs cancels its context with cause pglock.ErrLockLost, its response
// stands (Session scope) and the failed release is logged at Warn.
func TestOnDouble(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	var logs locktest.SlogRecords
	g := &gate{entered: make(chan struct{}, 4), release: make(chan struct{}), causes: make(chan error, 4)}
	wait := []grpclock.Option{grpclock.WithWait(10 * time.Second), grpclock.WithLogger(logs.Logger())}
	a := newDoubleReplica(t, srv, g, wait...)
	b := newDoubleReplica(t, srv, g, wait...)
	failFast := newDoubleReplica(t, srv, g, grpclock.WithLogger(logs.Logger()))
	key := locktest.Key(t, a.locker, grpclock.DefaultNamespace+"account:42")

	// Two calls for account 42, one per replica: the second waits in the
	// server's queue until the first has returned.
	errs := make(chan error, 2)
	var wg sync.WaitGroup
	for _, r := range []*replica{a, b} {
		wg.Go(func() { errs <- r.enter("account:42") })
	}
	<-g.entered
	locktest.WaitFor(t, "the second call to wait", func() bool { return len(srv.Waiters(key)) == 1 })
	g.release <- struct{}{}
	<-g.entered
	g.release <- struct{}{}
	wg.Wait()
	if e1, e2 := <-errs, <-errs; e1 != nil || e2 != nil || g.running.Max() != 1 {
		t.Fatalf("calls: %v, %v; at most %d handlers at once (want nil, nil, 1)", e1, e2, g.running.Max())
	}

	// Held by another replica: a call that does not wait is Aborted, a
	// unary call and a stream keyed by its first message alike.
	let := srv.HoldElsewhere(key)
	err := failFast.enter("account:42")
	streamResp, streamErr := failFast.stream(t.Context(), &workRequest{Key: "account:42"})
	let()
	if codeOf(err) != codes.Aborted || codeOf(streamErr) != codes.Aborted {
		t.Fatalf("key held elsewhere: unary %v, stream %v, %v; want Aborted", err, streamResp, streamErr)
	}
	srv.BusyNext(key)
	if err := failFast.enter("account:42"); codeOf(err) != codes.Aborted {
		t.Fatalf("key made busy by BusyNext: %v, want Aborted", err)
	}

	// The database fails while the lock is taken: Unavailable, and the
	// handler does not run.
	srv.FailNext(key, pglock.ErrUnavailable)
	if err := a.enter("account:42"); codeOf(err) != codes.Unavailable {
		t.Fatalf("database error: %v, want Unavailable", err)
	}
	if len(g.entered) != 0 {
		t.Fatal("a handler ran without its lock")
	}

	// Lost while the handler runs: its context ends with cause ErrLockLost.
	done := make(chan error, 1)
	go func() { done <- b.enter("account:42") }()
	<-g.entered
	if n := srv.Lose(key); n != 1 {
		t.Fatalf("Lose = %d, want 1", n)
	}
	if cause := <-g.causes; !errors.Is(cause, pglock.ErrLockLost) {
		t.Fatalf("the handler's context ended with %v, want pglock.ErrLockLost", cause)
	}
	if err := <-done; err != nil {
		t.Fatalf("the call whose lock was lost: %v, want its handler's response", err)
	}
	warned := logs.Errors(slog.LevelWarn, "grpclock: release failed")
	if len(warned) != 1 || !errors.Is(warned[0], pglock.ErrLockLost) {
		t.Fatalf("Warn logs of the failed release: %v, want one matching pglock.ErrLockLost", warned)
	}
	if keys := srv.Keys(); len(keys) != 0 {
		t.Fatalf("keys left: %v", keys)
	}
}
