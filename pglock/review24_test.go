package pglock_test

// Adversarial review of issue 24 (re-entrant Do, key sets, pick and hints).
// Each TestReview24* test names the defect it shows, or what it checks that
// held up.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// r24Keys returns n consecutive raw keys, unique to this run, in canonical
// (ascending) order.
func r24Keys(n int) []pglock.Key {
	base := rand.Int64N(1<<60) + 1<<40
	ks := make([]pglock.Key, n)
	for i := range ks {
		ks[i] = pglock.Int64Key(base + int64(i))
	}
	return ks
}

// DEFECT: a nested Do reports success for a function that ran, for part of
// its life, without the lock. The nested Do runs fn "in the enclosing hold"
// but nothing ties the enclosing hold to the nested function: a goroutine
// that fn started runs a nested Do, the outer fn returns, the outer Do
// releases the key, another session takes it while the nested function still
// runs, and the nested Do returns nil. A plain Do whose hold ends under its
// function returns an error matching ErrLockLost.
func TestReview24NestedDoOutlivesItsEnclosingHold(t *testing.T) {
	bg := context.Background()
	lk := muxLocker(t, pgtest.Pool(t, 4))
	other := muxLocker(t, pgtest.Pool(t, 4))
	key := pgtest.UniqueKey(t)

	innerStarted := make(chan struct{})
	outerDone := make(chan struct{})
	nested := make(chan error, 1)
	var otherTook bool
	var innerCause error
	err := lk.Do(bg, key, func(ctx context.Context) error {
		go func() {
			nested <- lk.Do(ctx, key, func(ctx context.Context) error {
				close(innerStarted)
				<-outerDone
				// The key is no longer this process's: another session takes it.
				ok, err := other.TryDo(bg, key, func(context.Context) error { return nil })
				if err != nil {
					t.Errorf("other TryDo: %v", err)
				}
				otherTook = ok
				innerCause = context.Cause(ctx)
				return nil
			})
		}()
		<-innerStarted
		return nil
	})
	close(outerDone)
	if err != nil {
		t.Fatalf("outer Do: %v", err)
	}
	nerr := <-nested
	if !otherTook {
		t.Fatalf("another session could not take the key after the outer Do returned")
	}
	t.Logf("nested fn's context cause at the end: %v", innerCause)
	if nerr == nil {
		t.Errorf("DEFECT: the nested Do returned nil, although another session held the key while its function ran" +
			" (want an error matching ErrLockLost or ErrNotAcquired)")
	} else if !errors.Is(nerr, pglock.ErrLockLost) && !errors.Is(nerr, pglock.ErrNotAcquired) {
		t.Errorf("nested Do: %v, want ErrLockLost or ErrNotAcquired", nerr)
	}
	if innerCause != nil && !errors.Is(innerCause, pglock.ErrLockLost) {
		t.Errorf("DEFECT: the nested function's context ended with cause %v when its hold ended, want ErrLockLost", innerCause)
	}
}

// DEFECT: a nested Do whose hold is lost while its function runs returns
// the function's nil, where the enclosing Do (and any plain Do) returns an
// error matching ErrLockLost.
func TestReview24NestedDoLostReturnsNil(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pgtest.Pool(t, 4))
	name := pgtest.UniqueKey(t)
	key, _ := lk.Key(name)
	var nerr error
	var innerCause error
	err := lk.Do(bg, name, func(ctx context.Context) error {
		nerr = lk.Do(ctx, name, func(ctx context.Context) error {
			g := pgtest.Granted(t, watch, key)
			if len(g) != 1 {
				t.Fatalf("holders %+v", g)
			}
			pgtest.Terminate(t, watch, g[0].PID)
			select {
			case <-ctx.Done():
				innerCause = context.Cause(ctx)
			case <-time.After(10 * time.Second):
				t.Errorf("the nested function's context did not end within 10 s of the loss")
			}
			return nil // the work "finished"
		})
		return nil
	})
	t.Logf("outer Do: %v; nested Do: %v; nested ctx cause: %v", err, nerr, innerCause)
	if !errors.Is(err, pglock.ErrLockLost) {
		t.Errorf("outer Do: %v, want ErrLockLost", err)
	}
	if !errors.Is(innerCause, pglock.ErrLockLost) {
		t.Errorf("nested fn's cause %v, want ErrLockLost", innerCause)
	}
	if nerr == nil {
		t.Errorf("DEFECT: the nested Do returned nil although its hold was lost while its function ran (want ErrLockLost)")
	}
}

// DEFECT: ContextWithHold's context outlives its hold: after the hold ends
// and the same Lock is acquired again (by another owner: Lock values may be
// acquired again after Release), a Do of the key in the stale context runs
// at once, at the same time as the new owner's work. ContextWithHold's doc:
// "once it ends, a nested Do in that context fails". nestErr checks only
// outer.Held(), not that it is still the same hold.
func TestReview24StaleHoldContextRunsInALaterHold(t *testing.T) {
	bg := context.Background()
	lk := muxLocker(t, pgtest.Pool(t, 4))
	key := pgtest.UniqueKey(t)
	l, err := lk.NewLock(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	stale := pglock.ContextWithHold(bg, l) // e.g. a stream's context
	if err := l.Release(bg); err != nil {
		t.Fatal(err)
	}
	if err := lk.Do(stale, key, func(context.Context) error { return nil }); err == nil {
		t.Fatalf("a Do in the context of an ended hold ran (before any new hold)")
	}
	// A new owner holds the key with the same Lock value.
	if err := l.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	defer l.Release(bg)
	ran := false
	done := make(chan error, 1)
	go func() {
		done <- lk.Do(stale, key, func(context.Context) error { ran = true; return nil })
	}()
	select {
	case err = <-done:
	case <-time.After(2 * time.Second):
		// Waiting for the new owner is right: it holds the key.
		t.Logf("the stale context's Do waits for the new owner, as it should")
		_ = l.Release(bg)
		if err := <-done; err != nil {
			t.Logf("the stale context's Do after the new owner let go: %v", err)
		}
		return
	}
	if ran {
		t.Errorf("DEFECT: a Do in the context of an ended hold ran at once inside a later hold of another owner (err %v)", err)
	}
}

// DEFECT: the same with Lock.Do: a goroutine that keeps fn's context past
// Do (context.WithoutCancel, as background work does to outlive a request)
// later runs a Do of the key at once while another goroutine's Do of the
// same Lock holds it: two functions inside one exclusive key.
func TestReview24StaleDoContextOverlapsTheNextDo(t *testing.T) {
	bg := context.Background()
	lk := muxLocker(t, pgtest.Pool(t, 4))
	key := pgtest.UniqueKey(t)
	l, err := lk.NewLock(key)
	if err != nil {
		t.Fatal(err)
	}
	var saved context.Context
	if err := l.Do(bg, func(ctx context.Context) error {
		saved = context.WithoutCancel(ctx)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := lk.Do(saved, key, func(context.Context) error { return nil }); err == nil {
		t.Fatalf("a Do in a context of an ended Do ran (no Do running)")
	}
	inside := make(chan struct{})
	release := make(chan struct{})
	second := make(chan error, 1)
	go func() {
		second <- l.Do(bg, func(context.Context) error {
			close(inside)
			<-release
			return nil
		})
	}()
	<-inside
	overlap := false
	staleDone := make(chan error, 1)
	go func() {
		staleDone <- lk.Do(saved, key, func(context.Context) error { overlap = true; return nil })
	}()
	var serr error
	got := false
	select {
	case serr = <-staleDone:
		got = true
	case <-time.After(2 * time.Second):
		t.Logf("the stale context's Do waits, as it should")
	}
	close(release)
	if err := <-second; err != nil {
		t.Fatal(err)
	}
	if !got {
		serr = <-staleDone
	}
	if overlap {
		t.Errorf("DEFECT: a Do in the stale context of an ended Do ran while another Do held the key (err %v)", serr)
	}
}

// DEFECT: TryDoAll in Transaction scope, inside a Do that holds the set's
// first key: a later key found busy makes TryDoAll return (false, nil), but
// the keys it took before (in the enclosing transaction, with
// pg_advisory_xact_lock) stay held until the enclosing transaction ends.
// TryDoAll's doc: "When one key is busy it holds none of them afterwards".
// doAllTx takes the other keys in the first Lock's transaction, which here is
// the enclosing one (nested TryDo), and errSetBusy rolls nothing back.
func TestReview24TryDoAllTxNestedLeavesPartialHolds(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pgtest.Pool(t, 4), pglock.WithScope(pglock.Transaction))
	other := muxLocker(t, pgtest.Pool(t, 2))
	ks := r24Keys(3) // a < b < c
	busy, err := other.NewLock(ks[2])
	if err != nil {
		t.Fatal(err)
	}
	if err := busy.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	defer busy.Release(bg)
	err = lk.Do(bg, ks[0], func(ctx context.Context) error {
		ok, err := lk.TryDoAll(ctx, []any{ks[0], ks[1], ks[2]}, func(context.Context) error {
			t.Errorf("the set's function ran although key c is held elsewhere")
			return nil
		})
		if ok || err != nil {
			t.Errorf("TryDoAll = %v, %v; want false, nil", ok, err)
		}
		if g := pgtest.Granted(t, watch, ks[1]); len(g) != 0 {
			t.Errorf("DEFECT: after TryDoAll returned false, key b (never held by the enclosing Do) is still held: %+v", g)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, ks[1])
}

// DEFECT: TryDoAll on a Locker made on a caller's transaction, whose second
// key is busy, returns (false, nil), as for a busy set, but:
//   - by default (RollbackOnError on) it has rolled back the caller's whole
//     transaction: the caller's earlier work is gone, and its pgx.Tx is closed
//     (doAllTx's errSetBusy goes through Lock.run as fn's error, and run rolls
//     back: pgxBackend.release on a caller's tx calls callerTx.Rollback). A
//     single-key TryDo that finds its key busy changes nothing;
//   - with WithRollbackOnError(false) the first key stays held in the
//     caller's transaction (until it ends), against "When one key is busy it
//     holds none of them afterwards".
//
// A SAVEPOINT around the set's tries, rolled back (ROLLBACK TO) when one is
// busy, would let the taken keys go and keep the caller's work (PostgreSQL
// releases xact locks taken since a savepoint on ROLLBACK TO SAVEPOINT);
// errSetBusy must not count as fn's error.
func TestReview24TryDoAllCallerTxBusy(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	pool := pgtest.Pool(t, 2)
	other := muxLocker(t, pgtest.Pool(t, 2))
	for _, rollback := range []bool{true, false} {
		t.Run(fmt.Sprintf("RollbackOnError=%v", rollback), func(t *testing.T) {
			ks := r24Keys(2)
			busy, err := other.NewLock(ks[1])
			if err != nil {
				t.Fatal(err)
			}
			if err := busy.Acquire(bg); err != nil {
				t.Fatal(err)
			}
			defer busy.Release(bg)
			tx, err := pool.Begin(bg)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback(bg)
			if _, err := tx.Exec(bg, "CREATE TEMP TABLE r24work (v int) ON COMMIT DROP; INSERT INTO r24work VALUES (1)"); err != nil {
				t.Fatal(err)
			}
			lk, err := pglock.NewLocker(tx, pglock.WithRollbackOnError(rollback))
			if err != nil {
				t.Fatal(err)
			}
			ok, err := lk.TryDoAll(bg, []any{ks[1], ks[0]}, func(context.Context) error {
				t.Errorf("the set's function ran although key b is held elsewhere")
				return nil
			})
			if ok || err != nil {
				t.Errorf("TryDoAll = %v, %v; want false, nil", ok, err)
			}
			var n int
			if err := tx.QueryRow(bg, "SELECT count(*) FROM r24work").Scan(&n); err != nil || n != 1 {
				t.Errorf("DEFECT: after a TryDoAll that found a key busy, the caller's transaction lost its work: count %d, %v", n, err)
			}
			if g := pgtest.Granted(t, watch, ks[0]); len(g) != 0 {
				t.Errorf("DEFECT: after TryDoAll returned false, key a is still held by the caller's transaction: %+v", g)
			}
		})
	}
}

// r24Lockers builds Lockers of each kind on pools (or *sql.DB) of their own.
func r24Locker(t *testing.T, kind string, opts ...pglock.Option) *pglock.Locker {
	t.Helper()
	switch kind {
	case "mux":
		return muxLocker(t, pgtest.Pool(t, 8), opts...)
	case "mux4":
		return muxLocker(t, pgtest.Pool(t, 8), append(opts, pglock.WithLockConns(4))...)
	case "nomux":
		return muxLocker(t, pgtest.Pool(t, 16), append(opts, pglock.WithMultiplexing(false))...)
	case "sql":
		db, err := sql.Open("pgx", pgtest.URL(t))
		if err != nil {
			t.Fatal(err)
		}
		db.SetMaxOpenConns(16)
		t.Cleanup(func() { _ = db.Close() })
		lk, err := pglock.NewLocker(db, opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = lk.Close() })
		return lk
	}
	t.Fatalf("kind %q", kind)
	return nil
}

// Held up: a lock connection (or a hold's pool connection) killed while a
// set is held cancels fn's context with ErrLockLost, and DoAll returns an
// error matching ErrLockLost.
func TestReview24DoAllLost(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	for _, kind := range []string{"mux", "nomux", "sql"} {
		for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
			t.Run(kind+"/"+scope.String(), func(t *testing.T) {
				if kind == "sql" && scope == pglock.Transaction {
					t.Skip("the kernel-side watch is pgx's")
				}
				lk := r24Locker(t, kind, pglock.WithScope(scope))
				ks := r24Keys(3)
				var cause error
				err := lk.DoAll(bg, []any{ks[2], ks[0], ks[1]}, func(ctx context.Context) error {
					g := pgtest.Granted(t, watch, ks[1])
					if len(g) != 1 {
						t.Fatalf("holders of b: %+v", g)
					}
					pgtest.Terminate(t, watch, g[0].PID)
					select {
					case <-ctx.Done():
						cause = context.Cause(ctx)
					case <-time.After(10 * time.Second):
						t.Errorf("fn's context did not end within 10 s of the loss")
					}
					return nil
				})
				t.Logf("DoAll: %v; cause %v", err, cause)
				if !errors.Is(cause, pglock.ErrLockLost) {
					t.Errorf("fn's cause = %v, want ErrLockLost", cause)
				}
				if !errors.Is(err, pglock.ErrLockLost) && !errors.Is(err, pglock.ErrNotAcquired) {
					t.Errorf("DoAll = %v, want ErrLockLost", err)
				}
				for _, k := range ks {
					pgtest.WaitFree(t, watch, k)
				}
			})
		}
	}
}

// Held up (or not): two Lockers ("processes") take random overlapping sets
// under random cancels; never two holders of a key, nothing left held.
func TestReview24DoAllRandomCancels(t *testing.T) {
	watch := pgtest.Pool(t, 2)
	for _, pair := range [][2]string{{"mux", "mux4"}, {"mux", "nomux"}, {"sql", "mux"}} {
		for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
			t.Run(pair[0]+"+"+pair[1]+"/"+scope.String(), func(t *testing.T) {
				lockers := []*pglock.Locker{r24Locker(t, pair[0], pglock.WithScope(scope)), r24Locker(t, pair[1], pglock.WithScope(scope))}
				const nk = 6
				ks := r24Keys(nk)
				var inside [nk]atomic.Int32
				var ran, cancelled atomic.Int32
				var wg sync.WaitGroup
				deadline := time.Now().Add(1500 * time.Millisecond)
				for g := range 6 {
					lk := lockers[g%2]
					wg.Go(func() {
						rng := rand.New(rand.NewPCG(uint64(g), uint64(time.Now().UnixNano())))
						for time.Now().Before(deadline) {
							perm := rng.Perm(nk)[:1+rng.IntN(3)]
							set := make([]any, 0, len(perm)+1)
							for _, p := range perm {
								set = append(set, ks[p])
							}
							if rng.IntN(3) == 0 { // a duplicate
								set = append(set, ks[perm[0]])
							}
							ctx, cancel := context.WithCancel(context.Background())
							timer := time.AfterFunc(time.Duration(rng.IntN(3000))*time.Microsecond, cancel)
							fn := func(ctx context.Context) error {
								for _, p := range perm {
									if n := inside[p].Add(1); n != 1 {
										t.Errorf("INVARIANT: key %d held by %d sets at once", p, n)
									}
								}
								time.Sleep(time.Duration(rng.IntN(500)) * time.Microsecond)
								for _, p := range perm {
									inside[p].Add(-1)
								}
								ran.Add(1)
								return nil
							}
							var err error
							if rng.IntN(3) == 0 {
								_, err = lk.TryDoAll(ctx, set, fn)
							} else {
								err = lk.DoAll(ctx, set, fn)
							}
							timer.Stop()
							cancel()
							if err != nil {
								if !errors.Is(err, pglock.ErrNotAcquired) && !errors.Is(err, context.Canceled) {
									t.Errorf("set: unexpected error %v", err)
								}
								cancelled.Add(1)
							}
						}
					})
				}
				wg.Wait()
				t.Logf("%d ran, %d failed", ran.Load(), cancelled.Load())
				for _, k := range ks {
					pgtest.WaitFree(t, watch, k)
				}
			})
		}
	}
}

// Held up (or not): Close racing DoAll: every DoAll returns, nothing stays
// held, no goroutine is left (the package's TestMain checks).
func TestReview24DoAllCloseRace(t *testing.T) {
	watch := pgtest.Pool(t, 2)
	for round := range 6 {
		lk := r24Locker(t, []string{"mux", "mux4", "nomux"}[round%3])
		ks := r24Keys(4)
		var wg sync.WaitGroup
		for g := range 4 {
			wg.Go(func() {
				for i := 0; ; i++ {
					set := []any{ks[(g+i)%4], ks[(g+i+1)%4]}
					began := time.Now()
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					err := lk.DoAll(ctx, set, func(ctx context.Context) error {
						time.Sleep(200 * time.Microsecond)
						return ctx.Err()
					})
					cancel()
					if errors.Is(err, pglock.ErrLockerClosed) {
						return
					}
					if time.Since(began) > 4*time.Second {
						t.Errorf("a DoAll took %v: %v", time.Since(began), err)
						return
					}
					if err != nil && !errors.Is(err, pglock.ErrLockLost) && !errors.Is(err, context.Canceled) {
						t.Logf("DoAll: %v", err)
					}
				}
			})
		}
		time.Sleep(time.Duration(20+round*15) * time.Millisecond)
		if err := lk.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		wg.Wait()
		for _, k := range ks {
			pgtest.WaitFree(t, watch, k)
		}
	}
}

// Held up (or not): pick and hints under load. Three Lockers with 2, 3 and 4
// lock connections on pools of their own; 12 goroutines on 12 exclusive
// keys (tries and waits, random short deadlines) and one readers/writer key.
// Phase 1 checks exclusion; phase 2 kills lock connections at random while
// it runs (liveness, errors, no leftovers). A sampler checks Stats (LockConns
// never above WithLockConns, Sessions within MaxSessions) and the server's
// own count of the Lockers' sessions.
func TestReview24PickUnderLoad(t *testing.T) {
	watch := pgtest.Pool(t, 4)
	const nl = 3
	lockers := make([]*pglock.Locker, nl)
	pools := make([]*pgxpool.Pool, nl)
	app := fmt.Sprintf("r24mux-%d", rand.Int64())
	for i := range lockers {
		cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
		if err != nil {
			t.Fatal(err)
		}
		cfg.MaxConns = 4
		cfg.ConnConfig.RuntimeParams["application_name"] = fmt.Sprintf("%s-%d", app, i)
		pools[i], err = pgxpool.NewWithConfig(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pools[i].Close)
		lockers[i] = muxLocker(t, pools[i], pglock.WithLockConns(2+i), pglock.WithLostCheckInterval(100*time.Millisecond))
	}
	const nk = 12
	ks := r24Keys(nk + 1)
	rw := ks[nk]
	for phase, kill := range []bool{false, true} {
		var inside [nk]atomic.Int32
		var readers, writers atomic.Int32
		var ops, fails atomic.Int64
		stop := make(chan struct{})
		var bg sync.WaitGroup
		bg.Go(func() { // sampler
			for {
				select {
				case <-stop:
					return
				case <-time.After(3 * time.Millisecond):
				}
				for i, lk := range lockers {
					s := lk.Stats()
					if s.LockConns > 2+i {
						t.Errorf("Locker %d: LockConns %d > WithLockConns %d", i, s.LockConns, 2+i)
					}
					if s.Sessions > s.MaxSessions {
						t.Errorf("Locker %d: Sessions %d > MaxSessions %d: %+v", i, s.Sessions, s.MaxSessions, s)
					}
				}
				rows, err := watch.Query(context.Background(),
					"SELECT application_name, count(*) FROM pg_catalog.pg_stat_activity WHERE application_name LIKE $1 GROUP BY 1", app+"-%")
				if err == nil {
					for rows.Next() {
						var name string
						var c int
						_ = rows.Scan(&name, &c)
						i := int(name[len(name)-1] - '0')
						if max := 2 + i + pglock.DefaultWaitConns + int(pools[i].Stat().TotalConns()); c > max && !kill {
							t.Errorf("Locker %d: %d server sessions, over %d (lock + wait conns + its pool's)", i, c, max)
						}
					}
					rows.Close()
				}
			}
		})
		if kill {
			bg.Go(func() {
				for {
					select {
					case <-stop:
						return
					case <-time.After(time.Duration(50+rand.IntN(150)) * time.Millisecond):
					}
					var pid int32
					err := watch.QueryRow(context.Background(), `SELECT pid FROM pg_catalog.pg_stat_activity
						WHERE application_name LIKE $1 ORDER BY random() LIMIT 1`, app+"-%").Scan(&pid)
					if err == nil {
						_, _ = watch.Exec(context.Background(), "SELECT pg_terminate_backend($1)", pid)
					}
				}
			})
		}
		var wg sync.WaitGroup
		deadline := time.Now().Add(4 * time.Second)
		for g := range 12 {
			lk := lockers[g%nl]
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(g), uint64(time.Now().UnixNano())))
				for time.Now().Before(deadline) {
					ctx, cancel := context.WithTimeout(context.Background(), time.Duration(1+rng.IntN(50))*time.Millisecond)
					var err error
					began := time.Now()
					switch op := rng.IntN(10); {
					case op < 7:
						p := rng.IntN(nk)
						if rng.IntN(2) == 0 && g < nk {
							p = g // mostly its own key: distinct keys side by side
						}
						fn := func(ctx context.Context) error {
							if n := inside[p].Add(1); n != 1 && !kill {
								t.Errorf("INVARIANT: key %d held %d times at once", p, n)
							}
							time.Sleep(time.Duration(rng.IntN(300)) * time.Microsecond)
							inside[p].Add(-1)
							return nil
						}
						if op < 4 {
							_, err = lk.TryDo(ctx, ks[p], fn)
						} else {
							err = lk.Do(ctx, ks[p], fn)
						}
					case op < 9:
						l, lerr := lk.NewLock(rw, pglock.WithMode(pglock.Shared))
						if lerr != nil {
							t.Error(lerr)
							cancel()
							return
						}
						err = l.Do(ctx, func(context.Context) error {
							readers.Add(1)
							if w := writers.Load(); w != 0 && !kill {
								t.Errorf("INVARIANT: a reader inside with %d writers", w)
							}
							time.Sleep(time.Duration(rng.IntN(300)) * time.Microsecond)
							readers.Add(-1)
							return nil
						})
					default:
						err = lk.Do(ctx, rw, func(context.Context) error {
							if w := writers.Add(1); (w != 1 || readers.Load() != 0) && !kill {
								t.Errorf("INVARIANT: a writer inside with %d writers, %d readers", w, readers.Load())
							}
							time.Sleep(time.Duration(rng.IntN(300)) * time.Microsecond)
							writers.Add(-1)
							return nil
						})
					}
					cancel()
					ops.Add(1)
					if d := time.Since(began); d > 3*time.Second {
						t.Errorf("an operation took %v (deadline was at most 50 ms): %v", d, err)
					}
					if err != nil {
						fails.Add(1)
						if !errors.Is(err, pglock.ErrNotAcquired) && !errors.Is(err, pglock.ErrLockLost) {
							t.Errorf("unexpected error: %v", err)
						}
					}
				}
			})
		}
		wg.Wait()
		close(stop)
		bg.Wait()
		t.Logf("phase %d (kill %v): %d operations, %d failed", phase, kill, ops.Load(), fails.Load())
		for _, k := range ks {
			pgtest.WaitFree(t, watch, k)
		}
		for i, lk := range lockers {
			t.Logf("Locker %d: %+v", i, lk.Stats())
		}
	}
	// Still works after the kills.
	for i, lk := range lockers {
		if err := lk.Do(context.Background(), ks[0], func(context.Context) error { return nil }); err != nil {
			t.Errorf("Locker %d after the kills: %v", i, err)
		}
	}
}

// DEFECT (contract): a nested Do in Transaction scope whose function fails
// does not roll its work back. Do's doc: "When fn returns an error, Do rolls
// back first if RollbackOnError is on (the default)"; the nested Do runs fn
// in the enclosing transaction (Lock.nested: `return true, fn(ctx)`) and
// returns the error, and when the caller handles it and goes on (the
// motivating example: a service function that locks an account, called
// from a handler that already holds it), the failed function's writes are
// committed with the enclosing work. The same call outside any Do rolls
// them back. A SAVEPOINT around the nested function in Transaction scope,
// rolled back to on an error or a panic, would keep Do's promise.
func TestReview24NestedTxDoErrorIsCommitted(t *testing.T) {
	bg := context.Background()
	pool := pgtest.Pool(t, 4)
	lk := muxLocker(t, pool, pglock.WithScope(pglock.Transaction))
	key := pgtest.UniqueKey(t)
	table := fmt.Sprintf("r24_%d", rand.Int64N(1<<40))
	if _, err := pool.Exec(bg, "CREATE TABLE "+table+" (v text)"); err != nil {
		t.Fatal(err)
	}
	defer pool.Exec(bg, "DROP TABLE "+table)
	failed := errors.New("debit refused")
	// The service function: its writes must not survive its error.
	debit := func(ctx context.Context, who string) error {
		return lk.Do(ctx, key, func(ctx context.Context) error {
			tx, ok := pglock.TxFromContext(ctx)
			if !ok {
				return errors.New("no tx")
			}
			if _, err := tx.Exec(ctx, "INSERT INTO "+table+" VALUES ($1)", who); err != nil {
				return err
			}
			return failed
		})
	}
	if err := debit(bg, "alone"); !errors.Is(err, failed) {
		t.Fatalf("debit alone: %v", err)
	}
	err := lk.Do(bg, key, func(ctx context.Context) error {
		if err := debit(ctx, "nested"); !errors.Is(err, failed) {
			t.Errorf("nested debit: %v", err)
		}
		return nil // the handler handled the refusal
	})
	if err != nil {
		t.Fatal(err)
	}
	var alone, nested int
	if err := pool.QueryRow(bg, "SELECT count(*) FILTER (WHERE v = 'alone'), count(*) FILTER (WHERE v = 'nested') FROM "+table).Scan(&alone, &nested); err != nil {
		t.Fatal(err)
	}
	if alone != 0 {
		t.Errorf("the failed debit outside any Do was committed")
	}
	if nested != 0 {
		t.Errorf("DEFECT: the failed nested debit's write was committed (the nested Do did not roll back its function's work)")
	}
}

// Held up: a hold context of a Locker on one server does not make a Do on
// another server skip its lock; nested Do across two Lockers on the same
// pool with other namespaces or modes behaves as documented.
func TestReview24NestedAcrossDomains(t *testing.T) {
	bg := context.Background()
	srv := pgtest.ThrowawayT(t, nil)
	poolB, err := pgxpool.New(bg, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(poolB.Close)
	watchB, err := pgxpool.New(bg, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(watchB.Close)
	poolA := pgtest.Pool(t, 4)
	watchA := pgtest.Pool(t, 2)
	lkA := muxLocker(t, poolA)
	lkB := muxLocker(t, poolB)
	lkAshared := muxLocker(t, poolA, pglock.WithMode(pglock.Shared))
	lkAns := muxLocker(t, poolA, pglock.WithNamespace("ns:"))
	sqlB, err := sql.Open("pgx", srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sqlB.Close() })
	lkBsql, err := pglock.NewLocker(sqlB)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lkBsql.Close() })
	name := pgtest.UniqueKey(t)
	key, _ := lkA.Key(name)
	err = lkA.Do(bg, name, func(ctx context.Context) error {
		for _, lk := range []*pglock.Locker{lkB, lkBsql} {
			if err := lk.Do(ctx, name, func(context.Context) error {
				if g := pgtest.Granted(t, watchB, key); len(g) != 1 {
					t.Errorf("a Do on server B inside a hold on server A did not lock on B: %+v", g)
				}
				return nil
			}); err != nil {
				t.Errorf("Do on B: %v", err)
			}
			if err := lk.DoAll(ctx, []any{name, name + "x"}, func(context.Context) error {
				if g := pgtest.Granted(t, watchB, key); len(g) != 1 {
					t.Errorf("a DoAll on server B inside a hold on server A did not lock on B: %+v", g)
				}
				return nil
			}); err != nil {
				t.Errorf("DoAll on B: %v", err)
			}
		}
		// Same pool, Shared asked inside Exclusive: runs in the hold.
		if err := lkAshared.Do(ctx, name, func(context.Context) error { return nil }); err != nil {
			t.Errorf("Shared inside Exclusive: %v", err)
		}
		// Same pool, another namespace: another key, taken for real.
		nsKey, _ := lkAns.Key(name)
		if err := lkAns.Do(ctx, name, func(context.Context) error {
			if g := pgtest.Granted(t, watchA, nsKey); len(g) != 1 {
				t.Errorf("namespaced key not held: %+v", g)
			}
			return nil
		}); err != nil {
			t.Errorf("namespaced Do: %v", err)
		}
		// Transaction scope inside Session scope: ErrSelfDeadlock at once.
		tl, _ := lkA.NewLock(name, pglock.WithScope(pglock.Transaction))
		if err := tl.Do(ctx, func(context.Context) error { return nil }); !errors.Is(err, pglock.ErrSelfDeadlock) {
			t.Errorf("Transaction inside Session: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	err = lkAshared.Do(bg, name, func(ctx context.Context) error {
		err := lkA.Do(ctx, name, func(context.Context) error { return nil })
		if !errors.Is(err, pglock.ErrSelfDeadlock) || !errors.Is(err, pglock.ErrNotAcquired) {
			t.Errorf("Exclusive inside Shared: %v", err)
		}
		ok, err := lkA.TryDo(ctx, name, func(context.Context) error { return nil })
		if ok || !errors.Is(err, pglock.ErrSelfDeadlock) {
			t.Errorf("Exclusive TryDo inside Shared: %v, %v", ok, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watchA, key)
	pgtest.WaitFree(t, watchB, key)
}

// Held up: once the enclosing hold's loss is known (Lost closed), a nested
// Do, TryDo or DoAll fails and never runs its function.
func TestReview24NestedAfterLoss(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	for _, kind := range []string{"mux", "nomux", "sql"} {
		t.Run(kind, func(t *testing.T) {
			lk := r24Locker(t, kind)
			name := pgtest.UniqueKey(t)
			key, _ := lk.Key(name)
			l, err := lk.NewLock(name)
			if err != nil {
				t.Fatal(err)
			}
			err = l.Do(bg, func(ctx context.Context) error {
				lost := l.Lost()
				g := pgtest.Granted(t, watch, key)
				if len(g) != 1 {
					t.Fatalf("holders %+v", g)
				}
				pgtest.Terminate(t, watch, g[0].PID)
				select {
				case <-lost:
				case <-time.After(10 * time.Second):
					t.Fatalf("Lost did not close")
				}
				ran := false
				fn := func(context.Context) error { ran = true; return nil }
				if err := lk.Do(ctx, name, fn); err == nil {
					t.Errorf("nested Do after the loss: nil")
				}
				if ok, err := lk.TryDo(ctx, name, fn); ok || err == nil {
					t.Errorf("nested TryDo after the loss: %v, %v", ok, err)
				}
				if err := lk.DoAll(ctx, []any{name}, fn); err == nil {
					t.Errorf("nested DoAll after the loss: nil")
				}
				if ran {
					t.Errorf("a nested function ran after the loss was known")
				}
				return nil
			})
			if !errors.Is(err, pglock.ErrLockLost) {
				t.Errorf("Do = %v, want ErrLockLost", err)
			}
		})
	}
}

// DEFECT: DoAll with one pool connection per hold (WithMultiplexing(false))
// deadlocks on the pool itself: each key of a set takes a pool connection
// and keeps it while the next key's try waits for another (acquireSet /
// trySet take them one after the other). Goroutines whose sets are disjoint
// (no key in common: nobody waits for a lock) and each smaller than the pool,
// as the doc asks, can together take every connection and all wait for one
// more, until their contexts end: a set of free keys is reported
// ErrNotAcquired after its whole wait. Taking the set's pool connections
// all or nothing (or one connection for the whole set, as Transaction
// scope does) would avoid it.
func TestReview24DoAllNoMuxPoolDeadlock(t *testing.T) {
	pool := pgtest.Pool(t, 4)
	lk := muxLocker(t, pool, pglock.WithMultiplexing(false))
	const goroutines = 4
	var failed atomic.Int32
	var first atomic.Pointer[error]
	var wg sync.WaitGroup
	for g := range goroutines {
		ks := r24Keys(2) // a set of its own: no key in common with any other
		wg.Go(func() {
			for range 20 {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				err := lk.DoAll(ctx, []any{ks[0], ks[1]}, func(context.Context) error {
					time.Sleep(2 * time.Millisecond)
					return nil
				})
				cancel()
				if err != nil {
					failed.Add(1)
					first.CompareAndSwap(nil, &err)
					return
				}
			}
		})
		_ = g
	}
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Errorf("DEFECT: %d of %d goroutines' DoAll of free, disjoint 2-key sets on a 4-connection pool failed after 2 s: %v",
			n, goroutines, *first.Load())
	}
}
