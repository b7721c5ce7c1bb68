package echo5lock

import (
	"log/slog"
	"net/http"

	"github.com/labstack/echo/v5"

	"github.com/pglockkit/kit/internal/echocore"
	"github.com/pglockkit/kit/internal/holdwriter"
)

// framework is Echo v5 as package echocore, which runs the middleware, sees
// it. In Transaction scope the handler writes to an *echo.Response of its
// own on a holdwriter.Writer over the request's response, so that Echo's
// Response (and whatever outer middleware hooked on it) sees only what is
// sent, and the DenyHandler, the ErrorHandler and Echo's HTTPErrorHandler
// answer on the request's response as if the handler had written nothing.
var framework = echocore.Framework[*echo.Context]{
	Name: "echo5lock",
	Errors: echocore.Errors{
		NilLocker:       ErrNilLocker,
		NilKeyExtractor: ErrNilKeyExtractor,
		InvalidConfig:   ErrInvalidConfig,
		Key:             ErrKey,
		Busy:            ErrBusy,
		Database:        ErrDatabase,
		RequestEnded:    ErrRequestEnded,
	},
	Request:    (*echo.Context).Request,
	SetRequest: (*echo.Context).SetRequest,
	Header:     func(c *echo.Context) http.Header { return c.Response().Header() },
	Hold: func(c *echo.Context) (*holdwriter.Writer, func()) {
		orig := c.Response()
		tw := holdwriter.New(orig)
		resp := echo.NewResponse(tw, logger(c))
		resp.Status = http.StatusOK // as Echo sets it for each request
		c.SetResponse(resp)
		return tw, func() { c.SetResponse(orig) }
	},
	HTTPError: func(code int, message string, internal error) error {
		return echo.NewHTTPError(code, message).Wrap(internal)
	},
}

// logger is the logger of the handler's *echo.Response (it reports a
// status written twice), never nil.
func logger(c *echo.Context) *slog.Logger {
	if l := c.Logger(); l != nil {
		return l
	}
	return slog.New(slog.DiscardHandler)
}
