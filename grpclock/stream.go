package grpclock

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"

	"github.com/pglockkit/kit/pglock"
)

func (ic *interceptor) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !ic.cfg.selected(info.FullMethod) {
		return handler(srv, ss)
	}
	if ic.cfg.streamKeyFunc != nil {
		return ic.streamKeyedUpFront(srv, ss, info.FullMethod, handler)
	}
	return ic.streamKeyedByFirstMessage(srv, ss, info.FullMethod, handler)
}

// streamKeyedUpFront locks before the handler runs, with the key of
// WithStreamKeyFunc: the lock covers the whole handler, as for a unary call.
func (ic *interceptor) streamKeyedUpFront(srv any, ss grpc.ServerStream, fullMethod string, handler grpc.StreamHandler) error {
	ctx := ss.Context()
	key, ok, err := ic.cfg.streamKeyFunc(ctx, fullMethod)
	key, ok, err = ic.checkKey(fullMethod, key, ok, err)
	if err != nil {
		return err
	}
	if !ok {
		return handler(srv, ss)
	}
	var (
		herr error
		ran  bool
	)
	err = ic.do(ctx, key, func(ctx context.Context) error {
		ran = true
		herr = handler(srv, &contextStream{ServerStream: ss, ctx: ctx})
		return herr
	})
	return ic.outcome(ctx, fullMethod, key, ran, herr, err)
}

// contextStream is a ServerStream with the lock's context (its transaction,
// its cancellation on a lost lock).
type contextStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *contextStream) Context() context.Context { return s.ctx }

// errPanicked stands for the handler's error when it panicked.
var errPanicked = errors.New("grpclock: handler panicked")

// streamKeyedByFirstMessage runs the handler on a stream that takes the
// lock when the first message arrives, and ends the lock when the handler
// returns or panics.
func (ic *interceptor) streamKeyedByFirstMessage(srv any, ss grpc.ServerStream, fullMethod string, handler grpc.StreamHandler) error {
	base := ss.Context()
	cctx, cancel := context.WithCancelCause(base)
	defer cancel(nil)
	s := &firstMessageStream{
		ServerStream: ss,
		ic:           ic,
		method:       fullMethod,
		ctx:          &streamContext{Context: cctx},
		cancel:       cancel,
	}
	panicked := true
	defer func() {
		if panicked {
			// Roll back and release; the panic goes on up the stack.
			_ = s.end(base, errPanicked)
		}
	}()
	herr := handler(srv, s)
	panicked = false
	return s.end(base, herr)
}

type streamState int

const (
	awaitingFirst streamState = iota // no message received yet
	locked                           // the first message had a key: held
	unkeyed                          // the first message had no key
	failed                           // the key or the lock failed: err
	ended                            // the handler returned
)

// firstMessageStream takes the lock on the key of the first message the
// handler receives, before handing the message over.
type firstMessageStream struct {
	grpc.ServerStream
	ic     *interceptor
	method string
	ctx    *streamContext
	cancel context.CancelCauseFunc

	mu        sync.Mutex
	state     streamState
	err       error // the status error of a failed stream, returned again
	lock      *pglock.Lock
	key       string
	stopWatch func()
}

// Context returns the stream's context: once the lock is held it carries
// the lock's transaction (in Transaction scope) and fencing token (with a
// Locker made WithToken), and it is cancelled with cause pglock.ErrLockLost
// if a session lock is lost.
func (s *firstMessageStream) Context() context.Context { return s.ctx }

// RecvMsg receives a message; the first one is handed over only once its
// key is locked. When the key function or the lock fails, RecvMsg returns
// the status error for the client, and so does every later RecvMsg and
// SendMsg.
func (s *firstMessageStream) RecvMsg(m any) error {
	s.mu.Lock()
	state, ferr := s.state, s.err
	s.mu.Unlock()
	if ferr != nil {
		return ferr
	}
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if state != awaitingFirst {
		return nil
	}
	return s.lockFor(m)
}

// SendMsg sends a message, unless the stream failed to lock.
func (s *firstMessageStream) SendMsg(m any) error {
	s.mu.Lock()
	ferr := s.err
	s.mu.Unlock()
	if ferr != nil {
		return ferr
	}
	return s.ServerStream.SendMsg(m)
}

func (s *firstMessageStream) lockFor(m any) error {
	ctx := s.ServerStream.Context()
	key, ok, err := s.ic.keyOf(ctx, s.method, m)
	if err != nil {
		return s.fail(err)
	}
	if !ok {
		s.mu.Lock()
		if s.state == awaitingFirst {
			s.state = unkeyed
		}
		s.mu.Unlock()
		return nil
	}
	l, err := s.ic.newLock(key)
	if err == nil {
		if s.ic.cfg.wait > 0 {
			err = l.Acquire(ctx)
		} else {
			var held bool
			held, err = l.TryAcquire(ctx)
			if err == nil && !held {
				err = errBusy
			}
		}
	}
	if err != nil {
		return s.fail(s.ic.notAcquired(ctx, s.method, key, err))
	}
	// The handler's nested Do of the key runs in this hold (see
	// pglock.ContextWithHold).
	lctx := pglock.ContextWithHold(s.ctx.Context, l)
	if tx := l.Tx(); tx != nil {
		lctx = pglock.ContextWithTx(lctx, tx)
	} else if tx := l.SQLTx(); tx != nil {
		lctx = pglock.ContextWithSQLTx(lctx, tx)
	}
	if token := l.Token(); token != 0 {
		lctx = pglock.ContextWithToken(lctx, token)
	}
	s.ctx.setLocked(lctx)
	stop := watchLost(l, s.cancel)
	s.mu.Lock()
	if s.state == ended {
		// The handler returned meanwhile (from another goroutine): nobody
		// will end this hold but us.
		s.mu.Unlock()
		stop()
		_ = l.HandleError(ctx, errPanicked)
		_ = l.Release(ctx)
		return context.Canceled
	}
	s.state, s.lock, s.key, s.stopWatch = locked, l, key, stop
	s.mu.Unlock()
	return nil
}

func (s *firstMessageStream) fail(err error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == awaitingFirst {
		s.state, s.err = failed, err
	}
	return err
}

// end ends the hold, if any, when the handler has returned herr: commit on
// nil, roll back otherwise. It returns the stream's error for the client.
func (s *firstMessageStream) end(ctx context.Context, herr error) error {
	s.mu.Lock()
	l, key, stop, ferr := s.lock, s.key, s.stopWatch, s.err
	s.state, s.lock, s.stopWatch = ended, nil, nil
	s.mu.Unlock()
	if ferr != nil {
		// The key or the lock failed, so the handler never ran under the
		// lock: that status is the call's, whatever the handler made of it
		// (wrapped in another code, or ignored).
		if herr != nil && herr != ferr && herr != errPanicked {
			s.ic.log(slog.LevelDebug, "grpclock: handler's error replaced by the lock's status", s.method, "", herr)
		}
		return ferr
	}
	if l == nil {
		return herr
	}
	stop()
	var err error
	if herr != nil {
		err = l.HandleError(ctx, herr)
		if rerr := l.Release(ctx); rerr != nil {
			err = errors.Join(err, rerr)
		}
	} else {
		err = l.Release(ctx)
	}
	return s.ic.outcome(ctx, s.method, key, true, herr, err)
}

// watchLost cancels the handler's context with cause pglock.ErrLockLost when
// the hold is lost. The returned stop ends the watch.
func watchLost(l *pglock.Lock, cancel context.CancelCauseFunc) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	lost := l.Lost()
	wg.Go(func() {
		select {
		case <-lost:
			cancel(pglock.ErrLockLost)
		case <-done:
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}

// streamContext is the context of a firstMessageStream. The handler may
// take it before the lock is held; once it is, Value answers from the
// lock's context too, so that pglock.TxFromContext finds the transaction.
type streamContext struct {
	context.Context
	locked atomic.Pointer[lockedContext]
}

type lockedContext struct{ ctx context.Context }

func (c *streamContext) setLocked(ctx context.Context) {
	c.locked.Store(&lockedContext{ctx: ctx})
}

// Value looks key up in the lock's context once the lock is held, else in
// the stream's.
func (c *streamContext) Value(key any) any {
	if lc := c.locked.Load(); lc != nil {
		return lc.ctx.Value(key)
	}
	return c.Context.Value(key)
}
