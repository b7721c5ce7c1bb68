package grpclock_test

import (
	"context"
	"testing"

	"github.com/pglockkit/kit/grpclock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// With a Locker made WithToken, the call's context carries the lock's
// fencing token (pglock.TokenFromContext): non-zero and strictly increasing
// from one call for a key to the next, for unary calls and streams (keyed by
// the first message, whose handler took the context before the lock was
// held, or by metadata), in Session and Transaction scope. Without
// WithToken it carries none.
func TestToken(t *testing.T) {
	t.Parallel()
	if _, err := pglock.Migrate(t.Context(), pgtest.Pool(t, 1)); err != nil {
		t.Fatal(err)
	}
	metadataKey := grpclock.WithStreamKeyFunc(grpclock.MetadataKey("x-lock-key"))
	for _, kind := range []struct {
		name string
		opts []grpclock.Option
		call func(ctx context.Context, r *replica, key string) (*workResponse, error)
	}{
		{"unary", nil, func(ctx context.Context, r *replica, key string) (*workResponse, error) {
			return r.work(ctx, &workRequest{Key: key})
		}},
		{"stream/first-message", nil, func(ctx context.Context, r *replica, key string) (*workResponse, error) {
			return r.stream(ctx, &workRequest{Key: key})
		}},
		{"stream/metadata", []grpclock.Option{metadataKey}, func(ctx context.Context, r *replica, key string) (*workResponse, error) {
			return r.stream(ctx, &workRequest{Key: key}, "x-lock-key", key)
		}},
	} {
		for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
			t.Run(kind.name+"/"+scope.String(), func(t *testing.T) {
				r := startReplica(t, newWorker(), []pglock.Option{pglock.WithToken(), pglock.WithScope(scope)}, kind.opts...)
				key := pgtest.UniqueKey(t)
				var tokens []int64
				for range 2 {
					resp, err := kind.call(t.Context(), r, key)
					if err != nil {
						t.Fatal(err)
					}
					if !resp.HasToken || resp.Token == 0 {
						t.Fatalf("handler's context: token %d, %v; want a token", resp.Token, resp.HasToken)
					}
					if resp.HasTx != (scope == pglock.Transaction) {
						t.Errorf("handler's context has a transaction: %v, in %v scope", resp.HasTx, scope)
					}
					tokens = append(tokens, resp.Token)
				}
				if tokens[1] <= tokens[0] {
					t.Fatalf("tokens %v, want strictly increasing", tokens)
				}
				pgtest.WaitFree(t, r.pool, lockKey(t, r, key))
			})
		}
		t.Run(kind.name+"/without WithToken", func(t *testing.T) {
			r := startReplica(t, newWorker(), nil, kind.opts...)
			resp, err := kind.call(t.Context(), r, pgtest.UniqueKey(t))
			if err != nil {
				t.Fatal(err)
			}
			if resp.HasToken {
				t.Fatalf("handler's context: token %d; want none without WithToken", resp.Token)
			}
		})
	}
}
