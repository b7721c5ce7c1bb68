package pglock_test

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// lockStatementTracer counts the lock connections' lock statements it sees.
type lockStatementTracer struct{ tries atomic.Int64 }

func (c *lockStatementTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	if strings.Contains(data.SQL, "pg_try_advisory_lock") {
		c.tries.Add(1)
	}
	return ctx
}

func (c *lockStatementTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// TestLockConnStatementPaths: a lock connection runs a request alone, or a
// batch, straight through pgconn (its prepared statement, its arguments and
// result in binary), unless the pool's config has a pgx tracer (which then sees
// every statement) or another query mode, when it keeps pgx's QueryRow (and
// Query for a batch). Either way, each request does what it says, read from
// pg_locks: a bigint and a pair key, exclusive and shared, a try refused, an
// unlock, a key set's tries and unlocks in one statement each (a batch: its
// arrays and rows), a key set refused when one key is held elsewhere, and
// the hand-off of one key between goroutines (the unlock-and-retake
// statement, which answers an integer).
func TestLockConnStatementPaths(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	variants := []struct {
		name      string
		configure func(*pgxpool.Config) *lockStatementTracer
	}{
		{"direct", func(*pgxpool.Config) *lockStatementTracer { return nil }},
		{"tracer", func(c *pgxpool.Config) *lockStatementTracer {
			tr := &lockStatementTracer{}
			c.ConnConfig.Tracer = tr
			return tr
		}},
		{"simple-protocol", func(c *pgxpool.Config) *lockStatementTracer {
			c.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
			return nil
		}},
		{"describe-exec", func(c *pgxpool.Config) *lockStatementTracer {
			c.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeDescribeExec
			return nil
		}},
	}
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
			if err != nil {
				t.Fatal(err)
			}
			cfg.MaxConns = 2
			tr := v.configure(cfg)
			pool, err := pgxpool.NewWithConfig(bg, cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(pool.Close)
			lk := muxLocker(t, pool, pglock.WithLockConns(1))
			other := muxLocker(t, pgtest.Pool(t, 2), pglock.WithLockConns(1))

			base, err := pglock.KeyOf(pgtest.UniqueKey(t))
			if err != nil {
				t.Fatal(err)
			}
			hi, lo := int32(base.Int64()>>32), int32(base.Int64())
			keys := []pglock.Key{base, pglock.Int32PairKey(hi, lo^0x5a5a)}
			for _, key := range keys {
				for _, mode := range []pglock.Mode{pglock.Exclusive, pglock.Shared} {
					l, err := lk.NewLock(key, pglock.WithMode(mode))
					if err != nil {
						t.Fatal(err)
					}
					if ok, err := l.TryAcquire(bg); err != nil || !ok {
						t.Fatalf("%s %v: TryAcquire = %v, %v on a free key", key, mode, ok, err)
					}
					want := map[pglock.Mode]string{pglock.Exclusive: "ExclusiveLock", pglock.Shared: "ShareLock"}[mode]
					if hs := pgtest.Granted(t, watch, key); len(hs) != 1 || hs[0].Mode != want {
						t.Fatalf("%s %v held: pg_locks has %+v, want one %s", key, mode, hs, want)
					}
					o, err := other.NewLock(key)
					if err != nil {
						t.Fatal(err)
					}
					if ok, err := o.TryAcquire(bg); err != nil || ok {
						t.Fatalf("%s %v held: another session's exclusive TryAcquire = %v, %v", key, mode, ok, err)
					}
					if mode == pglock.Shared {
						s, err := other.NewLock(key, pglock.WithMode(pglock.Shared))
						if err != nil {
							t.Fatal(err)
						}
						if ok, err := s.TryAcquire(bg); err != nil || !ok {
							t.Fatalf("%s shared held: another shared TryAcquire = %v, %v", key, ok, err)
						}
						if err := s.Release(bg); err != nil {
							t.Fatal(err)
						}
					}
					if err := l.Release(bg); err != nil {
						t.Fatalf("%s %v: Release: %v", key, mode, err)
					}
					pgtest.WaitFree(t, watch, key)
				}
			}

			// A key set's tries share one statement (a batch): all taken,
			// then all given back; with one of them held elsewhere, none.
			set := []any{keys[0], keys[1], pglock.Int64Key(base.Int64() ^ 0x77), pglock.Int32PairKey(lo, hi)}
			before := pglock.LockStatements(lk)
			err = lk.DoAll(bg, set, func(context.Context) error {
				for _, k := range set {
					if hs := pgtest.Granted(t, watch, k.(pglock.Key)); len(hs) != 1 || hs[0].Mode != "ExclusiveLock" {
						t.Errorf("key set member %s in DoAll: pg_locks has %+v", k, hs)
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if n := pglock.LockStatements(lk) - before; n >= int64(2*len(set)) {
				t.Errorf("a key set of %d took %d statements to take and give back: not batched", len(set), n)
			}
			for _, k := range set {
				pgtest.WaitFree(t, watch, k.(pglock.Key))
			}
			o, err := other.NewLock(set[2])
			if err != nil {
				t.Fatal(err)
			}
			if ok, err := o.TryAcquire(bg); err != nil || !ok {
				t.Fatalf("TryAcquire of a free key = %v, %v", ok, err)
			}
			if ok, err := lk.TryDoAll(bg, set, func(context.Context) error { return nil }); err != nil || ok {
				t.Fatalf("TryDoAll with a member held elsewhere = %v, %v", ok, err)
			}
			if err := o.Release(bg); err != nil {
				t.Fatal(err)
			}
			for _, k := range set {
				pgtest.WaitFree(t, watch, k.(pglock.Key))
			}

			// Two goroutines take turns on one key: the hand-off is one
			// statement, unlock and take again, answering 0, 1 or 2.
			var inside atomic.Int32
			var wg sync.WaitGroup
			errs := make([]error, 2)
			for g := range 2 {
				wg.Go(func() {
					for range 100 {
						err := lk.Do(bg, keys[1], func(context.Context) error {
							if inside.Add(1) != 1 {
								t.Error("two goroutines hold one key at once")
							}
							inside.Add(-1)
							return nil
						})
						if err != nil {
							errs[g] = err
							return
						}
					}
				})
			}
			wg.Wait()
			for _, err := range errs {
				if err != nil {
					t.Fatal(err)
				}
			}
			pgtest.WaitFree(t, watch, keys[1])
			if s := lk.Stats(); s.ServerLocks != 0 || s.HeldKeys != 0 {
				t.Fatalf("after the run: %+v", s)
			}
			if tr != nil && tr.tries.Load() == 0 {
				t.Fatal("the pool's pgx tracer saw no lock statement of the lock connection")
			}
		})
	}
}
