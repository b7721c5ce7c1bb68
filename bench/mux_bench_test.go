package bench

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// The multiplexing Locker (session locks on lock connections of its own)
// beside raw pgx doing the same SQL, in the same run, with a cancellable
// context as callers' contexts are (a request's, a job's); the uncontended
// comparisons also with context.Background() (see contexts). Its Do is in
// BenchmarkDoSession/mux and BenchmarkDoAllocs/mux, its behaviour under
// contention in contention_bench_test.go.
//
// Benchmarks whose two sides are measured in rounds (many goroutines at
// once) alternate library and raw rounds in one loop, swapping their order
// every round, so that both see the same machine noise; like pgtest.Paired,
// they report "pglock/raw", the library's time per operation over raw pgx's
// (lower is better; scripts/benchratio.awk summarizes it with the other
// figures of the "paired" sub-benchmark).

// keys returns n keys no other test or run uses.
func keys(b *testing.B, n int) []pglock.Key {
	ks := make([]pglock.Key, n)
	for i := range ks {
		k, err := pglock.KeyOf(pgtest.UniqueKey(b))
		must(b, err)
		ks[i] = k
	}
	return ks
}

// warmPool opens all n connections of pool at once and prepares the raw
// side's statements on each.
func warmPool(ctx context.Context, b *testing.B, pool *pgxpool.Pool, n int) {
	cs := make([]*pgxpool.Conn, n)
	for i := range cs {
		c, err := pool.Acquire(ctx)
		must(b, err)
		cs[i] = c
	}
	k := keys(b, 1)[0].Int64()
	for _, c := range cs {
		_, err := c.Exec(ctx, "SELECT pg_advisory_lock($1::bigint)", k)
		must(b, err)
		var ok bool
		must(b, c.QueryRow(ctx, "SELECT pg_advisory_unlock($1::bigint)", k).Scan(&ok))
		if !ok {
			b.Fatal("warm: unlock: not held")
		}
		c.Release()
	}
}

// holdAll has workers goroutines take the keys ks on lk, each Lock in
// locks[i], and returns how long they took together.
func holdAll(b *testing.B, ctx context.Context, lk *pglock.Locker, ks []pglock.Key, locks []*pglock.Lock, workers int) time.Duration {
	return fanOut(b, workers, func(w int) error {
		for i := w; i < len(ks); i += workers {
			l, err := lk.NewLock(ks[i])
			if err != nil {
				return err
			}
			if err := l.Acquire(ctx); err != nil {
				return err
			}
			locks[i] = l
		}
		return nil
	})
}

// fanOut runs f(0..n-1) in n goroutines and returns how long they took
// together. f reports failures with an error (b.Fatal is for the benchmark's
// own goroutine).
func fanOut(b *testing.B, n int, f func(i int) error) time.Duration {
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Go(func() { errs[i] = f(i) })
	}
	wg.Wait()
	d := time.Since(start)
	must(b, errors.Join(errs...))
	return d
}

// rounds alternates lib and raw, each one round of ops operations, in one
// benchmark loop (swapping their order every round), and reports each one's
// operations per second ("lib-<unit>/s", "raw-<unit>/s"), their quotient
// ("lib/raw-<unit>/s", higher is better for the library) and pglock/raw, the
// library's time per operation over raw pgx's. It returns the number of
// rounds of each.
func rounds(b *testing.B, unit string, ops int, lib, raw func() time.Duration) int {
	var libT, rawT time.Duration
	n := 0
	for b.Loop() {
		if n%2 == 0 {
			libT += lib()
			rawT += raw()
		} else {
			rawT += raw()
			libT += lib()
		}
		n++
	}
	libRate := float64(n*ops) / libT.Seconds()
	rawRate := float64(n*ops) / rawT.Seconds()
	b.ReportMetric(libRate, "lib-"+unit+"/s")
	b.ReportMetric(rawRate, "raw-"+unit+"/s")
	b.ReportMetric(libRate/rawRate, "lib/raw-"+unit+"/s")
	b.ReportMetric(float64(libT)/float64(rawT), "pglock/raw")
	return n
}

// 1. Uncontended Acquire + Release and TryAcquire + Release of one Lock of
// a multiplexing Locker, each beside raw pgx on a pool: pool.Acquire,
// pg_advisory_lock (pg_try_advisory_lock), pg_advisory_unlock, release (two
// round trips, as the library's lock connection needs).
func BenchmarkMuxUncontended(b *testing.B) {
	b.Run("AcquireRelease", func(b *testing.B) {
		run(b, func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair {
			l, err := newLocker(b, pool).NewLock(k)
			must(b, err)
			return pair{
				lib: func(b *testing.B) {
					must(b, l.Acquire(ctx))
					must(b, l.Release(ctx))
				},
				raw: func(b *testing.B) { rawSession(ctx, b, pool, rk, func() {}) },
			}
		})
	})
	b.Run("TryAcquireRelease", func(b *testing.B) {
		run(b, func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair {
			l, err := newLocker(b, pool).NewLock(k)
			must(b, err)
			return tryPair(ctx, pool, l, rk)
		})
	})
}

// What a pgx tracer on the pool costs a Locker's lock connections: Acquire +
// Release of a Lock of a Locker on a pool whose config has a tracer (that
// does nothing), paired with the same on a pool without one. With a tracer,
// lock connections go through pgx's Conn so that it sees their statements;
// without, through pgconn (see lockconn's direct.go). Reported as
// tracer/none.
func BenchmarkMuxTracer(b *testing.B) {
	b.Run("paired", func(b *testing.B) {
		ctx := callerCtx(b)
		lock := func(pool *pgxpool.Pool) func() {
			l, err := newLocker(b, pool).NewLock(keys(b, 1)[0])
			must(b, err)
			return func() {
				must(b, l.Acquire(ctx))
				must(b, l.Release(ctx))
			}
		}
		cfg, err := pgxpool.ParseConfig(pgtest.URL(b))
		must(b, err)
		cfg.MaxConns = 4
		cfg.ConnConfig.Tracer = noopTracer{}
		traced, err := pgxpool.NewWithConfig(ctx, cfg)
		must(b, err)
		b.Cleanup(traced.Close)
		withTracer, without := lock(traced), lock(pgtest.Pool(b, 4))
		withTracer()
		without()
		pgtest.PairedAs(b, "tracer", "none", withTracer, without)
	})
}

// noopTracer is a pgx QueryTracer that does nothing.
type noopTracer struct{}

func (noopTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

func (noopTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// 2. 64 goroutines, each looping lock + unlock on a key of its own: one
// multiplexing Locker (on a pool of 4, which it does not use for its locks)
// beside raw pgx on a pool of 64, where each pair is pool.Acquire,
// pg_advisory_lock, pg_advisory_unlock, release. Reported in lock+unlock
// pairs per second, with 1, 2 (the default) and 4 lock connections.
func BenchmarkMuxParallelDistinctKeys(b *testing.B) {
	const (
		workers = 64
		perLoop = 25 // pairs per goroutine per round
	)
	ctx := callerCtx(b)
	libPool := pgtest.Pool(b, 4)
	rawPool := pgtest.Pool(b, workers)
	warmPool(ctx, b, rawPool, workers)
	rawKeys := keys(b, workers)
	for _, conns := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("conns=%d/paired", conns), func(b *testing.B) {
			lk := newLocker(b, libPool, pglock.WithLockConns(conns))
			ls := make([]*pglock.Lock, workers)
			for i, k := range keys(b, workers) {
				l, err := lk.NewLock(k)
				must(b, err)
				ls[i] = l
			}
			lib := func() time.Duration {
				return fanOut(b, workers, func(i int) error {
					for range perLoop {
						if err := ls[i].Acquire(ctx); err != nil {
							return err
						}
						if err := ls[i].Release(ctx); err != nil {
							return err
						}
					}
					return nil
				})
			}
			raw := func() time.Duration {
				return fanOut(b, workers, func(i int) error {
					for range perLoop {
						if err := rawPair(ctx, rawPool, rawKeys[i]); err != nil {
							return err
						}
					}
					return nil
				})
			}
			lib() // open the lock connections, prepare their statements
			rounds(b, "pairs", workers*perLoop, lib, raw)
			if s := lk.Stats(); s.LockConns > conns || s.ServerLocks != 0 {
				b.Fatalf("after the run: %+v", s)
			}
		})
	}
}

// rawPair is one raw lock + unlock pair on a pool connection.
func rawPair(ctx context.Context, pool *pgxpool.Pool, k pglock.Key) error {
	c, err := pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer c.Release()
	if _, err := c.Exec(ctx, "SELECT pg_advisory_lock($1::bigint)", k.Int64()); err != nil {
		return err
	}
	var ok bool
	if err := c.QueryRow(ctx, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()).Scan(&ok); err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("raw unlock of %s: not held", k)
	}
	return nil
}

// 3. 10,000 and 50,000 locks held at once by one Locker, taken by 100
// goroutines: the time to take them all (and per lock: taking N grows
// linearly with N) and to give them back, the lock connections used, and the
// Go heap per held lock (the caller's *Lock included). Beside it, raw pgx
// taking as many locks on one connection in one pipelined batch (one round
// trip: the floor, not what a service of many goroutines can do).
//
// The server's lock table must have room: this runs only on a throwaway
// cluster started with max_locks_per_transaction=512, never on the shared
// server (other tests run there, and the default table, 64 * 100 slots,
// would fill).
func BenchmarkMuxHoldMany(b *testing.B) {
	const workers = 100
	srv := pgtest.ThrowawayT(b, map[string]string{"max_locks_per_transaction": "512"})
	ctx := callerCtx(b)
	cfg, err := pgxpool.ParseConfig(srv.URL)
	must(b, err)
	cfg.MaxConns = 4
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	must(b, err)
	b.Cleanup(pool.Close)
	for _, total := range []int{10_000, 50_000} {
		b.Run(fmt.Sprintf("held=%d", total), func(b *testing.B) { holdMany(b, ctx, srv.URL, pool, total, workers) })
	}
}

// holdMany is BenchmarkMuxHoldMany for total locks.
func holdMany(b *testing.B, ctx context.Context, url string, pool *pgxpool.Pool, total, workers int) {
	rawConn, err := pgx.Connect(ctx, url)
	must(b, err)
	b.Cleanup(func() { _ = rawConn.Close(context.Background()) })
	b.Run("paired", func(b *testing.B) {
		lk := newLocker(b, pool, pglock.WithMaxLocks(total+1000))
		must(b, lk.Do(ctx, "warm", func(context.Context) error { return nil })) // open a lock connection
		var (
			takeT, giveT, rawTakeT, rawGiveT time.Duration
			heap                             float64
			lockConns, waitConns             int
			n                                int
		)
		var ms runtime.MemStats
		lib := func() {
			ks := keys(b, total)
			runtime.GC()
			runtime.ReadMemStats(&ms)
			before := ms.HeapAlloc
			ls := make([]*pglock.Lock, total)
			takeT += holdAll(b, ctx, lk, ks, ls, workers)
			s := lk.Stats()
			if s.HeldKeys != total || s.ServerLocks != total {
				b.Fatalf("holding %d locks: %+v", total, s)
			}
			lockConns, waitConns = max(lockConns, s.LockConns), max(waitConns, s.WaitConns)
			runtime.GC()
			runtime.ReadMemStats(&ms)
			heap += float64(int64(ms.HeapAlloc)-int64(before)) / float64(total)
			giveT += fanOut(b, workers, func(w int) error {
				for i := w; i < total; i += workers {
					if err := ls[i].Release(ctx); err != nil {
						return err
					}
				}
				return nil
			})
			runtime.KeepAlive(ls)
		}
		raw := func() {
			ks := keys(b, total)
			var batch pgx.Batch
			for _, k := range ks {
				batch.Queue("SELECT pg_advisory_lock($1::bigint)", k.Int64())
			}
			t0 := time.Now()
			must(b, rawConn.SendBatch(ctx, &batch).Close())
			t1 := time.Now()
			var unlocked bool
			must(b, rawConn.QueryRow(ctx, "SELECT pg_advisory_unlock_all() IS NULL").Scan(&unlocked))
			rawTakeT, rawGiveT = rawTakeT+t1.Sub(t0), rawGiveT+time.Since(t1)
		}
		raw() // prepare the statement
		rawTakeT, rawGiveT = 0, 0
		for b.Loop() {
			if n%2 == 0 {
				lib()
				raw()
			} else {
				raw()
				lib()
			}
			n++
		}
		perRound := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(n) }
		b.ReportMetric(perRound(takeT), "take-all-ms")
		b.ReportMetric(perRound(takeT)*1000/float64(total), "take-us/lock")
		b.ReportMetric(perRound(giveT), "release-all-ms")
		b.ReportMetric(float64(lockConns), "lock-conns")
		b.ReportMetric(float64(waitConns), "wait-conns")
		b.ReportMetric(heap/float64(n), "heap-B/lock")
		b.ReportMetric(perRound(rawTakeT), "raw-take-all-ms")
		b.ReportMetric(perRound(rawGiveT), "raw-unlock-all-ms")
		b.ReportMetric(float64(takeT)/float64(rawTakeT), "pglock/raw")
	})
}
