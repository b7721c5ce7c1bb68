package echo5lock_test

import (
	"net/http"
	"testing"

	"github.com/labstack/echo/v5"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/echo5lock"
	"github.com/pglockkit/kit/pglock"
)

// TestOuterResponseSeesOnlyWhatIsSent: in Transaction scope, outer
// middleware sees the request's *echo.Response untouched while the
// handler's response (an *echo.Response of its own) is held, and the status
// finally sent afterwards.
func TestOuterResponseSeesOnlyWhatIsSent(t *testing.T) {
	t.Parallel()
	var duringHandler, after int
	var committedDuring bool
	var outer *echo.Response
	rep := locktest.NewReplica(t, 4, func(lk *pglock.Locker) http.Handler {
		mw, err := echo5lock.Config{Locker: lk, KeyExtractor: echo5lock.Param("id"), Scope: new(pglock.Transaction)}.ToMiddleware()
		if err != nil {
			t.Fatal(err)
		}
		e := echo.New()
		e.Use(func(next echo.HandlerFunc) echo.HandlerFunc {
			return func(c *echo.Context) error {
				outer, _ = echo.UnwrapResponse(c.Response())
				err := next(c)
				_, after = echo.ResolveResponseStatus(c.Response(), err)
				return err
			}
		})
		e.POST("/orders/:id", func(c *echo.Context) error {
			if err := c.String(http.StatusCreated, "made"); err != nil {
				return err
			}
			committedDuring, duringHandler = outer.Committed, outer.Status
			inner, err := echo.UnwrapResponse(c.Response())
			if err != nil || inner == outer || !inner.Committed || inner.Status != http.StatusCreated {
				t.Errorf("the handler's own response: %+v, %v", inner, err)
			}
			return nil
		}, mw)
		return e
	})
	if r := locktest.Do(rep.Server, http.MethodPost, "/orders/"+pgtest.UniqueKey(t)); r.Status != http.StatusCreated || r.Body != "made" {
		t.Fatalf("%+v", r)
	}
	if committedDuring || duringHandler != http.StatusOK || after != http.StatusCreated {
		t.Fatalf("outer response while held: committed %v, status %d; after: %d", committedDuring, duringHandler, after)
	}
}
