package bench

import (
	"context"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// heldCounts are the numbers of locks held while BenchmarkHeldCost measures.
var heldCounts = []int{0, 1_000, 10_000, 20_000}

// BenchmarkHeldCost: the cost of one TryAcquire + Release of a fresh key on
// a default multiplexing Locker (two lock connections) that already holds N
// locks, for N in heldCounts. Each "held=N" has two paired sub-benchmarks:
//
//   - "vs-raw": beside raw pgx on one connection that holds N locks itself,
//     pg_try_advisory_lock then pg_advisory_unlock (two round trips, as the
//     library's): "pglock/raw".
//   - "vs-empty": beside the same operation on a second Locker that holds
//     nothing: "held/empty", the figure the cost-stays-flat promise is about
//     (PostgreSQL walks a session's local lock table at the end of every
//     transaction, so a statement on a session that holds many locks pays for
//     each, unless it runs inside an open transaction block).
//
// It runs on a throwaway cluster (max_locks_per_transaction 512) only, so
// that the locks have room and nothing else shares the server.
func BenchmarkHeldCost(b *testing.B) {
	srv := pgtest.ThrowawayT(b, map[string]string{"max_locks_per_transaction": "512"})
	ctx := callerCtx(b)
	newPool := func() *pgxpool.Pool {
		cfg, err := pgxpool.ParseConfig(srv.URL)
		must(b, err)
		cfg.MaxConns = 4
		pool, err := pgxpool.NewWithConfig(ctx, cfg)
		must(b, err)
		b.Cleanup(pool.Close)
		return pool
	}
	for _, n := range heldCounts {
		b.Run(fmt.Sprintf("held=%d", n), func(b *testing.B) {
			lk := newLocker(b, newPool())
			held := make([]*pglock.Lock, n)
			b.Cleanup(func() {
				for _, l := range held {
					_ = l.Release(context.Background())
				}
			})
			ks := keys(b, n)
			holdAll(b, ctx, lk, ks, held, 64)
			if s := lk.Stats(); s.ServerLocks != n {
				b.Fatalf("holding %d locks: %+v", n, s)
			}
			fresh := keys(b, 3)
			l, err := lk.NewLock(fresh[0])
			must(b, err)
			lib := func() {
				ok, err := l.TryAcquire(ctx)
				must(b, err)
				if !ok {
					b.Fatal("busy")
				}
				must(b, l.Release(ctx))
			}
			b.Run("vs-raw/paired", func(b *testing.B) {
				rawConn, err := pgx.Connect(ctx, srv.URL)
				must(b, err)
				defer rawConn.Close(context.Background())
				if n > 0 {
					var batch pgx.Batch
					for _, k := range keys(b, n) {
						batch.Queue("SELECT pg_advisory_lock($1::bigint)", k.Int64())
					}
					must(b, rawConn.SendBatch(ctx, &batch).Close())
				}
				rk := fresh[1].Int64()
				raw := func() {
					var ok bool
					must(b, rawConn.QueryRow(ctx, "SELECT pg_try_advisory_lock($1::bigint)", rk).Scan(&ok))
					if !ok {
						b.Fatal("busy")
					}
					must(b, rawConn.QueryRow(ctx, "SELECT pg_advisory_unlock($1::bigint)", rk).Scan(&ok))
				}
				lib()
				raw()
				pgtest.Paired(b, "pglock", lib, raw)
			})
			b.Run("vs-empty/paired", func(b *testing.B) {
				empty, err := newLocker(b, newPool()).NewLock(fresh[2])
				must(b, err)
				base := func() {
					ok, err := empty.TryAcquire(ctx)
					must(b, err)
					if !ok {
						b.Fatal("busy")
					}
					must(b, empty.Release(ctx))
				}
				lib()
				base()
				pgtest.PairedAs(b, "held", "empty", lib, base)
			})
		})
	}
}
