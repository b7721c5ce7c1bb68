package echolock

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"

	"github.com/pglockkit/kit/internal/holdwriter"
	"github.com/pglockkit/kit/pglock"
)

// DefaultNamespace prefixes every key the middleware locks when
// Config.Namespace is empty: the key "42" is locked as "http:42" (after the
// Locker's own namespace, if any). It is the namespace of package httplock
// too, so an Echo service and a net/http service that name the same key
// contend on the same lock.
const DefaultNamespace = "http:"

// DefaultRetryAfter is the Retry-After sent with a busy answer when
// Config.RetryAfter is zero.
const DefaultRetryAfter = time.Second

// KeyExtractor names the lock a request needs. ok false passes the request
// through without a lock. A non-nil err goes to the ErrorHandler (400 by
// default), never passed through. Do not key by c.RealIP(): it trusts
// X-Forwarded-For, which a client can forge.
type KeyExtractor func(c echo.Context) (key string, ok bool, err error)

// Config configures the middleware. Zero fields take the value of
// DefaultConfig, as Echo's own middleware does, except where a field says
// otherwise; Locker and KeyExtractor are required.
type Config struct {
	// Skipper skips the middleware for a request (no key, no lock).
	// Default: middleware.DefaultSkipper, which skips nothing.
	Skipper middleware.Skipper

	// Locker takes the locks. Required.
	Locker *pglock.Locker

	// KeyExtractor names each request's key. Required. See Param, Header,
	// QueryParam and MethodPath for ready-made ones.
	KeyExtractor KeyExtractor

	// Wait is how long a request waits for a key held elsewhere. Zero (the
	// default) does not wait: a busy key goes to the DenyHandler at once.
	// A wait stops as soon as the request's context ends (the client went
	// away). Negative is an error.
	Wait time.Duration

	// Scope is the lock's scope. The zero value follows the Locker's scope
	// (pglock.Locker.Scope, itself Session unless pglock.WithScope said
	// otherwise); pglock.Transaction, or ScopeSet, overrides it. In
	// pglock.Transaction the handler finds the lock's transaction with
	// pglock.TxFromContext(c.Request().Context()); it commits when Commit
	// says so and rolls back otherwise (and on a panic).
	Scope pglock.Scope

	// ScopeSet makes Scope apply even when it is the zero value: set it with
	// Scope left zero to hold a Session lock through a Locker whose scope is
	// Transaction. Default: false.
	ScopeSet bool

	// Mode is the lock's mode for every request. The zero value follows the
	// Locker's mode (pglock.Locker.Mode, itself Exclusive unless
	// pglock.WithMode said otherwise); pglock.Shared, or ModeSet, overrides
	// it. ModeFunc, when set, chooses per request instead.
	Mode pglock.Mode

	// ModeSet makes Mode apply even when it is the zero value: set it with
	// Mode left zero to take Exclusive locks through a Locker whose mode is
	// Shared. Default: false.
	ModeSet bool

	// ModeFunc chooses the mode per request, for example
	// SharedForSafeMethods. Default: nil (Mode for every request). A mode
	// other than Exclusive or Shared is a configuration error: it is logged
	// and answered with a 500 *echo.HTTPError matching ErrInvalidConfig (not
	// through ErrorHandler), and the handler does not run.
	ModeFunc func(c echo.Context) pglock.Mode

	// Commit decides in Transaction scope whether the transaction commits,
	// given the handler's returned error. Default: DefaultCommit (no error
	// and a status below 500).
	Commit func(c echo.Context, err error) bool

	// Namespace prefixes every key. Empty: DefaultNamespace. Give each
	// protected resource its own when their keys can be equal ("orders:",
	// "users:").
	Namespace string

	// RetryAfter is set as the Retry-After header of every busy answer,
	// before DenyHandler runs (so a custom DenyHandler sends it too unless it
	// removes it), rounded up to whole seconds. Zero: DefaultRetryAfter (one
	// second). Negative: no header.
	RetryAfter time.Duration

	// DenyHandler answers a busy key: err matches ErrBusy (and, after a
	// wait, pglock.ErrNotAcquired). It may return an error for Echo's
	// HTTPErrorHandler or write the answer itself. Default: a 409 Conflict
	// *echo.HTTPError.
	DenyHandler func(c echo.Context, key string, err error) error

	// ErrorHandler answers a KeyExtractor error (err matches ErrKey) and a
	// lock that could not be taken or committed (err matches ErrDatabase).
	// It may return an error or write the answer itself. Default: a 400 or
	// 503 *echo.HTTPError.
	ErrorHandler func(c echo.Context, err error) error

	// Logger logs busy answers and cancelled waits at Debug level, database
	// errors and failed releases at Warn level. Default: nil, silent.
	Logger *slog.Logger
}

// DefaultConfig is the default configuration. Its Locker and KeyExtractor
// are nil: New and WithConfig need them.
var DefaultConfig = Config{
	Skipper:      middleware.DefaultSkipper,
	Commit:       DefaultCommit,
	Namespace:    DefaultNamespace,
	RetryAfter:   DefaultRetryAfter,
	DenyHandler:  defaultDeny,
	ErrorHandler: defaultError,
}

// DefaultCommit commits when the handler returned no error and the response
// status is below 500.
func DefaultCommit(c echo.Context, err error) bool {
	return err == nil && c.Response().Status < http.StatusInternalServerError
}

// SharedForSafeMethods is a ModeFunc: GET, HEAD and OPTIONS requests take the
// key in pglock.Shared mode (they run together), every other method in
// pglock.Exclusive mode.
func SharedForSafeMethods(c echo.Context) pglock.Mode {
	switch c.Request().Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return pglock.Shared
	default:
		return pglock.Exclusive
	}
}

func defaultDeny(_ echo.Context, _ string, err error) error {
	return &echo.HTTPError{Code: http.StatusConflict,
		Message: "another request holds the lock for this resource", Internal: err}
}

func defaultError(_ echo.Context, err error) error {
	if errors.Is(err, ErrKey) {
		return &echo.HTTPError{Code: http.StatusBadRequest,
			Message: "the request does not name a valid lock key", Internal: err}
	}
	return &echo.HTTPError{Code: http.StatusServiceUnavailable,
		Message: "the lock for this resource could not be taken", Internal: err}
}

// New returns the middleware with DefaultConfig, locker and extractor. A nil
// locker or extractor is an error (ErrNilLocker, ErrNilKeyExtractor), never a
// panic.
func New(locker *pglock.Locker, extractor KeyExtractor) (echo.MiddlewareFunc, error) {
	cfg := DefaultConfig
	cfg.Locker, cfg.KeyExtractor = locker, extractor
	return WithConfig(cfg)
}

// WithConfig returns the middleware configured by cfg. Zero fields take
// DefaultConfig's values; a nil Locker or KeyExtractor, or a field out of
// range, is an error, never a panic (Echo's own middleware panics here; this
// one lets the caller decide).
func WithConfig(cfg Config) (echo.MiddlewareFunc, error) {
	m, err := newMiddleware(cfg)
	if err != nil {
		return nil, err
	}
	return m.handle, nil
}

type lockMiddleware struct {
	cfg      Config
	lockOpts [2][]pglock.Option // by mode
}

func newMiddleware(cfg Config) (*lockMiddleware, error) {
	var errs []error
	switch {
	case cfg.Locker == nil:
		errs = append(errs, ErrNilLocker)
	case !cfg.Locker.Pooled():
		// Requests run concurrently: each hold needs a connection of its own.
		errs = append(errs, fmt.Errorf("%w: the Locker is on one connection or transaction; give it a pool (*pgxpool.Pool or *sql.DB)", ErrInvalidConfig))
	}
	if cfg.KeyExtractor == nil {
		errs = append(errs, ErrNilKeyExtractor)
	}
	if cfg.Wait < 0 {
		errs = append(errs, fmt.Errorf("%w: Wait %v is negative", ErrInvalidConfig, cfg.Wait))
	}
	if cfg.Scope != pglock.Session && cfg.Scope != pglock.Transaction {
		errs = append(errs, fmt.Errorf("%w: Scope %d", ErrInvalidConfig, int(cfg.Scope)))
	}
	if cfg.Mode != pglock.Exclusive && cfg.Mode != pglock.Shared {
		errs = append(errs, fmt.Errorf("%w: Mode %d", ErrInvalidConfig, int(cfg.Mode)))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if cfg.Skipper == nil {
		cfg.Skipper = DefaultConfig.Skipper
	}
	if cfg.Commit == nil {
		cfg.Commit = DefaultConfig.Commit
	}
	if cfg.Namespace == "" {
		cfg.Namespace = DefaultConfig.Namespace
	}
	if cfg.RetryAfter == 0 {
		cfg.RetryAfter = DefaultConfig.RetryAfter
	}
	if cfg.DenyHandler == nil {
		cfg.DenyHandler = DefaultConfig.DenyHandler
	}
	if cfg.ErrorHandler == nil {
		cfg.ErrorHandler = DefaultConfig.ErrorHandler
	}
	if !cfg.ScopeSet && cfg.Scope == pglock.Session {
		cfg.Scope = cfg.Locker.Scope()
	}
	if !cfg.ModeSet && cfg.Mode == pglock.Exclusive {
		cfg.Mode = cfg.Locker.Mode()
	}
	m := &lockMiddleware{cfg: cfg}
	for _, mode := range []pglock.Mode{pglock.Exclusive, pglock.Shared} {
		o := []pglock.Option{pglock.WithMode(mode), pglock.WithScope(cfg.Scope)}
		if cfg.Scope == pglock.Transaction {
			o = append(o, pglock.WithRollbackOnError(true)) // Commit decides
		}
		if cfg.Wait > 0 {
			o = append(o, pglock.WithWaitTimeout(cfg.Wait))
		}
		m.lockOpts[mode] = o
	}
	if _, err := cfg.Locker.Lock("echolock:check", m.lockOpts[pglock.Exclusive]...); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	return m, nil
}

// errRollback is what the locked function returns when Commit says roll
// back, so that Lock.Do rolls the transaction back.
var errRollback = errors.New("echolock: commit rule said roll back")

func (m *lockMiddleware) handle(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		cfg := &m.cfg
		if cfg.Skipper(c) {
			return next(c)
		}
		name, ok, err := cfg.KeyExtractor(c)
		if err != nil {
			m.log(slog.LevelDebug, "echolock: bad key", "", err)
			return cfg.ErrorHandler(c, fmt.Errorf("%w: %w", ErrKey, err))
		}
		if !ok {
			return next(c)
		}
		name = cfg.Namespace + name
		mode := cfg.Mode
		if cfg.ModeFunc != nil {
			mode = cfg.ModeFunc(c)
			if mode != pglock.Exclusive && mode != pglock.Shared {
				err := fmt.Errorf("%w: ModeFunc returned %v", ErrInvalidConfig, mode)
				m.log(slog.LevelError, "echolock: bad mode", name, err)
				return &echo.HTTPError{Code: http.StatusInternalServerError,
					Message: http.StatusText(http.StatusInternalServerError), Internal: err}
			}
		}
		lock, err := cfg.Locker.Lock(name, m.lockOpts[mode]...)
		if err != nil {
			return m.fail(c, name, fmt.Errorf("%w: %w", ErrDatabase, err))
		}

		// In Transaction scope the handler writes through a holdwriter.Writer
		// that holds its response back until the transaction has ended.
		// restore puts the request and the original writer back; it runs as
		// soon as the hold ends, before the DenyHandler or the ErrorHandler
		// may write an answer of their own, which must reach the client, not
		// the held-back writer.
		req, resp := c.Request(), c.Response()
		var tw *holdwriter.Writer
		orig := resp.Writer
		if cfg.Scope == pglock.Transaction {
			tw = holdwriter.New(orig)
			resp.Writer = tw
		}
		restore := func() {
			c.SetRequest(req) // later middleware must not see an ended tx
			resp.Writer = orig
		}
		returned := false
		defer func() {
			if returned {
				return
			}
			// A panic, raised again by Lock.Do after the rollback: the held
			// response must not go out; Recover, outside, answers instead.
			if tw != nil {
				discard(tw, resp)
			}
			restore()
		}()
		var herr error
		ran := false
		fn := func(ctx context.Context) error {
			ran = true
			c.SetRequest(req.WithContext(ctx))
			herr = next(c)
			if tw != nil && !cfg.Commit(c, herr) {
				return errRollback
			}
			return nil
		}
		busy := false
		if cfg.Wait > 0 {
			err = lock.Do(req.Context(), fn)
		} else {
			var did bool
			did, err = lock.TryDo(req.Context(), fn)
			busy = err == nil && !did
		}
		restore()
		returned = true

		if busy {
			return m.busy(c, name, ErrBusy)
		}
		switch {
		case !ran:
			return m.notAcquired(c, name, err)
		case tw == nil: // Session scope: the response is the handler's
			if err != nil {
				m.log(slog.LevelWarn, "echolock: release failed after the handler ran", name, err)
			}
			return herr
		case err == nil || errors.Is(err, errRollback):
			if err != nil && err != errRollback { // Do joined a rollback error
				m.log(slog.LevelWarn, "echolock: rollback failed", name, err)
			}
			if err != nil && herr != nil {
				// Rolled back on the handler's error: the error is the
				// answer, not what the handler wrote before returning it.
				if !discard(tw, resp) {
					m.log(slog.LevelWarn, "echolock: rolled back after the response was flushed", name, herr)
				}
				return herr
			}
			if err := tw.Release(); err != nil {
				m.log(slog.LevelDebug, "echolock: sending the held response", name, err)
			}
			return herr
		default: // the commit failed
			err = fmt.Errorf("%w: %w", ErrDatabase, err)
			if discard(tw, resp) {
				return m.fail(c, name, err)
			}
			m.log(slog.LevelWarn, "echolock: commit failed after the response was flushed", name, err)
			return errors.Join(herr, err)
		}
	}
}

// discard drops the held response and resets c.Response() so that the
// error handler writes the answer. It reports false when part of the
// response was flushed already (then nothing can be taken back).
func discard(tw *holdwriter.Writer, resp *echo.Response) bool {
	if !tw.Discard() {
		return false
	}
	resp.Committed, resp.Status, resp.Size = false, http.StatusOK, 0
	return true
}

func (m *lockMiddleware) notAcquired(c echo.Context, name string, err error) error {
	switch {
	case c.Request().Context().Err() != nil:
		m.log(slog.LevelDebug, "echolock: request ended while waiting", name, err)
		return &echo.HTTPError{Code: http.StatusServiceUnavailable,
			Message:  "request ended while waiting for the lock",
			Internal: fmt.Errorf("%w: %w", ErrRequestEnded, err)}
	case m.cfg.Wait > 0 && errors.Is(err, pglock.ErrNotAcquired) && errors.Is(err, context.DeadlineExceeded):
		return m.busy(c, name, fmt.Errorf("%w: %w", ErrBusy, err))
	default:
		return m.fail(c, name, fmt.Errorf("%w: %w", ErrDatabase, err))
	}
}

func (m *lockMiddleware) busy(c echo.Context, name string, err error) error {
	m.log(slog.LevelDebug, "echolock: busy", name, err)
	if d := m.cfg.RetryAfter; d > 0 {
		secs := (d + time.Second - 1) / time.Second
		c.Response().Header().Set(echo.HeaderRetryAfter, strconv.FormatInt(int64(secs), 10))
	}
	return m.cfg.DenyHandler(c, name, err)
}

func (m *lockMiddleware) fail(c echo.Context, name string, err error) error {
	m.log(slog.LevelWarn, "echolock: lock failed", name, err)
	return m.cfg.ErrorHandler(c, err)
}

func (m *lockMiddleware) log(level slog.Level, msg, name string, err error) {
	if m.cfg.Logger == nil {
		return
	}
	attrs := []slog.Attr{slog.String("key", name)}
	if err != nil {
		attrs = append(attrs, slog.Any("error", err))
	}
	m.cfg.Logger.LogAttrs(context.Background(), level, msg, attrs...)
}
