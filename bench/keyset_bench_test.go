package bench

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock"
)

// A set of 3 keys, uncontended: Locker.DoAll in Session scope (the tries of
// the set share the lock connections' statements, and so do the unlocks),
// beside raw pgx on a pool connection taking the 3 keys in one statement
// and giving them back in another (the fewest round trips: 2).
func BenchmarkKeySet(b *testing.B) {
	run(b, func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, _, _ pglock.Key) pair {
		lk := newLocker(b, pool)
		lks := keys(b, 3)
		set := []any{lks[0], lks[1], lks[2]}
		rks := keys(b, 3)
		raw := func(b *testing.B) {
			c, err := pool.Acquire(ctx)
			must(b, err)
			defer c.Release()
			_, err = c.Exec(ctx, "SELECT pg_advisory_lock($1::bigint), pg_advisory_lock($2::bigint), pg_advisory_lock($3::bigint)",
				rks[0].Int64(), rks[1].Int64(), rks[2].Int64())
			must(b, err)
			var a, bb, cc bool
			must(b, c.QueryRow(ctx, "SELECT pg_advisory_unlock($1::bigint), pg_advisory_unlock($2::bigint), pg_advisory_unlock($3::bigint)",
				rks[0].Int64(), rks[1].Int64(), rks[2].Int64()).Scan(&a, &bb, &cc))
			if !a || !bb || !cc {
				b.Fatal("raw unlock: not held")
			}
		}
		return pair{
			lib: func(b *testing.B) { must(b, lk.DoAll(ctx, set, noop)) },
			raw: raw,
		}
	})
}

// A Semaphore of 3 slots, uncontended: Semaphore.Do (a try of a free slot on
// a lock connection, then its unlock) beside raw pgx on a pool connection
// doing the same SQL (pg_try_advisory_lock of the slot, then its unlock).
func BenchmarkSemaphore(b *testing.B) {
	run(b, func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair {
		lk := newLocker(b, pool)
		s, err := lk.Semaphore(k.String(), 3)
		must(b, err)
		raw := func(b *testing.B) {
			c, err := pool.Acquire(ctx)
			must(b, err)
			defer c.Release()
			var ok bool
			must(b, c.QueryRow(ctx, "SELECT pg_try_advisory_lock($1::bigint)", rk.Int64()).Scan(&ok))
			if !ok {
				b.Fatal("raw try: busy")
			}
			must(b, c.QueryRow(ctx, "SELECT pg_advisory_unlock($1::bigint)", rk.Int64()).Scan(&ok))
			if !ok {
				b.Fatal("raw unlock: not held")
			}
		}
		return pair{lib: func(b *testing.B) { must(b, s.Do(ctx, noop)) }, raw: raw}
	})
}
