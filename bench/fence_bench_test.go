package bench

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock"
)

// rawTokenSQL is the statement pglock runs to take a token on a session.
const rawTokenSQL = `WITH held AS (
	SELECT 1 FROM pglock.fence WHERE key_space = 1 AND key = $1::bigint FOR UPDATE NOWAIT)
INSERT INTO pglock.fence AS f (key_space, key, token)
SELECT 1, $1::bigint, nextval('pglock.fence_token') FROM (SELECT count(*) FROM held) AS h
ON CONFLICT (key_space, key) DO UPDATE SET token = EXCLUDED.token, granted_at = clock_timestamp()
RETURNING f.token`

// Session Acquire + Release of a Lock made WithToken (a fencing token taken
// on the lock's session after the grant) beside raw pgx doing the same three
// statements on one pinned connection: lock, take the token, unlock.
func BenchmarkTokenAcquireRelease(b *testing.B) {
	run(b, func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair {
		_, err := pglock.Migrate(ctx, pool)
		must(b, err)
		l, err := pglock.NewLock(pool, k, pglock.WithToken())
		must(b, err)
		return pair{
			lib: func(b *testing.B) {
				must(b, l.Acquire(ctx))
				if l.Token() == 0 {
					b.Fatal("no token")
				}
				must(b, l.Release(ctx))
			},
			raw: func(b *testing.B) {
				rawSession(ctx, b, pool, rk, func() {
					var token int64
					must(b, pool.QueryRow(ctx, rawTokenSQL, rk.Int64()).Scan(&token))
				})
			},
		}
	})
}

// The same Lock without a token beside the same Lock with one: what a token
// costs (one more round trip on the lock's session).
func BenchmarkTokenVsNoToken(b *testing.B) {
	run(b, func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair {
		_, err := pglock.Migrate(ctx, pool)
		must(b, err)
		withToken, err := pglock.NewLock(pool, k, pglock.WithToken())
		must(b, err)
		plain, err := pglock.NewLock(pool, rk)
		must(b, err)
		return pair{
			lib: func(b *testing.B) {
				must(b, withToken.Acquire(ctx))
				must(b, withToken.Release(ctx))
			},
			raw: func(b *testing.B) {
				must(b, plain.Acquire(ctx))
				must(b, plain.Release(ctx))
			},
		}
	})
}

// CheckFence in a transaction that writes nothing else, beside raw pgx
// running the same SELECT ... FOR SHARE in the same kind of transaction.
func BenchmarkCheckFence(b *testing.B) {
	run(b, func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair {
		_, err := pglock.Migrate(ctx, pool)
		must(b, err)
		l, err := pglock.NewLock(pool, k, pglock.WithToken())
		must(b, err)
		must(b, l.Acquire(ctx))
		b.Cleanup(func() { _ = l.Release(context.Background()) })
		token := l.Token()
		return pair{
			lib: func(b *testing.B) {
				must(b, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
					return pglock.CheckFence(ctx, tx, k, token)
				}))
			},
			raw: func(b *testing.B) {
				must(b, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
					var got int64
					err := tx.QueryRow(ctx, "SELECT token FROM pglock.fence WHERE key_space = $1 AND key = $2 FOR SHARE", int16(1), k.Int64()).Scan(&got)
					if err == nil && got != token {
						b.Fatal("fenced")
					}
					return err
				}))
			},
		}
	})
}
