package echosuite

import (
	"context"
	"errors"
	"net/http"
	"testing"

	"github.com/pglockkit/kit/pglock"
)

// token: with a Locker made WithToken, the request's context carries the
// lock's fencing token (pglock.TokenFromContext), non-zero and strictly
// increasing from one request for a key to the next, in Session and
// Transaction scope (where pglock.CheckFence in the request's transaction
// accepts it and refuses the previous request's); without WithToken it
// carries none.
func (s *suite[C]) token(t *testing.T) {
	a := s.a
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		t.Run(scope.String(), func(t *testing.T) {
			t.Parallel()
			id := uniqueID(t)
			var tokens []int64
			var herr error
			var rep *replica
			rep = s.replica(t, config[C]{Scope: &scope}, App{Handled: func(err error) { herr = err }}, func(c C) error {
				ctx := a.Request(c).Context()
				tok, ok := pglock.TokenFromContext(ctx)
				if !ok || tok == 0 {
					t.Errorf("TokenFromContext = %d, %v; want a token", tok, ok)
				}
				if scope == pglock.Transaction {
					tx, _ := pglock.TxFromContext(ctx)
					key := s.lockKey(t, rep.Locker, a.PathParam(c, "id"))
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
				return a.NoContent(c, http.StatusOK)
			}, pglock.WithToken())
			if _, err := pglock.Migrate(context.Background(), rep.Pool); err != nil {
				t.Fatal(err)
			}
			for range 2 {
				if rec := serve(rep.e, http.MethodPost, "/orders/"+id); herr != nil || rec.Code != http.StatusOK {
					t.Fatalf("status %d %q, error %v", rec.Code, rec.Body.String(), herr)
				}
			}
			if len(tokens) != 2 || tokens[0] == 0 || tokens[1] <= tokens[0] {
				t.Fatalf("tokens %v, want two non-zero, strictly increasing", tokens)
			}
		})
	}

	t.Run("without WithToken", func(t *testing.T) {
		t.Parallel()
		ran := false
		var herr error
		rep := s.replica(t, config[C]{}, App{Handled: func(err error) { herr = err }}, func(c C) error {
			ran = true
			if tok, ok := pglock.TokenFromContext(a.Request(c).Context()); ok {
				t.Errorf("TokenFromContext = %d, true; want none without WithToken", tok)
			}
			return a.NoContent(c, http.StatusOK)
		})
		if rec := serve(rep.e, http.MethodPost, "/orders/"+uniqueID(t)); herr != nil || rec.Code != http.StatusOK || !ran {
			t.Fatalf("status %d, error %v, ran %v", rec.Code, herr, ran)
		}
	})
}
