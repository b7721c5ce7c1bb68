package httplock_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
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
	rep := newReplica(t, 4, pglock.WithToken())
	if _, err := pglock.Migrate(context.Background(), rep.pool); err != nil {
		t.Fatal(err)
	}
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		t.Run(scope.String(), func(t *testing.T) {
			id := pgtest.UniqueKey(t)
			key := lockKey(t, rep.locker, id)
			var tokens []int64
			h, err := httplock.Handler(rep.locker, func(*http.Request) (string, bool, error) { return id, true, nil },
				http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					tok, ok := pglock.TokenFromContext(r.Context())
					if !ok || tok == 0 {
						t.Errorf("TokenFromContext = %d, %v; want a token", tok, ok)
					}
					if scope == pglock.Transaction {
						tx, _ := pglock.TxFromContext(r.Context())
						if err := pglock.CheckFence(r.Context(), tx, key, tok); err != nil {
							t.Errorf("CheckFence of the request's token: %v", err)
						}
						if len(tokens) > 0 {
							if err := pglock.CheckFence(r.Context(), tx, key, tokens[len(tokens)-1]); !errorsIs(err, pglock.ErrFenced) {
								t.Errorf("CheckFence of the previous request's token: %v, want ErrFenced", err)
							}
						}
					}
					tokens = append(tokens, tok)
				}), httplock.WithScope(scope))
			if err != nil {
				t.Fatal(err)
			}
			for range 2 {
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
				if rec.Code != http.StatusOK {
					t.Fatalf("status %d %q", rec.Code, rec.Body.String())
				}
			}
			if len(tokens) != 2 || tokens[0] == 0 || tokens[1] <= tokens[0] {
				t.Fatalf("tokens %v, want two non-zero, strictly increasing", tokens)
			}
		})
	}

	t.Run("without WithToken", func(t *testing.T) {
		plain := newReplica(t, 2)
		id := pgtest.UniqueKey(t)
		ran := false
		h, err := httplock.Handler(plain.locker, func(*http.Request) (string, bool, error) { return id, true, nil },
			http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				ran = true
				if tok, ok := pglock.TokenFromContext(r.Context()); ok {
					t.Errorf("TokenFromContext = %d, true; want none without WithToken", tok)
				}
			}))
		if err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
		if rec.Code != http.StatusOK || !ran {
			t.Fatalf("status %d, ran %v", rec.Code, ran)
		}
	})
}
