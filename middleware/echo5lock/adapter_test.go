package echo5lock_test

import (
	"bufio"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"testing"

	"github.com/labstack/echo/v5"
	"github.com/labstack/echo/v5/middleware"

	"github.com/pglockkit/kit/internal/echocore"
	"github.com/pglockkit/kit/internal/echosuite"
	"github.com/pglockkit/kit/middleware/echo5lock"
	"github.com/pglockkit/kit/pglock"
)

// TestAcceptance runs the acceptance suite that echo5lock shares with
// echolock (package echosuite) on Echo v5.
func TestAcceptance(t *testing.T) { echosuite.Run(t, adapter) }

// adapter is echo5lock and Echo v5 as the suite drives them.
var adapter = echosuite.Adapter[*echo.Context]{
	Namespace: echo5lock.DefaultNamespace,
	Errors: echocore.Errors{
		NilLocker:       echo5lock.ErrNilLocker,
		NilKeyExtractor: echo5lock.ErrNilKeyExtractor,
		InvalidConfig:   echo5lock.ErrInvalidConfig,
		Key:             echo5lock.ErrKey,
		Busy:            echo5lock.ErrBusy,
		Database:        echo5lock.ErrDatabase,
		RequestEnded:    echo5lock.ErrRequestEnded,
	},
	DefaultDeny:          echo5lock.DefaultConfig.DenyHandler,
	DefaultError:         echo5lock.DefaultConfig.ErrorHandler,
	ParamKey:             func(name string) echosuite.Extractor[*echo.Context] { return echo5lock.Param(name) },
	HeaderKey:            func(name string) echosuite.Extractor[*echo.Context] { return echo5lock.Header(name) },
	QueryParamKey:        func(name string) echosuite.Extractor[*echo.Context] { return echo5lock.QueryParam(name) },
	MethodPathKey:        func() echosuite.Extractor[*echo.Context] { return echo5lock.MethodPath() },
	SharedForSafeMethods: echo5lock.SharedForSafeMethods,
	New: func(lk *pglock.Locker, key echosuite.Extractor[*echo.Context]) (echosuite.MiddlewareFunc[*echo.Context], error) {
		return middlewareFunc(echo5lock.New(lk, key))
	},
	Middleware: func(cfg echocore.Config[*echo.Context]) (echosuite.MiddlewareFunc[*echo.Context], error) {
		return middlewareFunc(config(cfg).ToMiddleware())
	},
	Echo:       newEcho,
	NewContext: func(r *http.Request, w http.ResponseWriter) *echo.Context { return echo.New().NewContext(r, w) },

	Request:    (*echo.Context).Request,
	PathParam:  (*echo.Context).Param,
	QueryParam: (*echo.Context).QueryParam,
	String:     (*echo.Context).String,
	NoContent:  (*echo.Context).NoContent,
	JSON:       (*echo.Context).JSON,
	Response:   (*echo.Context).Response,
	Status: func(c *echo.Context) int {
		_, status := echo.ResolveResponseStatus(c.Response(), nil)
		return status
	},
	Committed: func(c *echo.Context) bool {
		resp, err := echo.UnwrapResponse(c.Response())
		return err != nil || resp.Committed
	},
	Flush: func(c *echo.Context) { c.Response().(http.Flusher).Flush() },
	Hijack: func(c *echo.Context) (net.Conn, *bufio.ReadWriter, error) {
		return http.NewResponseController(c.Response()).Hijack()
	},
	HTTPError: func(code int, message string, internal error) error {
		return echo.NewHTTPError(code, message).Wrap(internal)
	},
	HTTPErrorCode: func(err error) (int, bool) {
		var he *echo.HTTPError
		if !errors.As(err, &he) {
			return 0, false
		}
		return he.Code, true
	},
}

// config is the echo5lock.Config that cfg describes.
func config(cfg echocore.Config[*echo.Context]) echo5lock.Config {
	return echo5lock.Config{
		Skipper:      cfg.Skipper,
		Locker:       cfg.Locker,
		KeyExtractor: cfg.KeyExtractor,
		Wait:         cfg.Wait,
		Scope:        cfg.Scope,
		Mode:         cfg.Mode,
		ModeFunc:     cfg.ModeFunc,
		Commit:       cfg.Commit,
		Namespace:    cfg.Namespace,
		RetryAfter:   cfg.RetryAfter,
		DenyHandler:  cfg.DenyHandler,
		ErrorHandler: cfg.ErrorHandler,
		Logger:       cfg.Logger,
	}
}

func middlewareFunc(mw echo.MiddlewareFunc, err error) (echosuite.MiddlewareFunc[*echo.Context], error) {
	if mw == nil {
		return nil, err
	}
	return func(next func(*echo.Context) error) func(*echo.Context) error { return mw(next) }, err
}

// newEcho is the Echo that spec describes.
func newEcho(spec echosuite.EchoSpec[*echo.Context]) http.Handler {
	e := echo.New()
	e.Logger = slog.New(slog.DiscardHandler)
	var route []echo.MiddlewareFunc
	if spec.Middleware != nil {
		route = append(route, echoMiddleware(spec.Middleware))
	}
	for _, r := range spec.Routes {
		e.POST(r, spec.Handler, route...)
		e.GET(r, spec.Handler, route...)
	}
	for _, mw := range spec.Pre {
		e.Pre(echoMiddleware(mw))
	}
	if spec.Recover {
		e.Use(middleware.RecoverWithConfig(middleware.RecoverConfig{DisablePrintStack: true, DisableStackAll: true}))
	}
	for _, mw := range spec.Use {
		e.Use(echoMiddleware(mw))
	}
	if spec.Handled != nil {
		def := e.HTTPErrorHandler
		e.HTTPErrorHandler = func(c *echo.Context, err error) {
			spec.Handled(err)
			def(c, err)
		}
	}
	return e
}

func echoMiddleware(mw echosuite.MiddlewareFunc[*echo.Context]) echo.MiddlewareFunc {
	return func(next echo.HandlerFunc) echo.HandlerFunc { return mw(next) }
}
