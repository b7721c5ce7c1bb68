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

func setup(b *testing.B) (*pgxpool.Pool, pglock.Key) {
	pool := pgtest.Pool(b, 4)
	// Warm the pool and the statement caches outside the timed loop.
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
	return pool, k
}

func must(b *testing.B, err error) {
	if err != nil {
		b.Fatal(err)
	}
}

// Session Acquire + Release, uncontended, on a pool.
func BenchmarkSessionAcquireRelease(b *testing.B) {
	ctx := context.Background()
	b.Run("pglock", func(b *testing.B) {
		pool, k := setup(b)
		l, err := pglock.New(pool, k)
		must(b, err)
		for b.Loop() {
			must(b, l.Acquire(ctx))
			must(b, l.Release(ctx))
		}
	})
	b.Run("raw", func(b *testing.B) {
		pool, k := setup(b)
		for b.Loop() {
			c, err := pool.Acquire(ctx)
			must(b, err)
			_, err = c.Exec(ctx, "SELECT pg_advisory_lock($1::bigint)", k.Int64())
			must(b, err)
			var ok bool
			must(b, c.QueryRow(ctx, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()).Scan(&ok))
			c.Release()
		}
	})
}

// TryAcquire + Release, uncontended, on a pool.
func BenchmarkTryAcquireRelease(b *testing.B) {
	ctx := context.Background()
	b.Run("pglock", func(b *testing.B) {
		pool, k := setup(b)
		l, err := pglock.New(pool, k)
		must(b, err)
		for b.Loop() {
			ok, err := l.TryAcquire(ctx)
			must(b, err)
			if !ok {
				b.Fatal("busy")
			}
			must(b, l.Release(ctx))
		}
	})
	b.Run("raw", func(b *testing.B) {
		pool, k := setup(b)
		for b.Loop() {
			c, err := pool.Acquire(ctx)
			must(b, err)
			var ok bool
			must(b, c.QueryRow(ctx, "SELECT pg_try_advisory_lock($1::bigint)", k.Int64()).Scan(&ok))
			if !ok {
				b.Fatal("busy")
			}
			must(b, c.QueryRow(ctx, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()).Scan(&ok))
			c.Release()
		}
	})
}

// Transaction scope inside a caller's transaction: begin, lock, commit.
func BenchmarkCallerTx(b *testing.B) {
	ctx := context.Background()
	b.Run("pglock", func(b *testing.B) {
		pool, k := setup(b)
		for b.Loop() {
			tx, err := pool.Begin(ctx)
			must(b, err)
			l, err := pglock.New(tx, k)
			must(b, err)
			must(b, l.Acquire(ctx))
			must(b, l.Release(ctx))
			must(b, tx.Commit(ctx))
		}
	})
	b.Run("raw", func(b *testing.B) {
		pool, k := setup(b)
		for b.Loop() {
			tx, err := pool.Begin(ctx)
			must(b, err)
			_, err = tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1::bigint)", k.Int64())
			must(b, err)
			must(b, tx.Commit(ctx))
		}
	})
}

// Do on a pool in Session scope, with a function that does nothing.
func BenchmarkDoSession(b *testing.B) {
	ctx := context.Background()
	noop := func(context.Context) error { return nil }
	b.Run("pglock", func(b *testing.B) {
		pool, k := setup(b)
		lk, err := pglock.NewLocker(pool)
		must(b, err)
		for b.Loop() {
			must(b, lk.Do(ctx, k, noop))
		}
	})
	b.Run("raw", func(b *testing.B) {
		pool, k := setup(b)
		for b.Loop() {
			c, err := pool.Acquire(ctx)
			must(b, err)
			_, err = c.Exec(ctx, "SELECT pg_advisory_lock($1::bigint)", k.Int64())
			must(b, err)
			must(b, noop(ctx))
			var ok bool
			must(b, c.QueryRow(ctx, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()).Scan(&ok))
			c.Release()
		}
	})
}

// Do on a pool in Transaction scope: the lock's own transaction, committed.
func BenchmarkDoTransaction(b *testing.B) {
	ctx := context.Background()
	noop := func(context.Context) error { return nil }
	b.Run("pglock", func(b *testing.B) {
		pool, k := setup(b)
		lk, err := pglock.NewLocker(pool, pglock.WithScope(pglock.Transaction))
		must(b, err)
		for b.Loop() {
			must(b, lk.Do(ctx, k, noop))
		}
	})
	b.Run("raw", func(b *testing.B) {
		pool, k := setup(b)
		for b.Loop() {
			must(b, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
				if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1::bigint)", k.Int64()); err != nil {
					return err
				}
				return noop(ctx)
			}))
		}
	})
}
