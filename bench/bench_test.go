package bench

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// pair is one comparison: the library's operation and raw pgx doing the same
// SQL, each run once per call, on the same pool.
type pair struct {
	lib, raw func(b *testing.B)
}

// run measures p three ways: "pglock" and "raw" alone (ns/op, B/op,
// allocs/op), and "paired" (pgtest.Paired), which alternates the two in one
// loop and reports each one's ns/op and their ratio. On a shared or virtual
// machine the paired ratio is the figure to trust: both sides see the same
// noise.
func run(b *testing.B, setup func(b *testing.B, pool *pgxpool.Pool, k, rk pglock.Key) pair) {
	mk := func(b *testing.B) pair {
		pool := pgtest.Pool(b, 4)
		ctx := context.Background()
		for range 4 {
			if err := pool.Ping(ctx); err != nil {
				b.Fatal(err)
			}
		}
		k, err := pglock.KeyOf(pgtest.UniqueKey(b))
		if err != nil {
			b.Fatal(err)
		}
		rk, err := pglock.KeyOf(pgtest.UniqueKey(b))
		if err != nil {
			b.Fatal(err)
		}
		p := setup(b, pool, k, rk)
		p.lib(b) // warm the statement caches
		p.raw(b)
		return p
	}
	b.Run("pglock", func(b *testing.B) {
		p := mk(b)
		b.ReportAllocs()
		for b.Loop() {
			p.lib(b)
		}
	})
	b.Run("raw", func(b *testing.B) {
		p := mk(b)
		b.ReportAllocs()
		for b.Loop() {
			p.raw(b)
		}
	})
	b.Run("paired", func(b *testing.B) {
		p := mk(b)
		pgtest.Paired(b, "pglock", func() { p.lib(b) }, func() { p.raw(b) })
	})
}

func must(b *testing.B, err error) {
	if err != nil {
		b.Fatal(err)
	}
}

// rawLockUnlock is what a service does without the library: pin a pool
// connection, lock (lockSQL), unlock, and check the unlock's result.
func rawLockUnlock(ctx context.Context, b *testing.B, pool *pgxpool.Pool, lockSQL string, k pglock.Key, work func()) {
	c, err := pool.Acquire(ctx)
	must(b, err)
	defer c.Release()
	var ok bool
	if lockSQL == "SELECT pg_try_advisory_lock($1::bigint)" {
		must(b, c.QueryRow(ctx, lockSQL, k.Int64()).Scan(&ok))
		if !ok {
			b.Fatal("busy")
		}
	} else {
		_, err = c.Exec(ctx, lockSQL, k.Int64())
		must(b, err)
	}
	work()
	must(b, c.QueryRow(ctx, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()).Scan(&ok))
	if !ok {
		b.Fatal("unlock: not held")
	}
}

// Session Acquire + Release, uncontended, on a pool.
func BenchmarkSessionAcquireRelease(b *testing.B) {
	ctx := context.Background()
	run(b, func(b *testing.B, pool *pgxpool.Pool, k, rk pglock.Key) pair {
		l, err := pglock.New(pool, k)
		must(b, err)
		return pair{
			lib: func(b *testing.B) {
				must(b, l.Acquire(ctx))
				must(b, l.Release(ctx))
			},
			raw: func(b *testing.B) {
				rawLockUnlock(ctx, b, pool, "SELECT pg_advisory_lock($1::bigint)", rk, func() {})
			},
		}
	})
}

// TryAcquire + Release, uncontended, on a pool.
func BenchmarkTryAcquireRelease(b *testing.B) {
	ctx := context.Background()
	run(b, func(b *testing.B, pool *pgxpool.Pool, k, rk pglock.Key) pair {
		l, err := pglock.New(pool, k)
		must(b, err)
		return pair{
			lib: func(b *testing.B) {
				ok, err := l.TryAcquire(ctx)
				must(b, err)
				if !ok {
					b.Fatal("busy")
				}
				must(b, l.Release(ctx))
			},
			raw: func(b *testing.B) {
				rawLockUnlock(ctx, b, pool, "SELECT pg_try_advisory_lock($1::bigint)", rk, func() {})
			},
		}
	})
}

// Transaction scope inside a caller's transaction: begin, lock, commit.
func BenchmarkCallerTx(b *testing.B) {
	ctx := context.Background()
	run(b, func(b *testing.B, pool *pgxpool.Pool, k, rk pglock.Key) pair {
		return pair{
			lib: func(b *testing.B) {
				tx, err := pool.Begin(ctx)
				must(b, err)
				l, err := pglock.New(tx, k)
				must(b, err)
				must(b, l.Acquire(ctx))
				must(b, l.Release(ctx))
				must(b, tx.Commit(ctx))
			},
			raw: func(b *testing.B) {
				tx, err := pool.Begin(ctx)
				must(b, err)
				_, err = tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1::bigint)", rk.Int64())
				must(b, err)
				must(b, tx.Commit(ctx))
			},
		}
	})
}

// Do on a pool in Session scope, with a function that does nothing.
func BenchmarkDoSession(b *testing.B) {
	ctx := context.Background()
	noop := func(context.Context) error { return nil }
	run(b, func(b *testing.B, pool *pgxpool.Pool, k, rk pglock.Key) pair {
		lk, err := pglock.NewLocker(pool)
		must(b, err)
		b.Cleanup(func() { _ = lk.Close() })
		return pair{
			lib: func(b *testing.B) { must(b, lk.Do(ctx, k, noop)) },
			raw: func(b *testing.B) {
				rawLockUnlock(ctx, b, pool, "SELECT pg_advisory_lock($1::bigint)", rk, func() { must(b, noop(ctx)) })
			},
		}
	})
}

// Do on a pool in Transaction scope: the lock's own transaction, committed.
func BenchmarkDoTransaction(b *testing.B) {
	ctx := context.Background()
	noop := func(context.Context) error { return nil }
	run(b, func(b *testing.B, pool *pgxpool.Pool, k, rk pglock.Key) pair {
		lk, err := pglock.NewLocker(pool, pglock.WithScope(pglock.Transaction))
		must(b, err)
		b.Cleanup(func() { _ = lk.Close() })
		return pair{
			lib: func(b *testing.B) { must(b, lk.Do(ctx, k, noop)) },
			raw: func(b *testing.B) {
				must(b, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
					if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1::bigint)", rk.Int64()); err != nil {
						return err
					}
					return noop(ctx)
				}))
			},
		}
	})
}
