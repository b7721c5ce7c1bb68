package echosuite

import (
	"bufio"
	"net"
	"net/http"

	"github.com/pglockkit/kit/internal/echocore"
	"github.com/pglockkit/kit/pglock"
)

// Extractor is a KeyExtractor over the context type C.
type Extractor[C any] = func(c C) (key string, ok bool, err error)

// MiddlewareFunc is an echo.MiddlewareFunc over the context type C.
type MiddlewareFunc[C any] = func(next func(C) error) func(C) error

// Adapter is one Echo adapter package as the suite drives it, over its
// context type C (echo.Context in v4, *echo.Context in v5). Every field is
// required.
type Adapter[C any] struct {
	// The package under test.

	Namespace string          // its DefaultNamespace
	Errors    echocore.Errors // its sentinels

	// DefaultDeny and DefaultError are its DefaultConfig's DenyHandler and
	// ErrorHandler.
	DefaultDeny  func(c C, key string, err error) error
	DefaultError func(c C, err error) error

	// ParamKey, HeaderKey, QueryParamKey and MethodPathKey are its
	// ready-made KeyExtractors; SharedForSafeMethods its ModeFunc.
	ParamKey             func(name string) Extractor[C]
	HeaderKey            func(name string) Extractor[C]
	QueryParamKey        func(name string) Extractor[C]
	MethodPathKey        func() Extractor[C]
	SharedForSafeMethods func(c C) pglock.Mode

	// New is its New, and Middleware its WithConfig (or ToMiddleware) of
	// the Config that cfg describes: nil Scope and Mode follow the Locker,
	// as the package says it in its own terms. Each returns a nil
	// MiddlewareFunc when the package returned a nil one.
	New        func(lk *pglock.Locker, key Extractor[C]) (MiddlewareFunc[C], error)
	Middleware func(cfg echocore.Config[C]) (MiddlewareFunc[C], error)

	// Echo returns the Echo that spec describes, its own logs discarded.
	Echo func(spec EchoSpec[C]) http.Handler

	// NewContext is the Echo's NewContext for a request and a writer.
	NewContext func(r *http.Request, w http.ResponseWriter) C

	// The Echo calls a test's handler makes.

	Request    func(c C) *http.Request
	PathParam  func(c C, name string) string
	QueryParam func(c C, name string) string
	String     func(c C, code int, s string) error
	NoContent  func(c C, code int) error
	JSON       func(c C, code int, v any) error
	Response   func(c C) http.ResponseWriter
	// Status is the response's status as a Commit rule would read it (200
	// when nothing was written).
	Status func(c C) int
	// Committed reports that the response was written to.
	Committed func(c C) bool
	// Flush and Hijack are the Echo major's own ways to flush and to
	// hijack the response.
	Flush  func(c C)
	Hijack func(c C) (net.Conn, *bufio.ReadWriter, error)

	// HTTPError returns an *echo.HTTPError; HTTPErrorCode reports whether
	// err is one (errors.As) and its code.
	HTTPError     func(code int, message string, internal error) error
	HTTPErrorCode func(err error) (code int, ok bool)
}

// App is what a test asks of the Echo around the middleware.
type App struct {
	// Routes are the paths of the handler's POST and GET routes. Default:
	// "/orders/:id".
	Routes []string

	// RequestID adds outer middleware (Echo's Pre) that sets the response
	// header X-Request-Id: abc before anything else runs.
	RequestID bool

	// Recover adds Echo's Recover middleware (stack traces off) outside the
	// lock.
	Recover bool

	// Returned, when not nil, is called with what the middleware chain
	// returned for each request (the error, or nil).
	Returned func(err error)

	// Handled, when not nil, is called with each error Echo's
	// HTTPErrorHandler gets, before it answers.
	Handled func(err error)
}

// EchoSpec is an Echo for Adapter.Echo to build.
type EchoSpec[C any] struct {
	Routes     []string            // paths of Handler's POST and GET routes
	Handler    func(C) error       // the routes' handler
	Middleware MiddlewareFunc[C]   // the routes' middleware, unless nil
	Pre        []MiddlewareFunc[C] // Echo's Pre middleware
	Recover    bool                // Echo's Recover middleware (stack traces off), in Use first
	Use        []MiddlewareFunc[C] // Echo's Use middleware, after Recover
	Handled    func(err error)     // when not nil, sees each error Echo's HTTPErrorHandler gets, before it answers
}
