package cronlock_test

import (
	"context"
	"errors"
	"testing"

	"github.com/pglockkit/kit/cronlock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// With a Locker made WithToken, a Func job's context carries the lock's
// fencing token (pglock.TokenFromContext): non-zero and strictly increasing
// from one run to the next, in Session and Transaction scope (where
// pglock.CheckFence in the job's transaction accepts it and refuses the
// previous run's). Without WithToken it carries none.
func TestToken(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	if _, err := pglock.Migrate(ctx, pgtest.Pool(t, 1)); err != nil {
		t.Fatal(err)
	}
	lk := newLockers(t, 1, pglock.WithToken())[0]
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		t.Run(scope.String(), func(t *testing.T) {
			var tokens []int64
			var job *cronlock.Job
			job, err := cronlock.Func(lk, pgtest.UniqueKey(t), func(ctx context.Context) error {
				tok, ok := pglock.TokenFromContext(ctx)
				if !ok || tok == 0 {
					t.Errorf("TokenFromContext = %d, %v; want a token", tok, ok)
				}
				if scope == pglock.Transaction {
					tx, _ := pglock.TxFromContext(ctx)
					if err := pglock.CheckFence(ctx, tx, job.Key(), tok); err != nil {
						t.Errorf("CheckFence of the run's token: %v", err)
					}
					if len(tokens) > 0 {
						if err := pglock.CheckFence(ctx, tx, job.Key(), tokens[len(tokens)-1]); !errors.Is(err, pglock.ErrFenced) {
							t.Errorf("CheckFence of the previous run's token: %v, want ErrFenced", err)
						}
					}
				}
				tokens = append(tokens, tok)
				return nil
			}, cronlock.WithScope(scope))
			if err != nil {
				t.Fatal(err)
			}
			for range 2 {
				if ran, err := job.RunContext(ctx); !ran || err != nil {
					t.Fatalf("RunContext = (%v, %v)", ran, err)
				}
			}
			if len(tokens) != 2 || tokens[0] == 0 || tokens[1] <= tokens[0] {
				t.Fatalf("tokens %v, want two non-zero, strictly increasing", tokens)
			}
		})
	}

	t.Run("without WithToken", func(t *testing.T) {
		plain := newLockers(t, 1)[0]
		job, err := cronlock.Func(plain, pgtest.UniqueKey(t), func(ctx context.Context) error {
			if tok, ok := pglock.TokenFromContext(ctx); ok {
				t.Errorf("TokenFromContext = %d, true; want none without WithToken", tok)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if ran, err := job.RunContext(ctx); !ran || err != nil {
			t.Fatalf("RunContext = (%v, %v)", ran, err)
		}
	})
}
