package echolock_test

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"testing"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"

	"github.com/pglockkit/kit/internal/echocore"
	"github.com/pglockkit/kit/internal/echosuite"
	"github.com/pglockkit/kit/middleware/echolock"
	"github.com/pglockkit/kit/pglock"
)

// TestAcceptance runs the acceptance suite that echolock shares with
// echo5lock (package echosuite) on Echo v4.
func TestAcceptance(t *testing.T) { echosuite.Run(t, adapter) }

// adapter is echolock and Echo v4 as the suite drives them.
var adapter = echosuite.Adapter[echo.Context]{
	Namespace: echolock.DefaultNamespace,
	Errors: echocore.Errors{
		NilLocker:       echolock.ErrNilLocker,
		NilKeyExtractor: echolock.ErrNilKeyExtractor,
		InvalidConfig:   echolock.ErrInvalidConfig,
		Key:             echolock.ErrKey,
		Busy:            echolock.ErrBusy,
		Database:        echolock.ErrDatabase,
		RequestEnded:    echolock.ErrRequestEnded,
	},
	DefaultDeny:          echolock.DefaultConfig.DenyHandler,
	DefaultError:         echolock.DefaultConfig.ErrorHandler,
	ParamKey:             func(name string) echosuite.Extractor[echo.Context] { return echolock.Param(name) },
	HeaderKey:            func(name string) echosuite.Extractor[echo.Context] { return echolock.Header(name) },
	QueryParamKey:        func(name string) echosuite.Extractor[echo.Context] { return echolock.QueryParam(name) },
	MethodPathKey:        func() echosuite.Extractor[echo.Context] { return echolock.MethodPath() },
	SharedForSafeMethods: echolock.SharedForSafeMethods,
	New: func(lk *pglock.Locker, key echosuite.Extractor[echo.Context]) (echosuite.MiddlewareFunc[echo.Context], error) {
		return middlewareFunc(echolock.New(lk, key))
	},
	Middleware: func(cfg echocore.Config[echo.Context]) (echosuite.MiddlewareFunc[echo.Context], error) {
		return middlewareFunc(echolock.WithConfig(config(cfg)))
	},
	Echo:       newEcho,
	NewContext: func(r *http.Request, w http.ResponseWriter) echo.Context { return echo.New().NewContext(r, w) },

	Request:    echo.Context.Request,
	PathParam:  echo.Context.Param,
	QueryParam: echo.Context.QueryParam,
	String:     echo.Context.String,
	NoContent:  echo.Context.NoContent,
	JSON:       echo.Context.JSON,
	Response:   func(c echo.Context) http.ResponseWriter { return c.Response() },
	Status:     func(c echo.Context) int { return c.Response().Status },
	Committed:  func(c echo.Context) bool { return c.Response().Committed },
	Flush:      func(c echo.Context) { c.Response().Flush() },
	Hijack:     func(c echo.Context) (net.Conn, *bufio.ReadWriter, error) { return c.Response().Hijack() },
	HTTPError: func(code int, message string, internal error) error {
		return echo.NewHTTPError(code, message).SetInternal(internal)
	},
	HTTPErrorCode: func(err error) (int, bool) {
		var he *echo.HTTPError
		if !errors.As(err, &he) {
			return 0, false
		}
		return he.Code, true
	},
}

// config is the echolock.Config that cfg describes. A Scope or Mode that
// cfg sets is set as an Echo v4 user would: the value, with ScopeSet or
// ModeSet only for the zero value (pglock.Session, pglock.Exclusive), which
// alone would follow the Locker; the suite's FollowsLocker covers both ways.
func config(cfg echocore.Config[echo.Context]) echolock.Config {
	c := echolock.Config{
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
	if cfg.Scope != nil {
		c.Scope, c.ScopeSet = *cfg.Scope, *cfg.Scope == pglock.Session
	}
	if cfg.Mode != nil {
		c.Mode, c.ModeSet = *cfg.Mode, *cfg.Mode == pglock.Exclusive
	}
	return c
}

func middlewareFunc(mw echo.MiddlewareFunc, err error) (echosuite.MiddlewareFunc[echo.Context], error) {
	if mw == nil {
		return nil, err
	}
	return func(next func(echo.Context) error) func(echo.Context) error { return mw(next) }, err
}

// newEcho is the Echo that spec describes.
func newEcho(spec echosuite.EchoSpec[echo.Context]) http.Handler {
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.Logger.SetOutput(io.Discard)
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
		e.HTTPErrorHandler = func(err error, c echo.Context) {
			spec.Handled(err)
			e.DefaultHTTPErrorHandler(err, c)
		}
	}
	return e
}

func echoMiddleware(mw echosuite.MiddlewareFunc[echo.Context]) echo.MiddlewareFunc {
	return func(next echo.HandlerFunc) echo.HandlerFunc { return mw(next) }
}
