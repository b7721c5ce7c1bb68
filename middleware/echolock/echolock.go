package echolock

import (
	"log/slog"
	"net/http"
	"time"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"

	"github.com/pglockkit/kit/internal/echocore"
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
	return echocore.SharedForSafeMethods(c.Request())
}

func defaultDeny(_ echo.Context, _ string, err error) error { return framework.DefaultDeny(err) }

func defaultError(_ echo.Context, err error) error { return framework.DefaultError(err) }

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
	m, err := echocore.New(&framework, cfg.core(), DefaultConfig.core())
	if err != nil {
		return nil, err
	}
	return func(next echo.HandlerFunc) echo.HandlerFunc { return m.Handle(next) }, nil
}

// core is cfg for package echocore: a Scope or Mode that follows the Locker
// (the zero value without ScopeSet or ModeSet) is nil there.
func (cfg Config) core() echocore.Config[echo.Context] {
	c := echocore.Config[echo.Context]{
		Skipper:      cfg.Skipper,
		Locker:       cfg.Locker,
		KeyExtractor: cfg.KeyExtractor,
		Wait:         cfg.Wait,
		ModeFunc:     cfg.ModeFunc,
		Commit:       cfg.Commit,
		Namespace:    cfg.Namespace,
		RetryAfter:   cfg.RetryAfter,
		DenyHandler:  cfg.DenyHandler,
		ErrorHandler: cfg.ErrorHandler,
		Logger:       cfg.Logger,
	}
	if cfg.ScopeSet || cfg.Scope != pglock.Session {
		c.Scope = &cfg.Scope
	}
	if cfg.ModeSet || cfg.Mode != pglock.Exclusive {
		c.Mode = &cfg.Mode
	}
	return c
}
