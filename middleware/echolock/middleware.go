package echolock

import (
	"net/http"

	"github.com/labstack/echo/v4"

	"github.com/pglockkit/kit/internal/echocore"
	"github.com/pglockkit/kit/internal/holdwriter"
)

// framework is Echo v4 as package echocore, which runs the middleware, sees
// it. In Transaction scope the handler writes through a holdwriter.Writer
// put under the request's own *echo.Response (its Writer); dropping the held
// response marks that Response uncommitted again, so that the DenyHandler,
// the ErrorHandler and Echo's HTTPErrorHandler answer on it as if the
// handler had written nothing.
var framework = echocore.Framework[echo.Context]{
	Name: "echolock",
	Errors: echocore.Errors{
		NilLocker:       ErrNilLocker,
		NilKeyExtractor: ErrNilKeyExtractor,
		InvalidConfig:   ErrInvalidConfig,
		Key:             ErrKey,
		Busy:            ErrBusy,
		Database:        ErrDatabase,
		RequestEnded:    ErrRequestEnded,
	},
	Request:    func(c echo.Context) *http.Request { return c.Request() },
	SetRequest: func(c echo.Context, r *http.Request) { c.SetRequest(r) },
	Header:     func(c echo.Context) http.Header { return c.Response().Header() },
	Hold: func(c echo.Context) (*holdwriter.Writer, func()) {
		resp := c.Response()
		orig := resp.Writer
		tw := holdwriter.New(orig)
		resp.Writer = tw
		return tw, func() { resp.Writer = orig }
	},
	Reset: func(c echo.Context) {
		resp := c.Response()
		resp.Committed, resp.Status, resp.Size = false, http.StatusOK, 0
	},
	HTTPError: func(code int, message string, internal error) error {
		return &echo.HTTPError{Code: code, Message: message, Internal: internal}
	},
}
