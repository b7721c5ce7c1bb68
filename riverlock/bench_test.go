package riverlock_test

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/riverqueue/river/rivertype"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/riverlock"
)

// BenchmarkWork measures the middleware around an empty job (key, lock,
// run, unlock), against raw pgx doing the same work on a pinned pool
// connection: find the job's key the same way, pg_try_advisory_lock, run,
// pg_advisory_unlock (its boolean checked), release. For each way of
// finding the key (KeyFunc, ArgsKey) it runs "middleware" and "raw" alone
// and "paired", which alternates the two in one loop, on the same pool and
// on different keys, and reports middleware-ns/op, raw-ns/op and their
// ratio middleware/raw: both sides see the same noise, so on a shared or
// virtual machine that ratio is the figure to trust (scripts/benchratio.awk).
// no-key measures the middleware on a job it does not lock.
func BenchmarkWork(b *testing.B) {
	ctx := context.Background()
	pool := pgtest.Pool(b, 4)
	lk, err := pglock.NewLocker(pool)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = lk.Close() })
	// The middleware locks name's key, raw pgx rname's: they never contend.
	name, rname := pgtest.UniqueKey(b), pgtest.UniqueKey(b)
	jobOf := func(name string) *rivertype.JobRow {
		args, err := json.Marshal(CustomerArgs{Customer: name})
		if err != nil {
			b.Fatal(err)
		}
		return &rivertype.JobRow{ID: 1, Kind: CustomerArgs{}.Kind(), EncodedArgs: args, State: rivertype.JobStateRunning}
	}
	job, rjob := jobOf(name), jobOf(rname)
	noop := func(context.Context) error { return nil }
	// The raw side hashes keys with pglock.KeyOf: check that it is the
	// Locker's mapping, so both sides do the same work.
	lkKey, err1 := lk.Key(riverlock.DefaultNamespace(rjob.Kind) + rname)
	rawKey, err2 := pglock.KeyOf(riverlock.DefaultNamespace(rjob.Kind) + rname)
	if err1 != nil || err2 != nil || lkKey != rawKey {
		b.Fatalf("Locker.Key and pglock.KeyOf differ: %v, %v, %v, %v", lkKey, err1, rawKey, err2)
	}

	// mw returns one job through the middleware configured by cfg.
	mw := func(b *testing.B, cfg *riverlock.Config) func() {
		m, err := riverlock.NewMiddleware(lk, cfg)
		if err != nil {
			b.Fatal(err)
		}
		return func() {
			if err := m.Work(ctx, job, noop); err != nil {
				b.Fatal(err)
			}
		}
	}
	// raw returns one job locked with raw pgx, its key found by keyOf.
	raw := func(b *testing.B, keyOf func(*rivertype.JobRow) string) func() {
		return func() {
			key, err := pglock.KeyOf(riverlock.DefaultNamespace(rjob.Kind) + keyOf(rjob))
			if err != nil {
				b.Fatal(err)
			}
			conn, err := pool.Acquire(ctx)
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Release()
			var ok, unlocked bool
			if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock($1::bigint)", key.Int64()).Scan(&ok); err != nil || !ok {
				b.Fatal(ok, err)
			}
			if err := noop(ctx); err != nil {
				b.Fatal(err)
			}
			if err := conn.QueryRow(ctx, "SELECT pg_advisory_unlock($1::bigint)", key.Int64()).Scan(&unlocked); err != nil || !unlocked {
				b.Fatal(unlocked, err)
			}
		}
	}
	loop := func(b *testing.B, do func()) {
		b.ReportAllocs()
		for b.Loop() {
			do()
		}
	}
	compare := func(cfg *riverlock.Config, keyOf func(*rivertype.JobRow) string) func(b *testing.B) {
		return func(b *testing.B) {
			b.Run("middleware", func(b *testing.B) { loop(b, mw(b, cfg)) })
			b.Run("raw", func(b *testing.B) { loop(b, raw(b, keyOf)) })
			b.Run("paired", func(b *testing.B) {
				lib, rw := mw(b, cfg), raw(b, keyOf)
				lib() // warm both sides' statement caches
				rw()
				pgtest.Paired(b, "middleware", lib, rw)
			})
		}
	}

	b.Run("KeyFunc", compare(&riverlock.Config{
		Key: func(*rivertype.JobRow) (string, bool, error) { return name, true, nil },
	}, func(*rivertype.JobRow) string { return rname }))
	b.Run("ArgsKey", compare(&riverlock.Config{Key: riverlock.ArgsKey[CustomerArgs]()},
		func(job *rivertype.JobRow) string {
			var args CustomerArgs
			if err := json.Unmarshal(job.EncodedArgs, &args); err != nil {
				b.Fatal(err)
			}
			return args.LockKey()
		}))
	b.Run("no-key", func(b *testing.B) {
		loop(b, mw(b, &riverlock.Config{
			Key: func(*rivertype.JobRow) (string, bool, error) { return "", false, nil },
		}))
	})
	for _, n := range []string{name, rname} {
		k, err := lk.Key(riverlock.DefaultNamespace(job.Kind) + n)
		if err != nil {
			b.Fatal(err)
		}
		pgtest.WaitFree(b, pool, k)
	}
}
