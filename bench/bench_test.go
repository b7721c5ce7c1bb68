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

func TestMain(m *testing.M) { pgtest.Main(m) }

// pair is one comparison: the library's operation and raw pgx doing the same
// SQL, each run once per call.
type pair struct {
	lib, raw func(b *testing.B)
	// same, when set, is raw pgx sending the library's own statements
	// (sameAs): the paired sub-benchmark then also reports
	// pglock/same-sql, the library's cost beyond its SQL.
	same func(b *testing.B)
}

// contexts are the contexts every comparison runs with, each as a
// sub-benchmark of its own. "cancellable" is what callers pass (a request's,
// an RPC's, a job's context: context.WithCancel here, cancelled when the
// sub-benchmark ends), so it is the figure the targets are about.
// "background" is context.Background(), whose Done() is nil: pgx does not
// watch it during a query, and the library skips its cancel machinery.
var contexts = []struct {
	name        string
	cancellable bool
}{{"cancellable", true}, {"background", false}}

// eachContext runs f once per entry of contexts, as sub-benchmarks named
// after them, with that context.
func eachContext(b *testing.B, f func(b *testing.B, ctx context.Context)) {
	for _, c := range contexts {
		b.Run(c.name, func(b *testing.B) {
			ctx := context.Background()
			if c.cancellable {
				ctx = callerCtx(b)
			}
			f(b, ctx)
		})
	}
}

// callerCtx returns a cancellable context, cancelled when b ends.
func callerCtx(b *testing.B) context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	return ctx
}

// runPair measures, for each context (see contexts), the pair that mk
// returns three ways: "pglock" and "raw" alone (ns/op, B/op, allocs/op), and
// "paired" (pgtest.Paired), which alternates the two in one loop and reports
// each one's ns/op and their ratio. On a shared or virtual machine the
// paired ratio is the figure to trust: both sides see the same noise. mk is
// called once per sub-benchmark, with its context; each side runs once before
// the measurement, to warm statement caches.
func runPair(b *testing.B, mk func(b *testing.B, ctx context.Context) pair) {
	eachContext(b, func(b *testing.B, ctx context.Context) {
		setup := func(b *testing.B) pair {
			p := mk(b, ctx)
			p.lib(b)
			p.raw(b)
			return p
		}
		b.Run("pglock", func(b *testing.B) {
			p := setup(b)
			b.ReportAllocs()
			for b.Loop() {
				p.lib(b)
			}
		})
		b.Run("raw", func(b *testing.B) {
			p := setup(b)
			b.ReportAllocs()
			for b.Loop() {
				p.raw(b)
			}
		})
		b.Run("paired", func(b *testing.B) {
			p := setup(b)
			if p.same != nil {
				pgtest.PairedSameSQL(b, "pglock", func() { p.lib(b) }, func() { p.raw(b) }, func() { p.same(b) })
				return
			}
			pgtest.Paired(b, "pglock", func() { p.lib(b) }, func() { p.raw(b) })
		})
	})
}

// run is runPair on a pgx pool of 4 (its connections opened beforehand)
// with two fresh keys: k for the library, rk for raw pgx.
func run(b *testing.B, setup func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair) {
	runOn(b, false, setup)
}

// runSame is run on a tracedPool, for a setup whose pair has same (see
// sameAs).
func runSame(b *testing.B, setup func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair) {
	runOn(b, true, setup)
}

func runOn(b *testing.B, traced bool, setup func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair) {
	runPair(b, func(b *testing.B, ctx context.Context) pair {
		var pool *pgxpool.Pool
		if traced {
			pool = tracedPool(b, 4)
		} else {
			pool = pgtest.Pool(b, 4)
		}
		for range 4 {
			must(b, pool.Ping(ctx))
		}
		ks := keys(b, 2)
		return setup(b, ctx, pool, ks[0], ks[1])
	})
}

func must(b *testing.B, err error) {
	if err != nil {
		b.Fatal(err)
	}
}

// noop is the protected work of the Do benchmarks.
func noop(context.Context) error { return nil }

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

// rawSession is rawLockUnlock with pg_advisory_lock.
func rawSession(ctx context.Context, b *testing.B, pool *pgxpool.Pool, k pglock.Key, work func()) {
	rawLockUnlock(ctx, b, pool, "SELECT pg_advisory_lock($1::bigint)", k, work)
}

// Session Acquire + Release, uncontended, of a Lock made by pglock.New on a
// pool (one pool connection per hold).
func BenchmarkSessionAcquireRelease(b *testing.B) {
	runSame(b, func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair {
		l, err := pglock.NewLock(pool, k)
		must(b, err)
		lib := func(b *testing.B) {
			must(b, l.Acquire(ctx))
			must(b, l.Release(ctx))
		}
		return pair{
			lib:  lib,
			raw:  func(b *testing.B) { rawSession(ctx, b, pool, rk, func() {}) },
			same: sameAs(b, ctx, pool, lib),
		}
	})
}

// The plainest use: pglock.NewLock(pool, key) made per operation, then Acquire
// and Release, uncontended (one pool connection per hold), beside raw pgx:
// pool.Acquire, pg_advisory_lock, pg_advisory_unlock, Release.
func BenchmarkSessionNewAcquireRelease(b *testing.B) {
	runSame(b, func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair {
		lib := func(b *testing.B) {
			l, err := pglock.NewLock(pool, k)
			must(b, err)
			must(b, l.Acquire(ctx))
			must(b, l.Release(ctx))
		}
		return pair{
			lib:  lib,
			raw:  func(b *testing.B) { rawSession(ctx, b, pool, rk, func() {}) },
			same: sameAs(b, ctx, pool, lib),
		}
	})
}

// TryAcquire + Release, uncontended, of a Lock made by pglock.New on a pool.
func BenchmarkTryAcquireRelease(b *testing.B) {
	runSame(b, func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair {
		l, err := pglock.NewLock(pool, k)
		must(b, err)
		p := tryPair(ctx, pool, l, rk)
		p.same = sameAs(b, ctx, pool, p.lib)
		return p
	})
}

// tryPair is TryAcquire + Release of l beside raw pgx's try and unlock of
// the same key (rk) on a connection of pool.
func tryPair(ctx context.Context, pool *pgxpool.Pool, l *pglock.Lock, rk pglock.Key) pair {
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
}

// Transaction scope inside a caller's transaction: begin, lock, commit.
func BenchmarkCallerTx(b *testing.B) {
	run(b, func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair {
		return pair{
			lib: func(b *testing.B) {
				tx, err := pool.Begin(ctx)
				must(b, err)
				l, err := pglock.NewLock(tx, k)
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

// lockers are the two kinds of Locker on a pool: "mux", the default, which
// holds session locks on lock connections of its own, and "perhold"
// (WithMultiplexing(false)), which takes one pool connection per hold, as
// pglock.New does.
var lockers = []struct {
	name string
	opts []pglock.Option
}{{"mux", nil}, {"perhold", []pglock.Option{pglock.WithMultiplexing(false)}}}

// newLocker returns a Locker on conn, closed when b ends.
func newLocker(b *testing.B, conn any, opts ...pglock.Option) *pglock.Locker {
	lk, err := pglock.NewLocker(conn, opts...)
	must(b, err)
	b.Cleanup(func() { _ = lk.Close() })
	return lk
}

// Locker.Do on a pool in Session scope, with a function that does nothing,
// for each kind of Locker (see lockers), beside raw pgx on the pool:
// pool.Acquire, pg_advisory_lock, pg_advisory_unlock, release. A Locker
// with lock connections runs on a pool without the same-SQL recorder: a
// pgx tracer on the pool would send its lock connections' statements
// through pgx (see lockconn's direct.go).
func BenchmarkDoSession(b *testing.B) {
	for _, kind := range lockers {
		b.Run(kind.name, func(b *testing.B) {
			perHold := kind.opts != nil
			runOn(b, perHold, func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair {
				lk := newLocker(b, pool, kind.opts...)
				p := pair{
					lib: func(b *testing.B) { must(b, lk.Do(ctx, k, noop)) },
					raw: func(b *testing.B) { rawSession(ctx, b, pool, rk, func() { must(b, noop(ctx)) }) },
				}
				if perHold { // its statements on a pool connection
					p.same = sameAs(b, ctx, pool, p.lib)
				}
				return p
			})
		})
	}
}

// Do on a pool in Transaction scope (the lock's own transaction, committed),
// with a function that does nothing: Lock.Do of a Lock made by pglock.New
// ("LockDo") and Locker.Do ("LockerDo"), each beside raw pgx doing the same
// two round trips on a pool connection ("vs-2rt": BEGIN and the lock sent
// as one simple-protocol query by BeginTx, then COMMIT), and Lock.Do beside
// the three round trips a hand-written transaction usually takes ("vs-3rt":
// BEGIN, the lock, COMMIT, by pgx.BeginFunc).
func BenchmarkDoTransaction(b *testing.B) {
	twoRT := func(ctx context.Context, b *testing.B, pool *pgxpool.Pool, begin string) {
		tx, err := pool.BeginTx(ctx, pgx.TxOptions{BeginQuery: begin})
		must(b, err)
		must(b, noop(ctx))
		must(b, tx.Commit(ctx))
	}
	threeRT := func(ctx context.Context, b *testing.B, pool *pgxpool.Pool, rk pglock.Key) {
		must(b, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1::bigint)", rk.Int64()); err != nil {
				return err
			}
			return noop(ctx)
		}))
	}
	for _, c := range []struct {
		name   string
		locker bool
		rts    int
	}{{"LockDo/vs-2rt", false, 2}, {"LockDo/vs-3rt", false, 3}, {"LockerDo/vs-2rt", true, 2}} {
		b.Run(c.name, func(b *testing.B) {
			runSame(b, func(b *testing.B, ctx context.Context, pool *pgxpool.Pool, k, rk pglock.Key) pair {
				var lib func(b *testing.B)
				if c.locker {
					lk := newLocker(b, pool, pglock.WithScope(pglock.Transaction))
					lib = func(b *testing.B) { must(b, lk.Do(ctx, k, noop)) }
				} else {
					l, err := pglock.NewLock(pool, k, pglock.WithScope(pglock.Transaction))
					must(b, err)
					lib = func(b *testing.B) { must(b, l.Do(ctx, noop)) }
				}
				begin := fmt.Sprintf("BEGIN; SELECT pg_advisory_xact_lock(%d::bigint)", rk.Int64())
				raw := func(b *testing.B) { twoRT(ctx, b, pool, begin) }
				if c.rts == 3 {
					raw = func(b *testing.B) { threeRT(ctx, b, pool, rk) }
				}
				return pair{lib: lib, raw: raw, same: sameAs(b, ctx, pool, lib)}
			})
		})
	}
}

// The allocations of Locker.Do, uncontended, in Session scope on a pool,
// for each kind of Locker, beside what it is made of: "LockerDo" (a Lock
// made per call, then its Do), "LockDo" (Do of a Lock made once) and
// "AcquireRelease" (Acquire and Release of a Lock made once). allocs/op is
// the figure (LockerDo - AcquireRelease: what Do adds); ns/op is each alone,
// unpaired.
func BenchmarkDoAllocs(b *testing.B) {
	for _, kind := range lockers {
		b.Run(kind.name, func(b *testing.B) {
			eachContext(b, func(b *testing.B, ctx context.Context) {
				mk := func(b *testing.B) (*pglock.Locker, *pglock.Lock, pglock.Key) {
					pool := pgtest.Pool(b, 4)
					lk := newLocker(b, pool, kind.opts...)
					k := keys(b, 1)[0]
					l, err := lk.NewLock(k)
					must(b, err)
					must(b, l.Do(ctx, noop)) // open a lock connection, warm the caches
					return lk, l, k
				}
				b.Run("LockerDo", func(b *testing.B) {
					lk, _, k := mk(b)
					b.ReportAllocs()
					for b.Loop() {
						must(b, lk.Do(ctx, k, noop))
					}
				})
				b.Run("LockDo", func(b *testing.B) {
					_, l, _ := mk(b)
					b.ReportAllocs()
					for b.Loop() {
						must(b, l.Do(ctx, noop))
					}
				})
				b.Run("AcquireRelease", func(b *testing.B) {
					_, l, _ := mk(b)
					b.ReportAllocs()
					for b.Loop() {
						must(b, l.Acquire(ctx))
						must(b, l.Release(ctx))
					}
				})
			})
		})
	}
}
