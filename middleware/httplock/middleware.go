package httplock

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/pglockkit/kit/internal/holdwriter"
	"github.com/pglockkit/kit/pglock"
)

// Middleware returns middleware that runs each request's handler while
// holding the advisory lock that key names, taken through locker. It fits
// http.ServeMux routes (wrap each route's handler, so that r.PathValue is
// set), chi-style routers (r.Use / r.With) and plain handlers.
//
// A nil locker ([ErrNilLocker]), a nil key ([ErrNilKeyFunc]) or an invalid
// option ([ErrInvalidOption]) is an error here, at construction, never a
// panic or a surprise at request time. (The returned func cannot return an
// error: given a nil handler, it answers every request 500 and logs
// [ErrNilHandler]; use [Handler] to have that checked too.)
func Middleware(locker *pglock.Locker, key KeyFunc, opts ...Option) (func(http.Handler) http.Handler, error) {
	m, err := newMiddleware(locker, key, opts)
	if err != nil {
		return nil, err
	}
	return func(next http.Handler) http.Handler {
		return &handler{m: m, next: next}
	}, nil
}

// Handler is Middleware for one handler: it returns h wrapped. A nil h is an
// error ([ErrNilHandler]), as Middleware's are.
func Handler(locker *pglock.Locker, key KeyFunc, h http.Handler, opts ...Option) (http.Handler, error) {
	if h == nil {
		return nil, ErrNilHandler
	}
	m, err := newMiddleware(locker, key, opts)
	if err != nil {
		return nil, err
	}
	return &handler{m: m, next: h}, nil
}

// middleware is the validated configuration shared by the handlers it wraps.
type middleware struct {
	locker *pglock.Locker
	key    KeyFunc
	cfg    config
	scope  pglock.Scope
	// lockOpts are the Lock options of each request by mode (Exclusive,
	// Shared), built once.
	lockOpts [2][]pglock.Option
}

func newMiddleware(locker *pglock.Locker, key KeyFunc, opts []Option) (*middleware, error) {
	cfg := defaultConfig()
	for _, o := range opts {
		if o == nil {
			cfg.invalid("nil Option")
			continue
		}
		o(&cfg)
	}
	var errs []error
	switch {
	case locker == nil:
		errs = append(errs, ErrNilLocker)
	case !locker.Pooled():
		// Requests run concurrently: each hold needs a connection of its own.
		errs = append(errs, fmt.Errorf("%w: the Locker is on one connection or transaction; give it a pool (*pgxpool.Pool or *sql.DB)", ErrInvalidOption))
	}
	if key == nil {
		errs = append(errs, ErrNilKeyFunc)
	}
	if err := errors.Join(append(errs, cfg.errs...)...); err != nil {
		return nil, err
	}
	cfg.errs = nil
	m := &middleware{locker: locker, key: key, cfg: cfg, scope: locker.Scope()}
	if cfg.scopeSet {
		m.scope = cfg.scope
	}
	if !cfg.modeSet && cfg.modeFunc == nil {
		m.cfg.mode = locker.Mode()
	}
	for _, mode := range []pglock.Mode{pglock.Exclusive, pglock.Shared} {
		o := []pglock.Option{pglock.WithMode(mode)}
		if cfg.scopeSet {
			o = append(o, pglock.WithScope(cfg.scope))
		}
		if m.scope == pglock.Transaction {
			// The commit rule decides; Do must roll back when told to.
			o = append(o, pglock.WithRollbackOnError(true))
		}
		if cfg.wait > 0 {
			o = append(o, pglock.WithWait(cfg.wait))
		}
		m.lockOpts[mode] = o
	}
	if _, err := locker.NewLock("httplock:check", m.lockOpts[pglock.Exclusive]...); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidOption, err)
	}
	if cfg.limit > 1 {
		if err := m.checkLimit(); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// checkLimit refuses the options that a limit above 1 (a Semaphore: Session
// scope, exclusive slots) cannot honour, naming both sides.
func (m *middleware) checkLimit() error {
	n := m.cfg.limit
	var errs []error
	switch {
	case m.scope == pglock.Transaction:
		by := "the Locker's scope"
		if m.cfg.scopeSet {
			by = "WithScope(pglock.Transaction)"
		}
		errs = append(errs, fmt.Errorf("%w: WithLimit(%d) with Transaction scope (%s): a limit is a pglock.Semaphore,"+
			" Session scope only, so there is no transaction to give the handler; use Session scope", ErrInvalidOption, n, by))
	case m.locker.Scope() == pglock.Transaction:
		// WithScope(pglock.Session) on a Transaction Locker: pglock makes
		// Semaphores on Session Lockers only.
		errs = append(errs, fmt.Errorf("%w: WithLimit(%d) with a Locker in Transaction scope, even with WithScope(pglock.Session):"+
			" pglock makes Semaphores only on a Locker in Session scope; give the middleware one", ErrInvalidOption, n))
	}
	switch {
	case m.cfg.modeFunc != nil:
		errs = append(errs, fmt.Errorf("%w: WithLimit(%d) with WithModeFunc: a limit's slots are exclusive", ErrInvalidOption, n))
	case m.cfg.mode == pglock.Shared && m.cfg.modeSet:
		errs = append(errs, fmt.Errorf("%w: WithLimit(%d) with WithMode(pglock.Shared): a limit's slots are exclusive", ErrInvalidOption, n))
	case m.cfg.mode == pglock.Shared:
		errs = append(errs, fmt.Errorf("%w: WithLimit(%d) with a Locker in Shared mode: a limit's slots are exclusive;"+
			" add WithMode(pglock.Exclusive)", ErrInvalidOption, n))
	}
	if len(errs) == 0 {
		if _, err := m.locker.Semaphore("httplock:check", n); err != nil {
			errs = append(errs, fmt.Errorf("%w: WithLimit(%d): %w", ErrInvalidOption, n, err))
		}
	}
	return errors.Join(errs...)
}

// errRollback is what the locked function returns when the commit rule says
// roll back, so that Lock.Do rolls the transaction back.
var errRollback = errors.New("httplock: commit rule said roll back")

type handler struct {
	m    *middleware
	next http.Handler
}

// ServeHTTP names the request's key, takes the lock (waiting or not, as
// configured), runs the wrapped handler while holding it, and ends the hold.
func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	m := h.m
	if h.next == nil { // Middleware's func was given a nil handler
		m.log(slog.LevelError, "httplock: nil handler wrapped", "", ErrNilHandler)
		http.Error(w, "500 internal server error", http.StatusInternalServerError)
		return
	}
	name, ok, err := m.key(r)
	if err != nil {
		m.keyError(w, r, fmt.Errorf("%w: %w", ErrKey, err))
		return
	}
	if !ok {
		h.next.ServeHTTP(w, r)
		return
	}
	name = m.cfg.namespace + name
	mode := m.cfg.mode
	if m.cfg.modeFunc != nil {
		mode = m.cfg.modeFunc(r)
		if mode != pglock.Exclusive && mode != pglock.Shared {
			// A programming error, not the database's: no 503 to retry.
			m.log(slog.LevelError, "httplock: bad mode", name,
				fmt.Errorf("%w: mode func returned %v", ErrInvalidOption, mode))
			http.Error(w, "500 internal server error", http.StatusInternalServerError)
			return
		}
	}
	var (
		lock *pglock.Lock
		sem  *pglock.Semaphore
	)
	if m.cfg.limit > 1 {
		sem, err = m.locker.Semaphore(name, m.cfg.limit, pglock.WithWait(max(m.cfg.wait, 0)))
		if errors.Is(err, pglock.ErrInvalidKey) { // an empty name: no namespace, empty key
			m.keyError(w, r, fmt.Errorf("%w: %w", ErrKey, err))
			return
		}
	} else {
		lock, err = m.locker.NewLock(name, m.lockOpts[mode]...)
	}
	if err != nil {
		m.fail(w, r, name, fmt.Errorf("%w: %w", ErrDatabase, err))
		return
	}

	var tw *holdwriter.Writer
	hw := w
	returned := false
	if m.scope == pglock.Transaction {
		tw = holdwriter.New(w)
		hw = tw
		// A panic (raised again by Lock.Do after the rollback) drops the held
		// response and the headers the handler set, so that a recovering
		// middleware outside answers on a clean slate.
		defer func() {
			if !returned {
				tw.Discard()
			}
		}()
	}
	ran := false
	fn := func(ctx context.Context) error {
		ran = true
		h.next.ServeHTTP(hw, r.WithContext(ctx))
		if tw != nil {
			rule := m.cfg.commit
			if rule == nil {
				rule = DefaultCommitRule
			}
			if !rule(r, tw.StatusOrOK()) {
				return errRollback
			}
		}
		return nil
	}
	did := true
	switch {
	case sem != nil:
		did, err = m.doLimited(r.Context(), sem, fn)
	case m.cfg.wait > 0:
		err = lock.Do(r.Context(), fn)
	default:
		did, err = lock.TryDo(r.Context(), fn)
	}
	returned = true
	if err == nil && !did { // TryDo found the key busy
		m.busy(w, r, name, 0, ErrBusy)
		return
	}

	switch {
	case !ran:
		m.notAcquired(w, r, name, err)
	case tw == nil: // Session scope: the response is out already
		if err != nil {
			m.log(slog.LevelWarn, "httplock: release failed after the handler ran", name, err)
		}
	case err == nil || errors.Is(err, errRollback):
		if err != nil && err != errRollback { // Do joined a rollback error
			m.log(slog.LevelWarn, "httplock: rollback failed", name, err)
		}
		if err := tw.Release(); err != nil {
			m.log(slog.LevelDebug, "httplock: sending the held response", name, err)
		}
	default: // the commit failed
		err = fmt.Errorf("%w: %w", ErrDatabase, err)
		if tw.Discard() {
			m.fail(w, r, name, err)
			return
		}
		m.log(slog.LevelWarn, "httplock: commit failed after the response was flushed", name, err)
	}
}

// doLimited runs fn in a slot of sem (WithLimit): if one is free now,
// without a wait limit (TryDo's (false, nil) when none is), else waiting up
// to the limit, which sem bounds (it was made WithWait): when it passes the
// error matches pglock.ErrNotAcquired and context.DeadlineExceeded, as a
// Lock's WithWait does, so notAcquired answers it busy.
func (m *middleware) doLimited(ctx context.Context, sem *pglock.Semaphore, fn func(context.Context) error) (bool, error) {
	if m.cfg.wait <= 0 {
		return sem.TryDo(ctx, fn)
	}
	return true, sem.Do(ctx, fn)
}

// notAcquired answers a request whose lock was not taken.
func (m *middleware) notAcquired(w http.ResponseWriter, r *http.Request, name string, err error) {
	switch {
	case r.Context().Err() != nil:
		// The client went away, or an outer deadline (a timeout middleware)
		// ended the request: a client still connected gets 503 rather than
		// net/http's empty 200; one that left does not read it.
		m.log(slog.LevelDebug, "httplock: request ended while waiting", name,
			fmt.Errorf("%w: %w", ErrRequestEnded, err))
		http.Error(w, "503 service unavailable: the request ended while waiting for the lock", http.StatusServiceUnavailable)
	case m.cfg.wait > 0 && errors.Is(err, pglock.ErrNotAcquired) && errors.Is(err, context.DeadlineExceeded):
		m.busy(w, r, name, m.cfg.wait, fmt.Errorf("%w: %w", ErrBusy, err))
	default:
		m.fail(w, r, name, fmt.Errorf("%w: %w", ErrDatabase, err))
	}
}

// busy answers a busy key; err matches ErrBusy.
func (m *middleware) busy(w http.ResponseWriter, r *http.Request, name string, waited time.Duration, err error) {
	if m.cfg.logger != nil {
		m.cfg.logger.LogAttrs(r.Context(), slog.LevelDebug, "httplock: busy",
			slog.String("key", name), slog.Duration("wait", waited), slog.Any("error", err))
	}
	if m.cfg.onBusy != nil {
		m.cfg.onBusy.ServeHTTP(w, r)
		return
	}
	if m.cfg.retryAfter > 0 {
		secs := (m.cfg.retryAfter + time.Second - 1) / time.Second
		w.Header().Set("Retry-After", strconv.FormatInt(int64(secs), 10))
	}
	http.Error(w, "409 conflict: another request holds the lock for this resource", http.StatusConflict)
}

func (m *middleware) fail(w http.ResponseWriter, r *http.Request, name string, err error) {
	m.log(slog.LevelWarn, "httplock: lock failed", name, err)
	if m.cfg.onError != nil {
		m.cfg.onError(w, r, err)
		return
	}
	http.Error(w, "503 service unavailable: the lock for this resource could not be taken", http.StatusServiceUnavailable)
}

func (m *middleware) keyError(w http.ResponseWriter, r *http.Request, err error) {
	m.log(slog.LevelDebug, "httplock: bad key", "", err)
	if m.cfg.onKeyError != nil {
		m.cfg.onKeyError(w, r, err)
		return
	}
	http.Error(w, "400 bad request: the request does not name a valid lock key", http.StatusBadRequest)
}

func (m *middleware) log(level slog.Level, msg, name string, err error) {
	if m.cfg.logger == nil {
		return
	}
	m.cfg.logger.LogAttrs(context.Background(), level, msg, slog.String("key", name), slog.Any("error", err))
}
