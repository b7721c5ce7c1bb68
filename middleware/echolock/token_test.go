package echolock_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/labstack/echo/v4"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/echolock"
	"github.com/pglockkit/kit/pglock"
)

// TestToken: with a Locker made WithToken, the request's context carries the
// lock's fencing token (pglock.TokenFromContext), non-zero and strictly
// increasing from one request for a key to the next, in Session and
// Transaction scope (where pglock.CheckFence in the request's transaction
// accepts it and refuses the previous request's); without WithToken it
// carries none.
func TestToken(t *testing.T) {
	t.Parallel()
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		id := pgtest.UniqueKey(t) // named by the parent test: no slash
		t.Run(scope.String(), func(t *testing.T) {
			t.Parallel()
			var tokens []int64
			var rep *replica
			rep = newReplica(t, echolock.Config{Scope: scope}, func(c echo.Context) error {
				ctx := c.Request().Context()
				tok, ok := pglock.TokenFromContext(ctx)
				if !ok || tok == 0 {
					t.Errorf("TokenFromContext = %d, %v; want a token", tok, ok)
				}
				if scope == pglock.Transaction {
					tx, _ := pglock.TxFromContext(ctx)
					key := lockKey(t, rep.Locker, c.Param("id"))
					if err := pglock.CheckFence(ctx, tx, key, tok); err != nil {
						t.Errorf("CheckFence of the request's token: %v", err)
					}
					if len(tokens) > 0 {
						if err := pglock.CheckFence(ctx, tx, key, tokens[len(tokens)-1]); !errors.Is(err, pglock.ErrFenced) {
							t.Errorf("CheckFence of the previous request's token: %v, want ErrFenced", err)
						}
					}
				}
				tokens = append(tokens, tok)
				return c.NoContent(http.StatusOK)
			}, pglock.WithToken())
			if _, err := pglock.Migrate(context.Background(), rep.Pool); err != nil {
				t.Fatal(err)
			}
			for range 2 {
				rec := httptest.NewRecorder()
				rep.e.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/orders/"+id, nil))
				if rec.Code != http.StatusOK {
					t.Fatalf("status %d %q", rec.Code, rec.Body.String())
				}
			}
			if len(tokens) != 2 || tokens[0] == 0 || tokens[1] <= tokens[0] {
				t.Fatalf("tokens %v, want two non-zero, strictly increasing", tokens)
			}
		})
	}

	plainID := pgtest.UniqueKey(t)
	t.Run("without WithToken", func(t *testing.T) {
		t.Parallel()
		ran := false
		rep := newReplica(t, echolock.Config{}, func(c echo.Context) error {
			ran = true
			if tok, ok := pglock.TokenFromContext(c.Request().Context()); ok {
				t.Errorf("TokenFromContext = %d, true; want none without WithToken", tok)
			}
			return c.NoContent(http.StatusOK)
		})
		rec := httptest.NewRecorder()
		rep.e.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/orders/"+plainID, nil))
		if rec.Code != http.StatusOK || !ran {
			t.Fatalf("status %d, ran %v", rec.Code, ran)
		}
	})
}
