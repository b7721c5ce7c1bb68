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
// run, unlock), against raw pgx doing the same SQL on a pooled connection:
// pg_try_advisory_lock and pg_advisory_unlock.
func BenchmarkWork(b *testing.B) {
	ctx := context.Background()
	pool := pgtest.Pool(b, 4)
	lk, err := pglock.NewLocker(pool)
	if err != nil {
		b.Fatal(err)
	}
	name := pgtest.UniqueKey(b)
	args, _ := json.Marshal(CustomerArgs{Customer: name})
	job := &rivertype.JobRow{ID: 1, Kind: CustomerArgs{}.Kind(), EncodedArgs: args, State: rivertype.JobStateRunning}
	noop := func(context.Context) error { return nil }

	bench := func(cfg *riverlock.Config) func(b *testing.B) {
		return func(b *testing.B) {
			mw, err := riverlock.NewMiddleware(lk, cfg)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if err := mw.Work(ctx, job, noop); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
	b.Run("riverlock/KeyFunc", bench(&riverlock.Config{
		Key: func(*rivertype.JobRow) (string, bool, error) { return name, true, nil },
	}))
	b.Run("riverlock/ArgsKey", bench(&riverlock.Config{Key: riverlock.ArgsKey[CustomerArgs]()}))
	b.Run("riverlock/no-key", bench(&riverlock.Config{
		Key: func(*rivertype.JobRow) (string, bool, error) { return "", false, nil },
	}))
	b.Run("raw-pgx", func(b *testing.B) {
		key, err := lk.Key(riverlock.DefaultNamespace(job.Kind) + name)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			conn, err := pool.Acquire(ctx)
			if err != nil {
				b.Fatal(err)
			}
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
			conn.Release()
		}
	})
	pgtest.WaitFree(b, pool, func() pglock.Key { k, _ := lk.Key(riverlock.DefaultNamespace(job.Kind) + name); return k }())
}
