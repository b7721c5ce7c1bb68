package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Review 29: a lock connection's statements straight through pgconn
// (lockconn's direct.go): single requests and batches, their prepared
// descriptions kept per connection, their arguments and results in binary.

// r29Variants are the pool configurations whose lock connections take the
// direct path or pgx's (a tracer, another query mode).
var r29Variants = []struct {
	name string
	edit func(*pgxpool.Config)
}{
	{"direct", func(*pgxpool.Config) {}},
	{"tracer", func(c *pgxpool.Config) { c.ConnConfig.Tracer = &lockStatementTracer{} }},
	{"simple-protocol", func(c *pgxpool.Config) { c.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol }},
	{"exec", func(c *pgxpool.Config) { c.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeExec }},
}

// r29Sessions records the Locker's own sessions (not the pool's: those are
// named app+"/pool") as they connect: pgconn's AfterConnect, which the
// Locker's connections keep from the pool's configuration.
type r29Sessions struct {
	mu    sync.Mutex
	conns []*pgconn.PgConn
}

func (s *r29Sessions) open() []*pgconn.PgConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	var open []*pgconn.PgConn
	for _, c := range s.conns {
		if !c.IsClosed() {
			open = append(open, c)
		}
	}
	return open
}

// r29Pool is a pool on u whose Locker sessions are named app and recorded
// in the returned r29Sessions; edit changes its configuration.
func r29Pool(t testing.TB, u, app string, maxConns int32, edit func(*pgxpool.Config)) (*pgxpool.Pool, *r29Sessions) {
	t.Helper()
	s := &r29Sessions{}
	pool := pgtest.PoolWith(t, u, maxConns, func(cfg *pgxpool.Config) {
		pgtest.NameSessions(cfg, app)
		cfg.ConnConfig.AfterConnect = func(_ context.Context, pc *pgconn.PgConn) error {
			if pc.ParameterStatus("application_name") == app {
				s.mu.Lock()
				s.conns = append(s.conns, pc)
				s.mu.Unlock()
			}
			return nil
		}
		if edit != nil {
			edit(cfg)
		}
	})
	return pool, s
}

// r29Advisory counts the advisory locks granted to the sessions named app.
func r29Advisory(t testing.TB, watch *pgxpool.Pool, app string) int {
	t.Helper()
	var n int
	err := watch.QueryRow(context.Background(), `
		SELECT count(*) FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
		WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1`, app).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// r29Until polls cond until it holds or d passes.
func r29Until(d time.Duration, cond func() bool) bool {
	end := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(end) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestReview29DeallocatedStatements: a lock connection's session loses its
// prepared statements (DEALLOCATE ALL run on it, while it holds nothing and
// nobody uses it). pgx's own path forgets a statement that failed and
// prepares it again; the direct path keeps the descriptions of its
// connection. A key set's tries (one batch statement) and a request alone
// must work again within a few attempts: either the connection is lost and
// replaced, or the statement is prepared again. (Seen to hold: the failed
// statement's cleanup runs the unlocks through pgx's prepared statements,
// gone too, so it fails and the connection is lost and replaced; the set is
// tried on the new one without an error.)
func TestReview29DeallocatedStatements(t *testing.T) {
	for _, v := range r29Variants[:2] {
		for _, stmt := range []string{"DEALLOCATE ALL", "DISCARD ALL"} {
			t.Run(v.name+"/"+stmt, func(t *testing.T) {
				bg := context.Background()
				app := "r29dealloc" + randomSuffix()
				pool, sessions := r29Pool(t, pgtest.URL(t), app, 2, v.edit)
				lk := muxLocker(t, pool, pglock.WithLockConns(1))
				_, keys := muxKeys(t, lk, 3)
				set := []any{keys[0], keys[1], keys[2]}
				single := keys[0]
				run := func() error {
					ok, err := lk.TryDoAll(bg, set, func(context.Context) error { return nil })
					if err == nil && !ok {
						err = errors.New("TryDoAll refused free keys")
					}
					if err == nil {
						// A single try, then its release: the
						// statements of a request alone.
						ok, err = lk.TryDo(bg, single, func(context.Context) error { return nil })
						if err == nil && !ok {
							err = errors.New("TryDo refused a free key")
						}
					}
					return err
				}
				// Key sets only first: the connection never ran an
				// unlock alone.
				if ok, err := lk.TryDoAll(bg, set, func(context.Context) error { return nil }); err != nil || !ok {
					t.Fatalf("TryDoAll = %v, %v", ok, err)
				}
				conns := sessions.open()
				if len(conns) == 0 {
					t.Fatal("no session of the Locker recorded")
				}
				// Nobody uses the connection now (it holds nothing: no
				// watch), and the statements ran on this goroutine.
				for _, pc := range conns {
					if _, err := pc.Exec(bg, stmt).ReadAll(); err != nil {
						t.Fatalf("%s on the Locker's session: %v", stmt, err)
					}
				}
				var errs []error
				for range 5 {
					err := run()
					if err == nil {
						break
					}
					errs = append(errs, err)
				}
				if len(errs) > 2 {
					t.Fatalf("after %s on the lock connection's session, %d attempts in a row failed; the last: %v", stmt, len(errs), errs[len(errs)-1])
				}
				for i, err := range errs {
					t.Logf("attempt %d after %s: %v", i+1, stmt, err)
				}
				if err := run(); err != nil {
					t.Fatalf("after recovering: %v", err)
				}
			})
		}
	}
}

// r29EdgeKeys are keys at the edges of the encodings: a bigint at int64's
// min and max, -1 and 0, pairs with negative halves and int32's extremes.
func r29EdgeKeys(salt int32) []pglock.Key {
	return []pglock.Key{
		pglock.Int64Key(math.MinInt64), pglock.Int64Key(math.MaxInt64),
		pglock.Int64Key(-1), pglock.Int64Key(math.MinInt64 + int64(salt)),
		pglock.Int32PairKey(math.MinInt32, math.MaxInt32), pglock.Int32PairKey(math.MaxInt32, math.MinInt32),
		pglock.Int32PairKey(-1, -1), pglock.Int32PairKey(-salt, salt), pglock.Int32PairKey(salt, -salt),
		pglock.Int32PairKey(0, -1),
	}
}

// TestReview29EdgeKeysMixedBatches: edge keys, shared and exclusive, taken by
// goroutines at once on one lock connection (so that their tries share batch
// statements), each read back from pg_locks (its lock tag and mode), checked
// against another Locker, given back at once (batched unlocks), then handed
// between goroutines (retakes); on the direct path and on pgx's.
func TestReview29EdgeKeysMixedBatches(t *testing.T) {
	srv := pgtest.ThrowawayT(t, nil)
	bg := context.Background()
	watch, _ := r29Pool(t, srv.URL, "r29watch", 2, nil)
	for _, v := range r29Variants {
		t.Run(v.name, func(t *testing.T) {
			pool, _ := r29Pool(t, srv.URL, "r29edge", 4, v.edit)
			lk := muxLocker(t, pool, pglock.WithLockConns(1))
			otherPool, _ := r29Pool(t, srv.URL, "r29other", 2, nil)
			other := muxLocker(t, otherPool, pglock.WithLockConns(1))
			keys := r29EdgeKeys(int32(rand.IntN(1<<20) + 2))
			batched := 0
			for round := range 4 {
				var locks []*pglock.Lock
				modes := map[pglock.Key]pglock.Mode{}
				for i, k := range keys {
					mode := pglock.Mode((i + round) % 2)
					modes[k] = mode
					n := 1
					if mode == pglock.Shared {
						n = 2 // a co-holder joins
					}
					for range n {
						l, err := lk.NewLock(k, pglock.WithMode(mode))
						if err != nil {
							t.Fatal(err)
						}
						locks = append(locks, l)
					}
				}
				before := pglock.LockStatements(lk)
				start := make(chan struct{})
				var wg sync.WaitGroup
				errs := make([]error, len(locks))
				for i, l := range locks {
					wg.Go(func() {
						<-start
						ok, err := l.TryAcquire(bg)
						if err == nil && !ok {
							err = fmt.Errorf("TryAcquire of free key %s (%v) refused", l.Key(), modes[l.Key()])
						}
						errs[i] = err
					})
				}
				close(start)
				wg.Wait()
				if err := errors.Join(errs...); err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
				if n := pglock.LockStatements(lk) - before; n < int64(len(keys)) {
					batched++
				}
				for _, k := range keys {
					want := map[pglock.Mode]string{pglock.Exclusive: "ExclusiveLock", pglock.Shared: "ShareLock"}[modes[k]]
					if hs := pgtest.Granted(t, watch, k); len(hs) != 1 || hs[0].Mode != want {
						t.Fatalf("round %d: key %s (%v) held: pg_locks has %+v, want one %s", round, k, modes[k], hs, want)
					}
					o, err := other.NewLock(k)
					if err != nil {
						t.Fatal(err)
					}
					if ok, err := o.TryAcquire(bg); err != nil || ok {
						t.Fatalf("round %d: key %s held (%v): another Locker's exclusive TryAcquire = %v, %v", round, k, modes[k], ok, err)
					}
				}
				start = make(chan struct{})
				for i, l := range locks {
					wg.Go(func() {
						<-start
						errs[i] = l.Release(bg)
					})
				}
				close(start)
				wg.Wait()
				if err := errors.Join(errs...); err != nil {
					t.Fatalf("round %d: Release: %v", round, err)
				}
				for _, k := range keys {
					pgtest.WaitFree(t, watch, k)
				}
			}
			t.Logf("%d of 4 rounds took fewer statements than keys (batched)", batched)

			// Hand-offs: goroutines take turns on each key (unlock and
			// retake in one statement, alone or batched).
			var inside [16]atomic.Int32
			var wg sync.WaitGroup
			var failed atomic.Value
			for g := range 8 {
				wg.Go(func() {
					for i := range 40 {
						ki := (g + i) % len(keys)
						err := lk.Do(bg, keys[ki], func(context.Context) error {
							if inside[ki].Add(1) != 1 {
								t.Errorf("two goroutines hold key %s at once", keys[ki])
							}
							inside[ki].Add(-1)
							return nil
						})
						if err != nil {
							failed.CompareAndSwap(nil, err)
							return
						}
					}
				})
			}
			wg.Wait()
			if err, _ := failed.Load().(error); err != nil {
				t.Fatal(err)
			}
			for _, k := range keys {
				pgtest.WaitFree(t, watch, k)
			}
			if s := lk.Stats(); s.ServerLocks != 0 || s.HeldKeys != 0 {
				t.Fatalf("after the run: %+v", s)
			}
		})
	}
}

// r29Hold is one hold's interval, as the goroutine inside it saw it.
type r29Hold struct {
	key        int
	start, end time.Time
	shared     bool
}

// r29Overlaps returns a description of the first two holds of one key that
// overlap (not both shared), or "".
func r29Overlaps(holds []r29Hold) string {
	byKey := map[int][]r29Hold{}
	for _, h := range holds {
		byKey[h.key] = append(byKey[h.key], h)
	}
	for k, hs := range byKey {
		for i := range hs {
			for j := i + 1; j < len(hs); j++ {
				a, b := hs[i], hs[j]
				if a.shared && b.shared {
					continue
				}
				if a.start.Before(b.end) && b.start.Before(a.end) {
					return fmt.Sprintf("key %d: %v..%v (shared %v) and %v..%v (shared %v)", k,
						a.start.Format("15:04:05.000000"), a.end.Format("15:04:05.000000"), a.shared,
						b.start.Format("15:04:05.000000"), b.end.Format("15:04:05.000000"), b.shared)
				}
			}
		}
	}
	return ""
}

// r29Terminate ends every session named app (the Lockers' own: their pools'
// sessions are named app+"/pool").
func r29Terminate(t testing.TB, watch *pgxpool.Pool, app string) int {
	t.Helper()
	var n int
	err := watch.QueryRow(context.Background(), `
		SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity
		WHERE application_name = $1 AND backend_type = 'client backend'`, app).Scan(&n)
	if err != nil {
		t.Errorf("terminate: %v", err)
	}
	return n
}

// TestReview29ChaosDirectBesideTraced: two Lockers on the same keys, one on
// the direct path (through a TCP proxy), one with a pgx tracer, each with
// few lock connections so that requests batch: goroutines take a few hot
// keys exclusive and shared, and distinct keys alone and as key sets.
//
// First without faults: no two holds of a key overlap (but shared ones),
// and a sampled hold is granted in pg_locks, read from another session,
// while its function runs. Then with faults (pg_terminate_backend of the
// Lockers' sessions, the proxy cutting its connections, a silent network
// for a while): requests fail as they may, but once the goroutines are done
// the server holds nothing for the Lockers, their Stats are zero, and every
// key can be taken again.
func TestReview29ChaosDirectBesideTraced(t *testing.T) {
	bg := context.Background()
	watch, _ := r29Pool(t, pgtest.URL(t), "r29chaoswatch", 4, nil)
	app := "r29chaos" + randomSuffix()
	var proxy interface {
		Cut()
		Blackhole()
		Restore()
	}
	directPool, _ := r29Pool(t, pgtest.URL(t), app, 4, func(c *pgxpool.Config) {
		proxy = faultProxy(t, c.ConnConfig)
	})
	tracedPool, _ := r29Pool(t, pgtest.URL(t), app, 4, func(c *pgxpool.Config) {
		c.ConnConfig.Tracer = &lockStatementTracer{}
	})
	opts := []pglock.Option{pglock.WithLostCheckInterval(200 * time.Millisecond), pglock.WithReleaseTimeout(time.Second)}
	direct := muxLocker(t, directPool, append(opts, pglock.WithLockConns(1))...)
	traced := muxLocker(t, tracedPool, append(opts, pglock.WithLockConns(2))...)
	base := pgtest.UniqueKey(t)
	const hot = 4
	names := make([]string, hot+64)
	keys := make([]pglock.Key, len(names))
	for i := range names {
		names[i] = fmt.Sprintf("%s:%d", base, i)
		k, err := direct.Key(names[i])
		if err != nil {
			t.Fatal(err)
		}
		keys[i] = k
	}

	var mu sync.Mutex
	var holds []r29Hold
	var sampled, samples atomic.Int64
	work := func(lk *pglock.Locker, g int, until time.Time, faults bool) (errs map[string]int) {
		errs = map[string]int{}
		note := func(err error) {
			switch {
			case err == nil:
			case !faults:
				t.Errorf("without faults: %v", err)
			case errors.Is(err, pglock.ErrLockLost):
				errs["lost"]++
			case errors.Is(err, pglock.ErrUnavailable):
				errs["unavailable"]++
			case errors.Is(err, context.DeadlineExceeded):
				errs["deadline"]++
			default:
				errs[err.Error()]++
			}
		}
		for i := 0; time.Now().Before(until); i++ {
			k := rand.IntN(hot)
			if i%3 == 0 {
				k = hot + (g*7+i)%(len(names)-hot)
			}
			inside := func(shared bool) func(context.Context) error {
				return func(ctx context.Context) error {
					h := r29Hold{key: k, start: time.Now(), shared: shared}
					if !faults && rand.IntN(8) == 0 {
						samples.Add(1)
						if hs := pgtest.Granted(t, watch, keys[k]); len(hs) > 0 {
							sampled.Add(1)
						} else {
							t.Errorf("key %d held by a goroutine (shared %v): not granted in pg_locks", k, shared)
						}
					} else {
						time.Sleep(time.Duration(rand.IntN(300)) * time.Microsecond)
					}
					h.end = time.Now()
					if !faults {
						mu.Lock()
						holds = append(holds, h)
						mu.Unlock()
					}
					return nil
				}
			}
			ctx, cancel := context.WithTimeout(bg, 300*time.Millisecond)
			switch i % 5 {
			case 0, 1:
				note(lk.Do(ctx, names[k], inside(false)))
			case 2:
				_, err := lk.TryDo(ctx, names[k], inside(false))
				note(err)
			case 3:
				l, err := lk.NewLock(names[k], pglock.WithMode(pglock.Shared))
				if err != nil {
					t.Fatal(err)
				}
				if err := l.Acquire(ctx); err != nil {
					if !errors.Is(err, context.DeadlineExceeded) {
						note(err)
					}
					break
				}
				_ = inside(true)(ctx)
				note(l.Release(bg))
			case 4:
				set := []any{names[hot+(g*5+i)%(len(names)-hot)], names[hot+(g*5+i+1)%(len(names)-hot)], names[hot+(g*5+i+2)%(len(names)-hot)]}
				_, err := lk.TryDoAll(ctx, set, func(ctx context.Context) error { return nil })
				note(err)
			}
			cancel()
		}
		return errs
	}
	run := func(d time.Duration, faults bool) map[string]int {
		until := time.Now().Add(d)
		var wg sync.WaitGroup
		var emu sync.Mutex
		all := map[string]int{}
		for g := range 10 {
			lk := direct
			if g >= 7 {
				lk = traced
			}
			wg.Go(func() {
				errs := work(lk, g, until, faults)
				emu.Lock()
				for e, n := range errs {
					all[e] += n
				}
				emu.Unlock()
			})
		}
		wg.Wait()
		return all
	}

	run(3*time.Second, false)
	if o := r29Overlaps(holds); o != "" {
		t.Errorf("two holds overlap without faults: %s", o)
	}
	t.Logf("without faults: %d holds, %d of %d sampled granted in pg_locks", len(holds), sampled.Load(), samples.Load())

	stop := make(chan struct{})
	var fw sync.WaitGroup
	var kills atomic.Int64
	fw.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(100+rand.IntN(200)) * time.Millisecond):
			}
			switch i % 6 {
			case 0, 1, 2:
				kills.Add(int64(r29Terminate(t, watch, app)))
			case 3, 4:
				proxy.Cut()
			case 5:
				proxy.Blackhole()
				time.Sleep(700 * time.Millisecond)
				proxy.Restore()
			}
		}
	})
	errs := run(4*time.Second, true)
	close(stop)
	fw.Wait()
	proxy.Restore()
	t.Logf("with faults: %d sessions terminated; errors: %v", kills.Load(), errs)

	if !r29Until(10*time.Second, func() bool { return r29Advisory(t, watch, app) == 0 }) {
		t.Errorf("the Lockers hold nothing, yet their sessions hold %d advisory locks", r29Advisory(t, watch, app))
	}
	for _, lk := range []*pglock.Locker{direct, traced} {
		if !r29Until(10*time.Second, func() bool { s := lk.Stats(); return s.ServerLocks == 0 && s.HeldKeys == 0 }) {
			t.Errorf("Stats after the run: %+v", lk.Stats())
		}
	}
	// Every key can be taken again, on both paths.
	for _, lk := range []*pglock.Locker{direct, traced} {
		for _, n := range names {
			ok := r29Until(10*time.Second, func() bool {
				ok, err := lk.TryDo(bg, n, func(context.Context) error { return nil })
				return err == nil && ok
			})
			if !ok {
				ok, err := lk.TryDo(bg, n, func(context.Context) error { return nil })
				t.Fatalf("key %s after the faults: TryDo = %v, %v", n, ok, err)
			}
		}
	}
}

// TestReview29FullTableMidBatch: the server's lock table full but for a few
// slots, while the lock connection holds enough locks to run its statements
// inside a transaction block: a key set's tries (one batch statement: pair
// keys with negative halves and bigint keys) take the free slots and fail
// with "out of shared memory" half way. The set fails with ErrTooManyLocks,
// none of its keys is left held (the batch's earlier rows are given back),
// the Locks held before are not lost, and once the table empties the same
// set is taken and the connection serves on. On the direct path and on
// pgx's.
func TestReview29FullTableMidBatch(t *testing.T) {
	srv := pgtest.ThrowawayT(t, map[string]string{"max_locks_per_transaction": "10", "max_connections": "20"})
	bg := context.Background()
	watch, err := pgxpool.New(bg, srv.URL+"&pool_max_conns=1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(watch.Close)
	var dbOID int64
	if err := watch.QueryRow(bg, "SELECT oid::bigint FROM pg_catalog.pg_database WHERE datname = current_database()").Scan(&dbOID); err != nil {
		t.Fatal(err)
	}
	for vi, v := range r29Variants[:2] {
		t.Run(v.name, func(t *testing.T) {
			pool, _ := r29Pool(t, srv.URL, "r29full", 2, v.edit)
			lk := muxLocker(t, pool, pglock.WithLockConns(1), pglock.WithWaitConns(1), pglock.WithMaxLocks(150))
			_, held := muxKeys(t, lk, 80)
			var locks []*pglock.Lock
			for _, k := range held {
				l, err := lk.NewLock(k)
				if err != nil {
					t.Fatal(err)
				}
				if ok, err := l.TryAcquire(bg); err != nil || !ok {
					t.Fatalf("TryAcquire = %v, %v", ok, err)
				}
				locks = append(locks, l)
			}
			salt := int32(1000*vi + 7)
			set := []any{
				pglock.Int32PairKey(-salt, -1), pglock.Int64Key(-int64(salt)), pglock.Int32PairKey(math.MinInt32+salt, salt),
				pglock.Int64Key(math.MaxInt64 - int64(salt)), pglock.Int32PairKey(salt, -salt), pglock.Int64Key(int64(salt) << 40),
				pglock.Int32PairKey(-salt, math.MaxInt32), pglock.Int64Key(math.MinInt64 + int64(salt)), pglock.Int32PairKey(0, -salt),
				pglock.Int64Key(-int64(salt) << 33), pglock.Int32PairKey(-salt-1, salt+1), pglock.Int64Key(int64(salt) + 1),
			}
			setKeys := make([]pglock.Key, len(set))
			for i, k := range set {
				setKeys[i] = k.(pglock.Key)
			}
			// Warm: the batch statement prepared, the block open.
			if ok, err := lk.TryDoAll(bg, set, func(context.Context) error { return nil }); err != nil || !ok {
				t.Fatalf("TryDoAll before the fill = %v, %v", ok, err)
			}

			gap, err := pgx.Connect(bg, srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			defer gap.Close(bg)
			if _, err := gap.Exec(bg, `CREATE OR REPLACE FUNCTION pglock_r29_free() RETURNS int LANGUAGE plpgsql AS $$
				DECLARE n int := 0;
				BEGIN
					FOR i IN 1..1000 LOOP
						BEGIN
							PERFORM pg_advisory_lock(-434343, i);
						EXCEPTION WHEN out_of_memory THEN
							RETURN n;
						END;
						n := n + 1;
					END LOOP;
					RETURN n;
				END $$`); err != nil {
				t.Fatal(err)
			}
			if err := gap.QueryRow(bg, `SELECT pglock_r29_free()`).Scan(new(int)); err != nil { // plan cached before the fill
				t.Fatal(err)
			}
			if _, err := gap.Exec(bg, "SELECT pg_advisory_unlock_all()"); err != nil {
				t.Fatal(err)
			}
			const gapN = 4
			if _, err := gap.Exec(bg, "SELECT pg_advisory_lock(-424242, g) FROM generate_series(1, $1::int) g", gapN); err != nil {
				t.Fatal(err)
			}
			filler, err := pgx.Connect(bg, srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			defer filler.Close(bg)
			fill, err := filler.Begin(bg)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := fill.Exec(bg, `DO $$ BEGIN
				FOR i IN 1..100000 LOOP
					BEGIN
						EXECUTE format('CREATE TEMP TABLE r29_fill_%s ()', i);
					EXCEPTION WHEN out_of_memory THEN
						EXIT;
					END;
				END LOOP;
			END $$`); err != nil {
				t.Fatal(err)
			}
			if _, err := gap.Exec(bg, "SELECT pg_advisory_unlock_all()"); err != nil {
				t.Fatal(err)
			}
			// How many slots are free: as many advisory locks as the gap
			// session can take now (then given back).
			var free int
			if err := gap.QueryRow(bg, `SELECT pglock_r29_free()`).Scan(&free); err != nil {
				t.Fatal(err)
			}
			if _, err := gap.Exec(bg, "SELECT pg_advisory_unlock_all()"); err != nil {
				t.Fatal(err)
			}
			if free == 0 || free >= len(set) {
				t.Fatalf("%d slots free in the lock table: the set's batch would not fail half way", free)
			}
			before := pglock.LockStatements(lk)
			ok, err := lk.TryDoAll(bg, set, func(context.Context) error {
				t.Error("a key set ran its function on a full lock table")
				return nil
			})
			t.Logf("%d slots free; TryDoAll of %d keys on the full table (%d statements) = %v, %v", free, len(set), pglock.LockStatements(lk)-before, ok, err)
			if err == nil || !errors.Is(err, pglock.ErrTooManyLocks) {
				t.Errorf("TryDoAll on a full lock table = %v, %v; want ErrTooManyLocks", ok, err)
			}
			if n := r29Granted(t, watch, setKeys, dbOID); n != 0 {
				t.Errorf("after the failed batch, %d keys of the set are granted in pg_locks", n)
			}
			for _, l := range locks {
				select {
				case <-l.Lost():
					t.Fatalf("a Lock held before was lost by the failed batch: %s", l.Key())
				default:
				}
			}
			if n := r29Granted(t, watch, held, dbOID); n != len(held) {
				t.Errorf("%d of the %d keys held before are granted in pg_locks", n, len(held))
			}
			if err := fill.Rollback(bg); err != nil {
				t.Fatal(err)
			}
			if ok, err := lk.TryDoAll(bg, set, func(context.Context) error {
				if n := r29Granted(t, watch, setKeys, dbOID); n != len(set) {
					t.Errorf("in TryDoAll after the table emptied: %d of %d granted", n, len(set))
				}
				return nil
			}); err != nil || !ok {
				t.Fatalf("TryDoAll after the table emptied = %v, %v", ok, err)
			}
			for _, l := range locks {
				if err := l.Release(bg); err != nil {
					t.Fatal(err)
				}
			}
			if n := r29Granted(t, watch, append(setKeys, held...), dbOID); n != 0 {
				t.Errorf("%d keys still granted after every release", n)
			}
			if s := lk.Stats(); s.ServerLocks != 0 || s.HeldKeys != 0 {
				t.Errorf("Stats after every release = %+v", s)
			}
		})
	}
}

// r29Granted counts the keys granted in pg_locks (bigint and pair keys,
// any mode), read through watch without touching a shared catalog (whose
// lock would need a slot of a full lock table).
func r29Granted(t *testing.T, watch *pgxpool.Pool, keys []pglock.Key, dbOID int64) int {
	t.Helper()
	var cs, os, ss []int64
	for _, k := range keys {
		c, o, s := k.LockTag()
		cs, os, ss = append(cs, int64(c)), append(os, int64(o)), append(ss, int64(s))
	}
	var n int
	err := watch.QueryRow(context.Background(), `
		SELECT count(*) FROM pg_catalog.pg_locks l
		JOIN unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS k(c, o, s)
		  ON l.classid = k.c::oid AND l.objid = k.o::oid AND l.objsubid = k.s::smallint
		WHERE l.locktype = 'advisory' AND l.granted AND l.database = $4::oid`,
		cs, os, ss, dbOID).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestReview29SharedJoinProbe: a shared hold that others of the process keep
// joining is probed (a shared try and give-back on another session of the
// Locker, answering a bool) once SharedJoinRecheck has passed: with no
// exclusive waiter elsewhere, joins go on; with a session of another
// process waiting for the key in Exclusive mode, joins stop (a try is
// refused) so that the waiter is not starved. A probe's answer read the
// wrong way round would do the opposite. On the direct path and on pgx's;
// a pair key with negative halves.
func TestReview29SharedJoinProbe(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	for vi, v := range r29Variants[:2] {
		t.Run(v.name, func(t *testing.T) {
			pool, _ := r29Pool(t, pgtest.URL(t), "r29probe", 2, v.edit)
			lk := muxLocker(t, pool, pglock.WithLockConns(2))
			base, err := pglock.KeyOf(pgtest.UniqueKey(t))
			if err != nil {
				t.Fatal(err)
			}
			key := pglock.Int32PairKey(-int32(uint32(base.Int64())>>1)-1, -int32(vi)-2)
			var held []*pglock.Lock
			defer func() {
				for _, l := range held {
					_ = l.Release(bg)
				}
			}()
			join := func() bool {
				l, err := lk.NewLock(key, pglock.WithMode(pglock.Shared))
				if err != nil {
					t.Fatal(err)
				}
				ok, err := l.TryAcquire(bg)
				if err != nil {
					t.Fatalf("shared TryAcquire: %v", err)
				}
				if ok {
					held = append(held, l)
				}
				return ok
			}
			if !join() {
				t.Fatal("shared TryAcquire of a free key refused")
			}
			// No waiter: joins go on past the recheck (probes answer no).
			for end := time.Now().Add(400 * time.Millisecond); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
				if !join() {
					t.Fatalf("a join refused with no exclusive waiter (after %d joins): the probe said one waits", len(held))
				}
			}
			// An exclusive waiter of another session.
			waiter, err := pgx.Connect(bg, pgtest.URL(t))
			if err != nil {
				t.Fatal(err)
			}
			defer waiter.Close(bg)
			a, b := int32(key.Int64()>>32), int32(key.Int64())
			got := make(chan error, 1)
			go func() {
				_, err := waiter.Exec(bg, "SELECT pg_advisory_lock($1::int, $2::int)", a, b)
				got <- err
			}()
			if !r29Until(5*time.Second, func() bool {
				hs, err := pgtest.Holders(bg, watch, key)
				if err != nil {
					t.Fatal(err)
				}
				for _, h := range hs {
					if !h.Granted {
						return true
					}
				}
				return false
			}) {
				t.Fatal("the exclusive waiter does not show in pg_locks")
			}
			n := len(held)
			stopped := r29Until(5*time.Second, func() bool { return !join() })
			if !stopped {
				t.Fatalf("joins went on for 5 s with an exclusive waiter elsewhere (%d joins): the probe said none waits", len(held)-n)
			}
			for _, l := range held {
				if err := l.Release(bg); err != nil {
					t.Fatal(err)
				}
			}
			held = nil
			select {
			case err := <-got:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the exclusive waiter did not get the key once the shared holders left")
			}
			if _, err := waiter.Exec(bg, "SELECT pg_advisory_unlock($1::int, $2::int)", a, b); err != nil {
				t.Fatal(err)
			}
			pgtest.WaitFree(t, watch, key)
		})
	}
}
