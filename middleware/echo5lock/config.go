package echo5lock

import (
	"log/slog"
	"net/http"
	"time"

	"github.com/labstack/echo/v5"
	"github.com/labstack/echo/v5/middleware"

	"github.com/pglockkit/kit/internal/echocore"
	"github.com/pglockkit/kit/pglock"
)

// DefaultNamespace prefixes every key the middleware locks when
// Config.Namespace is empty: the key "42" is locked as "http:42" (after the
// Locker's own namespace, if any). It is the namespace of packages httplock
// and echolock too, so Echo v5, Echo v4 and net/http services that name the
// same key contend on the same lock.
const DefaultNamespace = "http:"

// DefaultRetryAfter is the Retry-After sent with a busy answer when
// Config.RetryAfter is zero.
const DefaultRetryAfter = time.Second

// Config configures the middleware. Zero fields take the value of
// DefaultConfig, as Echo's own middleware does, except where a field says
// otherwise; Locker and KeyExtractor are required. Config is an
// echo.MiddlewareConfigurator: ToMiddleware makes the middleware.
type Config struct {
	// Skipper skips the middleware for a request (no key, no lock).
	// Default: middleware.DefaultSkipper, which skips nothing.
	Skipper middleware.Skipper

	// Locker takes the locks. Required, and on a pool (*pgxpool.Pool or
	// *sql.DB): requests run concurrently.
	Locker *pglock.Locker

	// KeyExtractor names each request's key. Required. See Param, Header,
	// QueryParam and MethodPath for ready-made ones.
	KeyExtractor KeyExtractor

	// Wait is how long a request waits for a key held elsewhere. Zero (the
	// default) does not wait: a busy key goes to the DenyHandler at once.
	// A wait stops as soon as the request's context ends (the client went
	// away). Negative is an error.
	Wait time.Duration

	// Scope is the lock's scope. nil (the default) follows the Locker's
	// scope (pglock.Locker.Scope, itself pglock.Session unless
	// pglock.WithScope said otherwise); a value overrides it, for example
	// Scope: new(pglock.Transaction). In pglock.Transaction scope the handler
	// finds the lock's transaction with
	// pglock.TxFromContext(c.Request().Context()); it commits when Commit
	// says so and rolls back otherwise (and on a panic). A value other than
	// pglock.Session or pglock.Transaction is an error.
	Scope *pglock.Scope

	// Mode is the lock's mode for every request. nil (the default) follows
	// the Locker's mode (pglock.Locker.Mode, itself pglock.Exclusive unless
	// pglock.WithMode said otherwise); a value overrides it, for example
	// Mode: new(pglock.Shared). ModeFunc, when set, chooses per request
	// instead. A value other than pglock.Exclusive or pglock.Shared is an
	// error.
	Mode *pglock.Mode

	// ModeFunc chooses the mode per request, for example
	// SharedForSafeMethods. Default: nil (Mode for every request). A mode
	// other than Exclusive or Shared is a configuration error: it is logged
	// and answered with a 500 *echo.HTTPError matching ErrInvalidConfig (not
	// through ErrorHandler), and the handler does not run.
	ModeFunc func(c *echo.Context) pglock.Mode

	// Commit decides in Transaction scope whether the transaction commits,
	// given the handler's returned error. Default: DefaultCommit (no error
	// and a status below 500).
	Commit func(c *echo.Context, err error) bool

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
	DenyHandler func(c *echo.Context, key string, err error) error

	// ErrorHandler answers a KeyExtractor error (err matches ErrKey) and a
	// lock that could not be taken or committed (err matches ErrDatabase).
	// It may return an error or write the answer itself. Default: a 400 or
	// 503 *echo.HTTPError.
	ErrorHandler func(c *echo.Context, err error) error

	// Logger logs busy answers and cancelled waits at Debug level, database
	// errors and failed releases at Warn level. Default: nil, silent (Echo's
	// own logger, c.Logger(), is not used: pass it here to log there).
	Logger *slog.Logger
}

// DefaultConfig is the default configuration. Its Locker and KeyExtractor
// are nil: New, WithConfig and ToMiddleware need them.
var DefaultConfig = Config{
	Skipper:      middleware.DefaultSkipper,
	Commit:       DefaultCommit,
	Namespace:    DefaultNamespace,
	RetryAfter:   DefaultRetryAfter,
	DenyHandler:  defaultDeny,
	ErrorHandler: defaultError,
}

var _ echo.MiddlewareConfigurator = Config{}

// DefaultCommit commits when the handler returned no error and the status of
// the response it wrote (echo.ResolveResponseStatus; 200 when it wrote none)
// is below 500.
func DefaultCommit(c *echo.Context, err error) bool {
	if err != nil {
		return false
	}
	_, status := echo.ResolveResponseStatus(c.Response(), nil)
	return status < http.StatusInternalServerError
}

// SharedForSafeMethods is a ModeFunc: GET, HEAD and OPTIONS requests take the
// key in pglock.Shared mode (they run together), every other method in
// pglock.Exclusive mode.
func SharedForSafeMethods(c *echo.Context) pglock.Mode {
	return echocore.SharedForSafeMethods(c.Request())
}

func defaultDeny(_ *echo.Context, _ string, err error) error { return framework.DefaultDeny(err) }

func defaultError(_ *echo.Context, err error) error { return framework.DefaultError(err) }

// New returns the middleware with DefaultConfig, locker and extractor. A nil
// locker or extractor is an error (ErrNilLocker, ErrNilKeyExtractor), never a
// panic.
func New(locker *pglock.Locker, extractor KeyExtractor) (echo.MiddlewareFunc, error) {
	cfg := DefaultConfig
	cfg.Locker, cfg.KeyExtractor = locker, extractor
	return cfg.ToMiddleware()
}

// WithConfig returns the middleware configured by cfg: it is
// cfg.ToMiddleware(), under the name package echolock uses. Unlike Echo's own
// XxxWithConfig functions it returns an error instead of panicking.
func WithConfig(cfg Config) (echo.MiddlewareFunc, error) {
	return cfg.ToMiddleware()
}

// ToMiddleware returns the middleware configured by config (the
// echo.MiddlewareConfigurator method). Zero fields take DefaultConfig's
// values; a nil Locker or KeyExtractor, a Locker that is not on a pool, or a
// field out of range is an error, never a panic.
func (config Config) ToMiddleware() (echo.MiddlewareFunc, error) {
	m, err := echocore.New(&framework, config.core(), DefaultConfig.core())
	if err != nil {
		return nil, err
	}
	return func(next echo.HandlerFunc) echo.HandlerFunc { return m.Handle(next) }, nil
}

// core is config for package echocore, which copies Scope and Mode out of
// their pointers.
func (config Config) core() echocore.Config[*echo.Context] {
	return echocore.Config[*echo.Context]{
		Skipper:      config.Skipper,
		Locker:       config.Locker,
		KeyExtractor: config.KeyExtractor,
		Wait:         config.Wait,
		Scope:        config.Scope,
		Mode:         config.Mode,
		ModeFunc:     config.ModeFunc,
		Commit:       config.Commit,
		Namespace:    config.Namespace,
		RetryAfter:   config.RetryAfter,
		DenyHandler:  config.DenyHandler,
		ErrorHandler: config.ErrorHandler,
		Logger:       config.Logger,
	}
}
