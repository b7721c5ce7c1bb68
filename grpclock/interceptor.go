package grpclock

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/pglockkit/kit/pglock"
)

// UnaryServerInterceptor returns an interceptor that runs each unary call
// that has a key (see [Keyer] and [WithKeyFunc]) while holding the advisory
// lock on that key, taken from locker. Calls with the same key, on any
// server that locks through the same database, run one at a time; a call
// that finds its key locked fails with codes.Aborted, or waits (see
// [WithWait]). Calls without a key run as if the interceptor were not there.
//
// A nil locker, or an invalid option, is an error (matching [ErrNilLocker]
// or [ErrInvalidOption]) and no interceptor: check it once at startup.
func UnaryServerInterceptor(locker *pglock.Locker, opts ...Option) (grpc.UnaryServerInterceptor, error) {
	ic, err := newInterceptor(locker, opts)
	if err != nil {
		return nil, err
	}
	return ic.unary, nil
}

// StreamServerInterceptor returns an interceptor that holds the lock on a
// stream's key for the stream's life. By default the key comes from the
// first message the handler receives and the lock is taken before that
// message is handed over; with [WithStreamKeyFunc] it comes from the
// stream's context (its metadata) and the lock is taken before the handler
// starts. See the package documentation for the details. Busy keys, waits
// and errors are as for [UnaryServerInterceptor].
//
// A nil locker, or an invalid option, is an error (matching [ErrNilLocker]
// or [ErrInvalidOption]) and no interceptor.
func StreamServerInterceptor(locker *pglock.Locker, opts ...Option) (grpc.StreamServerInterceptor, error) {
	ic, err := newInterceptor(locker, opts)
	if err != nil {
		return nil, err
	}
	return ic.stream, nil
}

// interceptor holds what both kinds share.
type interceptor struct {
	locker   *pglock.Locker
	cfg      config
	scope    pglock.Scope
	lockOpts []pglock.Option
}

func newInterceptor(locker *pglock.Locker, opts []Option) (*interceptor, error) {
	if locker == nil {
		return nil, ErrNilLocker
	}
	if !locker.Pooled() {
		// Calls run concurrently: each hold needs a connection of its own.
		return nil, fmt.Errorf("%w: the Locker is on one connection or transaction; give it a pool (*pgxpool.Pool or *sql.DB)", ErrInvalidOption)
	}
	cfg := defaultConfig()
	for _, o := range opts {
		if o == nil {
			cfg.invalid("nil Option")
			continue
		}
		o(&cfg)
	}
	if err := errors.Join(cfg.errs...); err != nil {
		return nil, err
	}
	ic := &interceptor{locker: locker, cfg: cfg, scope: locker.Scope()}
	// The handler's error always rolls back the lock's transaction, whatever
	// the Locker says: the interceptor commits only a call that succeeded.
	ic.lockOpts = append(ic.lockOpts, pglock.WithRollbackOnError(true))
	if cfg.scopeSet {
		ic.scope = cfg.scope
		ic.lockOpts = append(ic.lockOpts, pglock.WithScope(cfg.scope))
	}
	if cfg.wait > 0 {
		ic.lockOpts = append(ic.lockOpts, pglock.WithWait(cfg.wait))
	}
	// Make one lock now, so that options that do not fit the Locker (Session
	// scope on a Locker made on a transaction) fail here and not per call.
	// This does not talk to the database.
	if _, err := locker.NewLock("grpclock:probe", ic.lockOpts...); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidOption, err)
	}
	return ic, nil
}

func (ic *interceptor) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if !ic.cfg.selected(info.FullMethod) {
		return handler(ctx, req)
	}
	key, ok, err := ic.keyOf(ctx, info.FullMethod, req)
	if err != nil {
		return nil, err
	}
	if !ok {
		return handler(ctx, req)
	}
	var (
		resp any
		herr error
		ran  bool
	)
	err = ic.do(ctx, key, func(ctx context.Context) error {
		ran = true
		resp, herr = handler(ctx, req)
		return herr
	})
	return resp, ic.outcome(ctx, info.FullMethod, key, ran, herr, err)
}

// keyOf runs the key function; its error is the status the client gets.
func (ic *interceptor) keyOf(ctx context.Context, fullMethod string, req any) (string, bool, error) {
	key, ok, err := ic.cfg.keyFunc(ctx, fullMethod, req)
	return ic.checkKey(fullMethod, key, ok, err)
}

func (ic *interceptor) checkKey(fullMethod, key string, ok bool, err error) (string, bool, error) {
	if err == nil && ok && key == "" {
		err = errEmptyKey
	}
	if err != nil {
		ic.log(slog.LevelDebug, "grpclock: key function failed", fullMethod, "", err)
		return "", false, status.Errorf(codes.InvalidArgument, "grpclock: lock key: %v", err)
	}
	return key, ok, nil
}

// errBusy is do's error when the key is locked and the call does not wait.
var errBusy = errors.New("grpclock: busy")

// do runs fn under the lock on key: waiting (WithWait) or not.
func (ic *interceptor) do(ctx context.Context, key string, fn func(context.Context) error) error {
	l, err := ic.newLock(key)
	if err != nil {
		return err
	}
	if ic.cfg.wait > 0 {
		return l.Do(ctx, fn)
	}
	ok, err := l.TryDo(ctx, fn)
	if err == nil && !ok {
		return errBusy
	}
	return err
}

func (ic *interceptor) newLock(key string) (*pglock.Lock, error) {
	return ic.locker.NewLock(ic.cfg.namespace+key, ic.lockOpts...)
}

// outcome turns what do returned into the call's error. ran says whether
// the handler ran, herr is the handler's own error, err is do's.
func (ic *interceptor) outcome(ctx context.Context, fullMethod, key string, ran bool, herr, err error) error {
	if !ran {
		return ic.notAcquired(ctx, fullMethod, key, err)
	}
	if herr != nil {
		// The handler's error goes to the client as it is; a failed release
		// (the lock was lost, or the rollback failed) is only logged.
		if err != nil && err != herr {
			ic.log(slog.LevelWarn, "grpclock: release after a failed call", fullMethod, key, err)
		}
		return herr
	}
	if err == nil {
		return nil
	}
	if ic.scope == pglock.Transaction {
		// The commit failed: the handler's work is not (known to be) saved.
		ic.log(slog.LevelWarn, "grpclock: commit failed", fullMethod, key, err)
		return status.Error(codes.Unavailable, "grpclock: commit failed")
	}
	// Session scope: the handler's work is done and stands; the unlock
	// failed or the lock was lost meanwhile (the handler's context was
	// cancelled then).
	ic.log(slog.LevelWarn, "grpclock: release failed", fullMethod, key, err)
	return nil
}

// notAcquired maps an acquire failure to a status error.
func (ic *interceptor) notAcquired(ctx context.Context, fullMethod, key string, err error) error {
	switch {
	case errors.Is(err, errBusy):
		ic.log(slog.LevelDebug, "grpclock: busy", fullMethod, key, nil)
		return status.Error(ic.cfg.busyCode, "grpclock: busy: another call holds the lock on this key")
	case ctx.Err() != nil:
		return status.FromContextError(ctx.Err()).Err()
	case errors.Is(err, pglock.ErrNotAcquired) && errors.Is(err, context.DeadlineExceeded):
		// The wait limit passed while the call's context is still alive.
		ic.log(slog.LevelDebug, "grpclock: busy after waiting", fullMethod, key, nil)
		return status.Errorf(ic.cfg.busyCode, "grpclock: busy: lock not acquired within %v", ic.cfg.wait)
	case errors.Is(err, pglock.ErrNotAcquired):
		ic.log(slog.LevelWarn, "grpclock: database error", fullMethod, key, err)
		return status.Error(codes.Unavailable, "grpclock: lock not acquired: database unavailable")
	default:
		ic.log(slog.LevelWarn, "grpclock: lock failed", fullMethod, key, err)
		return status.Error(codes.Internal, "grpclock: lock failed")
	}
}

func (ic *interceptor) log(level slog.Level, msg, fullMethod, key string, err error) {
	if ic.cfg.logger == nil {
		return
	}
	attrs := []slog.Attr{slog.String("method", fullMethod)}
	if key != "" {
		attrs = append(attrs, slog.String("key", ic.cfg.namespace+key))
	}
	if err != nil {
		attrs = append(attrs, slog.Any("error", err))
	}
	ic.cfg.logger.LogAttrs(context.Background(), level, msg, attrs...)
}
