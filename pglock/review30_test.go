package pglock_test

// Review 30: adversarial tests of commit ee65198 (a multiplexing Locker's
// Do and TryDo use their Lock again, through a sync.Pool, for later calls
// of any key). Real goroutines, a real PostgreSQL, run under -race.

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"math/rand/v2"
	"net/url"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"go.uber.org/goleak"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// r30goid is the id of the calling goroutine (for the test only: it tells
// which Do a synchronous observer or tracer call belongs to).
func r30goid() uint64 {
	var buf [64]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	if i := bytes.IndexByte(b, ' '); i > 0 {
		b = b[:i]
	}
	n, _ := strconv.ParseUint(string(b), 10, 64)
	return n
}

// r30expect records, per goroutine, the key of the Do (or nested Do) it is
// in: a stack, since a nested Do of another key emits that key's events.
type r30expect struct {
	mu sync.Mutex
	m  map[uint64][]pglock.Key
}

func (e *r30expect) push(k pglock.Key) {
	id := r30goid()
	e.mu.Lock()
	e.m[id] = append(e.m[id], k)
	e.mu.Unlock()
}

func (e *r30expect) pop() {
	id := r30goid()
	e.mu.Lock()
	s := e.m[id]
	if len(s) <= 1 {
		delete(e.m, id)
	} else {
		e.m[id] = s[:len(s)-1]
	}
	e.mu.Unlock()
}

// want returns the key expected on the calling goroutine.
func (e *r30expect) want() (pglock.Key, bool) {
	id := r30goid()
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.m[id]
	if len(s) == 0 {
		return pglock.Key{}, false
	}
	return s[len(s)-1], true
}

// r30tracer checks that each traced operation names the key of its Do.
type r30tracer struct {
	t   *testing.T
	exp *r30expect
	n   atomic.Int64
}

func (tr *r30tracer) Start(ctx context.Context, op pglock.TraceOp) (context.Context, func(bool, error)) {
	tr.n.Add(1)
	if want, ok := tr.exp.want(); !ok || want != op.Key {
		tr.t.Errorf("trace %s of key %s on a goroutine whose Do is on %s (known %v)", op.Name, op.Key, want, ok)
	}
	return ctx, func(bool, error) {}
}

// r30holdsOver polls pg_locks (from watch) for keys until stop is closed,
// and reports each time two sessions hold one of them at once.
func r30holdsOver(t *testing.T, watch *pgxpool.Pool, keys []pglock.Key, stop <-chan struct{}) (polls *atomic.Int64, done chan struct{}) {
	polls = new(atomic.Int64)
	done = make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			for _, k := range keys {
				hs, err := pgtest.Holders(context.Background(), watch, k)
				if err != nil {
					continue
				}
				granted := 0
				for _, h := range hs {
					if h.Granted {
						granted++
					}
				}
				if granted > 1 {
					t.Errorf("key %s granted to %d sessions at once: %+v", k, granted, hs)
				}
			}
			polls.Add(1)
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return polls, done
}

// TestReview30HotKeysTwoLockers races goroutines of two Lockers (two pools:
// two "processes") on three hot keys, with every kind of call ee65198
// recycles a Lock after: Do, TryDo (busy or not), Do cancelled in its wait,
// Do whose function panics or calls runtime.Goexit, Do nested in the hold
// (same key, TryDo of another key), and contexts kept past their hold used
// after the call returned, while the Lock is used again for other keys.
// Checked: no two holds of a key overlap (an in-process counter across both
// Lockers, and pg_locks from a third pool), every observer Event and every
// traced operation carries the key of the Do it belongs to, a kept context
// never passes for a later hold, nothing is left in pg_locks after Close,
// and no goroutine is left behind.
func TestReview30HotKeysTwoLockers(t *testing.T) {
	before := goleak.IgnoreCurrent()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	exp := &r30expect{m: map[uint64][]pglock.Key{}}
	var events, lostEvents atomic.Int64
	observer := func(ev pglock.Event) {
		events.Add(1)
		if ev.Kind == pglock.EventLost {
			lostEvents.Add(1) // from the watch's goroutine: not attributed
			return
		}
		if want, ok := exp.want(); !ok || want != ev.Key {
			t.Errorf("event %s of key %s on a goroutine whose Do is on %s (known %v)", ev.Kind, ev.Key, want, ok)
		}
	}
	tr := &r30tracer{t: t, exp: exp}
	poolA, poolB := pgtest.Pool(t, 4), pgtest.Pool(t, 4)
	lkA, err := pglock.NewLocker(poolA, pglock.WithObserver(observer), pglock.WithTracer(tr))
	if err != nil {
		t.Fatal(err)
	}
	lkB, err := pglock.NewLocker(poolB, pglock.WithObserver(observer), pglock.WithWaitConns(2))
	if err != nil {
		t.Fatal(err)
	}
	lockers := []*pglock.Locker{lkA, lkB}
	names := []string{pgtest.UniqueKey(t), pgtest.UniqueKey(t), pgtest.UniqueKey(t)}
	keys := make([]pglock.Key, len(names))
	for i, n := range names {
		keys[i] = locktest.Key(t, lkA, n)
		if kb := locktest.Key(t, lkB, n); kb != keys[i] {
			t.Fatalf("the Lockers map %s apart: %s, %s", n, keys[i], kb)
		}
	}
	var inside [3]atomic.Int32
	var ran [3]atomic.Int64
	stopPoll := make(chan struct{})
	polls, pollDone := r30holdsOver(t, watch, keys, stopPoll)

	// enter and leave the function of a Do of key i: at most one at a time.
	enter := func(i int) {
		if n := inside[i].Add(1); n != 1 {
			t.Errorf("%d holds of %s at once", n, names[i])
		}
		ran[i].Add(1)
	}
	leave := func(i int) { inside[i].Add(-1) }

	type kept struct {
		ctx context.Context
		i   int
	}
	keptCh := make(chan kept, 1024)
	var keptWG sync.WaitGroup
	var keptOwnFailed, keptOtherRan atomic.Int64
	// Kept contexts are used from other goroutines after their call
	// returned, while their Lock serves other calls.
	for range 2 {
		keptWG.Go(func() {
			for kc := range keptCh {
				lk := lkA
				own, other := kc.i, (kc.i+1)%3
				exp.push(keys[own])
				err := lk.Do(kc.ctx, names[own], func(context.Context) error {
					t.Errorf("Do of %s ran in a context whose hold of it has ended", names[own])
					return nil
				})
				exp.pop()
				if !errors.Is(err, pglock.ErrNotAcquired) {
					t.Errorf("Do of the kept context's own key %s = %v, want ErrNotAcquired", names[own], err)
				} else {
					keptOwnFailed.Add(1)
				}
				exp.push(keys[other])
				ok, err := lk.TryDo(kc.ctx, names[other], func(ctx context.Context) error {
					enter(other)
					defer leave(other)
					return nil
				})
				exp.pop()
				if err != nil {
					t.Errorf("TryDo of another key %s in a kept context: %v", names[other], err)
				}
				if ok {
					keptOtherRan.Add(1)
				}
			}
		})
	}

	deadline := time.Now().Add(4 * time.Second)
	var kinds [8]atomic.Int64
	var wg sync.WaitGroup
	for g := range 6 {
		lk := lockers[g%2]
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 30))
			for time.Now().Before(deadline) {
				i := r.IntN(3)
				kind := r.IntN(8)
				if lk != lkA && kind == 7 {
					kind = 0 // kept contexts are used on lkA
				}
				kinds[kind].Add(1)
				fn := func(ctx context.Context) error {
					enter(i)
					defer leave(i)
					if r.IntN(4) == 0 {
						time.Sleep(time.Duration(r.IntN(500)) * time.Microsecond)
					}
					return nil
				}
				switch kind {
				case 0: // plain Do
					exp.push(keys[i])
					if err := lk.Do(bg, names[i], fn); err != nil {
						t.Errorf("Do: %v", err)
					}
					exp.pop()
				case 1: // TryDo, busy or not
					exp.push(keys[i])
					if _, err := lk.TryDo(bg, names[i], fn); err != nil {
						t.Errorf("TryDo: %v", err)
					}
					exp.pop()
				case 2: // Do cancelled in its wait (or not)
					ctx, cancel := context.WithTimeout(bg, time.Duration(r.IntN(3000))*time.Microsecond)
					exp.push(keys[i])
					err := lk.Do(ctx, names[i], fn)
					exp.pop()
					cancel()
					if err != nil && !errors.Is(err, pglock.ErrNotAcquired) {
						t.Errorf("Do cancelled: %v", err)
					}
				case 3: // fn panics
					func() {
						exp.push(keys[i])
						defer exp.pop()
						defer func() {
							if v := recover(); v != "r30" {
								t.Errorf("recovered %v, want the function's panic", v)
							}
						}()
						_ = lk.Do(bg, names[i], func(ctx context.Context) error {
							enter(i)
							defer leave(i)
							panic("r30")
						})
					}()
				case 4: // fn calls runtime.Goexit
					done := make(chan struct{})
					go func() {
						defer close(done)
						exp.push(keys[i])
						defer exp.pop()
						_ = lk.Do(bg, names[i], func(ctx context.Context) error {
							enter(i)
							defer leave(i)
							runtime.Goexit()
							return nil
						})
						t.Error("Do returned after its function called runtime.Goexit")
					}()
					<-done
				case 5: // nested Do of the same key: in the hold
					exp.push(keys[i])
					err := lk.Do(bg, names[i], func(ctx context.Context) error {
						enter(i)
						defer leave(i)
						nested := false
						if err := lk.Do(ctx, names[i], func(context.Context) error { nested = true; return nil }); err != nil || !nested {
							t.Errorf("nested Do of the same key: ran %v, %v", nested, err)
						}
						return nil
					})
					exp.pop()
					if err != nil {
						t.Errorf("Do (nesting): %v", err)
					}
				case 6: // nested TryDo of another key
					j := (i + 1 + r.IntN(2)) % 3
					exp.push(keys[i])
					err := lk.Do(bg, names[i], func(ctx context.Context) error {
						enter(i)
						defer leave(i)
						exp.push(keys[j])
						_, err := lk.TryDo(ctx, names[j], func(ctx context.Context) error {
							enter(j)
							defer leave(j)
							return nil
						})
						exp.pop()
						if err != nil {
							t.Errorf("nested TryDo of another key: %v", err)
						}
						return nil
					})
					exp.pop()
					if err != nil {
						t.Errorf("Do (nesting another key): %v", err)
					}
				case 7: // a context kept past its hold, used later
					var c context.Context
					exp.push(keys[i])
					err := lk.Do(bg, names[i], func(ctx context.Context) error {
						enter(i)
						defer leave(i)
						c = context.WithoutCancel(ctx)
						return nil
					})
					exp.pop()
					if err != nil {
						t.Errorf("Do (keeping its context): %v", err)
					} else {
						select {
						case keptCh <- kept{c, i}:
						default:
						}
					}
				}
			}
		})
	}
	wg.Wait()
	close(keptCh)
	keptWG.Wait()
	close(stopPoll)
	<-pollDone
	t.Logf("kinds %v; ran %d/%d/%d; events %d (lost %d); traces %d; kept: own refused %d, other ran %d; pg_locks polls %d",
		[]int64{kinds[0].Load(), kinds[1].Load(), kinds[2].Load(), kinds[3].Load(), kinds[4].Load(), kinds[5].Load(), kinds[6].Load(), kinds[7].Load()},
		ran[0].Load(), ran[1].Load(), ran[2].Load(), events.Load(), lostEvents.Load(), tr.n.Load(), keptOwnFailed.Load(), keptOtherRan.Load(), polls.Load())
	if lostEvents.Load() != 0 {
		t.Errorf("%d EventLost with no connection lost", lostEvents.Load())
	}
	for _, lk := range lockers {
		if err := lk.Close(); err != nil {
			t.Fatal(err)
		}
	}
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}
	poolA.Close()
	poolB.Close()
	watch.Close()
	if err := goleak.Find(before); err != nil {
		t.Errorf("goroutines left behind: %v", err)
	}
}

// r30lockPIDs returns the backends that hold any of keys (granted).
func r30lockPIDs(watch *pgxpool.Pool, keys []pglock.Key) []int32 {
	seen := map[int32]bool{}
	var pids []int32
	for _, k := range keys {
		hs, err := pgtest.Holders(context.Background(), watch, k)
		if err != nil {
			continue
		}
		for _, h := range hs {
			if h.Granted && !seen[h.PID] {
				seen[h.PID] = true
				pids = append(pids, h.PID)
			}
		}
	}
	return pids
}

// TestReview30LostHoldsRecycled kills the backends of the lock connection
// (pg_terminate_backend) again and again while goroutines, each on a key of
// its own, run Do on one lock connection: the loss of a connection reports
// the loss to every hold on it (keytable.LoseConn calls their watches after
// letting go of its mutex), some of which have ended, and whose Lock may be
// serving another key by then. Per key, every EventLost must belong to a Do
// of that key that returned ErrLockLost, and every such Do must have had
// its EventLost: a late report taken for a later hold (of any key) would
// show as an EventLost of a key whose Do succeeded, or a Do failing with
// ErrLockLost on a live lock.
func TestReview30LostHoldsRecycled(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	const G = 5
	var lostEv [G]atomic.Int64
	keyIndex := map[pglock.Key]int{}
	var keyIndexMu sync.RWMutex
	var stray atomic.Int64
	observer := func(ev pglock.Event) {
		if ev.Kind != pglock.EventLost {
			return
		}
		keyIndexMu.RLock()
		i, ok := keyIndex[ev.Key]
		keyIndexMu.RUnlock()
		if !ok {
			stray.Add(1)
			t.Errorf("EventLost of key %s, which no Do of this test takes", ev.Key)
			return
		}
		lostEv[i].Add(1)
	}
	pool := pgtest.Pool(t, 4)
	lk := muxLocker(t, pool, pglock.WithObserver(observer), pglock.WithLockConns(1), pglock.WithLostCheckInterval(100*time.Millisecond))
	names := make([]string, G)
	keys := make([]pglock.Key, G)
	for i := range G {
		names[i] = pgtest.UniqueKey(t)
		keys[i] = locktest.Key(t, lk, names[i])
		keyIndex[keys[i]] = i
	}
	var lostDo, okDo, otherErr [G]atomic.Int64
	var fnSawLost [G]atomic.Int64
	deadline := time.Now().Add(5 * time.Second)
	var wg sync.WaitGroup
	for g := range G {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 31))
			for time.Now().Before(deadline) {
				err := lk.Do(bg, names[g], func(ctx context.Context) error {
					switch r.IntN(3) {
					case 0:
					case 1:
						time.Sleep(time.Duration(r.IntN(2000)) * time.Microsecond)
					case 2:
						select {
						case <-ctx.Done():
						case <-time.After(time.Duration(r.IntN(20)) * time.Millisecond):
						}
					}
					if ctx.Err() != nil && errors.Is(context.Cause(ctx), pglock.ErrLockLost) {
						fnSawLost[g].Add(1)
					}
					return nil
				})
				switch {
				case err == nil:
					okDo[g].Add(1)
				case errors.Is(err, pglock.ErrLockLost) && !errors.Is(err, pglock.ErrNotAcquired):
					lostDo[g].Add(1)
				default:
					otherErr[g].Add(1)
				}
			}
		})
	}
	kills := 0
	for time.Now().Before(deadline.Add(-500 * time.Millisecond)) {
		time.Sleep(time.Duration(50+rand.IntN(100)) * time.Millisecond)
		for _, pid := range r30lockPIDs(watch, keys) {
			var ok bool
			if err := watch.QueryRow(bg, "SELECT pg_terminate_backend($1)", pid).Scan(&ok); err == nil && ok {
				kills++
			}
		}
	}
	wg.Wait()
	for i := range G {
		t.Logf("key %d: ok %d, lost %d (EventLost %d, fn saw lost %d), other errors %d", i, okDo[i].Load(), lostDo[i].Load(), lostEv[i].Load(), fnSawLost[i].Load(), otherErr[i].Load())
		if lostEv[i].Load() != lostDo[i].Load() {
			t.Errorf("key %d: %d EventLost, but %d Do returned ErrLockLost", i, lostEv[i].Load(), lostDo[i].Load())
		}
	}
	t.Logf("%d backends terminated", kills)
	if kills == 0 {
		t.Error("no lock connection was terminated: the test tested nothing")
	}
	if err := lk.Close(); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}
}

// TestReview30DeadlockAmidRecycling runs the classic cycle (two goroutines,
// each holding one key and asking for the other's, through Do's context)
// while other goroutines churn Locker.Do on other keys, so that the Locks of
// both holds come from (and go back to) the Locker's pool: one wait of each
// cycle ends with ErrDeadlock, the other goes on and succeeds, and nothing
// hangs or races.
func TestReview30DeadlockAmidRecycling(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pgtest.Pool(t, 4))
	stop := make(chan struct{})
	var churn sync.WaitGroup
	churnKeys := []string{pgtest.UniqueKey(t), pgtest.UniqueKey(t)}
	var churned atomic.Int64
	for g := range 2 {
		churn.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				var kept context.Context
				_ = lk.Do(bg, churnKeys[g], func(ctx context.Context) error {
					kept = context.WithoutCancel(ctx)
					return nil
				})
				// A Do of another key in a context kept past its hold runs
				// as a plain Do (its hold is not live).
				if kept != nil {
					if err := lk.Do(kept, churnKeys[1-g], func(context.Context) error { return nil }); err != nil {
						t.Errorf("Do in a kept context: %v", err)
					}
				}
				churned.Add(1)
			}
		})
	}
	for round := range 3 {
		a, b := pgtest.UniqueKey(t), pgtest.UniqueKey(t)
		var bothIn sync.WaitGroup
		bothIn.Add(2)
		errs := make([]error, 2)
		innerErrs := make([]error, 2)
		var wg sync.WaitGroup
		for g, pair := range [][2]string{{a, b}, {b, a}} {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(bg, 15*time.Second)
				defer cancel()
				errs[g] = lk.Do(ctx, pair[0], func(ctx context.Context) error {
					bothIn.Done()
					bothIn.Wait()
					innerErrs[g] = lk.Do(ctx, pair[1], func(context.Context) error { return nil })
					return nil
				})
			})
		}
		wg.Wait()
		deadlocks := 0
		for g := range 2 {
			if errors.Is(innerErrs[g], pglock.ErrDeadlock) {
				deadlocks++
			} else if innerErrs[g] != nil {
				t.Errorf("round %d: inner Do %d: %v", round, g, innerErrs[g])
			}
			if errs[g] != nil {
				t.Errorf("round %d: outer Do %d: %v", round, g, errs[g])
			}
		}
		if deadlocks != 1 {
			t.Errorf("round %d: %d inner Do ended with ErrDeadlock, want 1 (%v)", round, deadlocks, innerErrs)
		}
		for _, n := range []string{a, b} {
			pgtest.WaitFree(t, watch, locktest.Key(t, lk, n))
		}
	}
	close(stop)
	churn.Wait()
	t.Logf("%d churned calls", churned.Load())
}

// TestReview30CloseWhileRunning closes a Locker while goroutines run Do and
// TryDo on it (in their wait, their function, their release), on keys a
// second Locker contends for: every call returns, nothing of the closed
// Locker is left in pg_locks, the other Locker goes on, and no goroutine is
// left behind.
func TestReview30CloseWhileRunning(t *testing.T) {
	before := goleak.IgnoreCurrent()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	for round := range 6 {
		poolA, poolB := pgtest.Pool(t, 4), pgtest.Pool(t, 4)
		lkA, err := pglock.NewLocker(poolA)
		if err != nil {
			t.Fatal(err)
		}
		lkB, err := pglock.NewLocker(poolB)
		if err != nil {
			t.Fatal(err)
		}
		names := []string{pgtest.UniqueKey(t), pgtest.UniqueKey(t)}
		var inside [2]atomic.Int32
		var wg sync.WaitGroup
		stopB := make(chan struct{})
		var closedErrs, calls atomic.Int64
		var later sync.WaitGroup
		// Close ends lkA's holds (its connections are closed) while their
		// functions may still run: lkB may take the keys meanwhile, so
		// overlaps are checked until Close only.
		var closing atomic.Bool
		for g := range 6 {
			lk := lkA
			if g >= 4 {
				lk = lkB
			}
			wg.Go(func() {
				r := rand.New(rand.NewPCG(uint64(g), uint64(round)))
				for {
					if lk == lkB {
						select {
						case <-stopB:
							return
						default:
						}
					}
					i := r.IntN(2)
					fn := func(ctx context.Context) error {
						if n := inside[i].Add(1); n != 1 && !closing.Load() {
							t.Errorf("round %d: %d holds of key %d at once", round, n, i)
						}
						time.Sleep(time.Duration(r.IntN(1000)) * time.Microsecond)
						inside[i].Add(-1)
						return nil
					}
					var err error
					var kept context.Context
					keep := func(ctx context.Context) error {
						kept = context.WithoutCancel(ctx)
						return fn(ctx)
					}
					if r.IntN(2) == 0 {
						err = lk.Do(bg, names[i], keep)
					} else {
						_, err = lk.TryDo(bg, names[i], keep)
					}
					calls.Add(1)
					if kept != nil {
						// Used after its call, maybe after (or during)
						// the Locker's Close, while its Lock serves others.
						later.Go(func() {
							j := 1 - i
							err := lk.Do(kept, names[j], func(context.Context) error {
								if n := inside[j].Add(1); n != 1 && !closing.Load() {
									t.Errorf("round %d: %d holds of key %d at once (kept context)", round, n, j)
								}
								inside[j].Add(-1)
								return nil
							})
							if err != nil && !errors.Is(err, pglock.ErrLockerClosed) && !errors.Is(err, pglock.ErrLockLost) {
								t.Errorf("round %d: Do in a kept context: %v", round, err)
							}
							err = lk.Do(kept, names[i], func(context.Context) error {
								t.Errorf("round %d: Do of a kept context's own key ran", round)
								return nil
							})
							if !errors.Is(err, pglock.ErrNotAcquired) {
								t.Errorf("round %d: Do of a kept context's own key: %v", round, err)
							}
						})
					}
					if errors.Is(err, pglock.ErrLockerClosed) {
						closedErrs.Add(1)
						return // lkA closed
					}
					if err != nil && !errors.Is(err, pglock.ErrLockLost) {
						t.Errorf("round %d: %v", round, err)
					}
				}
			})
		}
		time.Sleep(time.Duration(50+rand.IntN(200)) * time.Millisecond)
		closing.Store(true)
		if err := lkA.Close(); err != nil {
			t.Fatal(err)
		}
		// lkB goes on a little after lkA's Close, then stops.
		time.Sleep(50 * time.Millisecond)
		close(stopB)
		wg.Wait()
		later.Wait()
		if closedErrs.Load() != 4 {
			t.Errorf("round %d: %d goroutines of the closed Locker saw ErrLockerClosed, want 4", round, closedErrs.Load())
		}
		if err := lkB.Close(); err != nil {
			t.Fatal(err)
		}
		for _, n := range names {
			k, _ := lkA.Key(n)
			pgtest.WaitFree(t, watch, k)
		}
		poolA.Close()
		poolB.Close()
	}
	watch.Close()
	if err := goleak.Find(before); err != nil {
		t.Errorf("goroutines left behind: %v", err)
	}
}

// TestReview30SharedAndExclusive: a Shared-mode Locker (whose holds join
// one another's, probe for exclusive waiters, and leave with a check on the
// connection) and an Exclusive-mode Locker of another pool, on the same two
// keys, with TryDo and Do, kept contexts, and the lock connections of the
// Shared Locker terminated now and then. Checked: an exclusive hold never
// overlaps any other hold of its key; events carry their Do's key; per key,
// the Shared Locker's EventLost count matches its Do calls that returned
// ErrLockLost.
func TestReview30SharedAndExclusive(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	exp := &r30expect{m: map[uint64][]pglock.Key{}}
	names := []string{pgtest.UniqueKey(t), pgtest.UniqueKey(t)}
	keyIndex := map[pglock.Key]int{}
	var mu sync.RWMutex
	var lostEv [2]atomic.Int64
	observer := func(ev pglock.Event) {
		if ev.Kind == pglock.EventLost {
			mu.RLock()
			i, ok := keyIndex[ev.Key]
			mu.RUnlock()
			if !ok {
				t.Errorf("EventLost of key %s, which no Do of this test takes", ev.Key)
				return
			}
			lostEv[i].Add(1)
			return
		}
		if want, ok := exp.want(); !ok || want != ev.Key {
			t.Errorf("event %s of key %s on a goroutine whose Do is on %s (known %v)", ev.Kind, ev.Key, want, ok)
		}
	}
	poolS, poolX := pgtest.Pool(t, 4), pgtest.Pool(t, 4)
	lkS := muxLocker(t, poolS, pglock.WithMode(pglock.Shared), pglock.WithObserver(observer), pglock.WithLockConns(2))
	lkX := muxLocker(t, poolX, pglock.WithObserver(observer))
	keys := make([]pglock.Key, 2)
	mu.Lock()
	for i, n := range names {
		keys[i] = locktest.Key(t, lkS, n)
		keyIndex[keys[i]] = i
	}
	mu.Unlock()
	var shared, excl [2]atomic.Int32
	var lostDo [2]atomic.Int64
	var ranS, ranX atomic.Int64
	// Phase 0 (no connection is terminated): holds are checked for
	// overlaps. Phase 1 terminates connections: a lost shared hold lets
	// an exclusive one in before its function has heard of the loss, so
	// overlaps are not checked then.
	var killing atomic.Bool
	overlap := func(format string, args ...any) {
		if !killing.Load() {
			t.Errorf(format, args...)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	var wg sync.WaitGroup
	for g := range 6 {
		isShared := g < 4
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 32))
			for time.Now().Before(deadline) {
				i := r.IntN(2)
				fn := func(ctx context.Context) error {
					if isShared {
						shared[i].Add(1)
						if excl[i].Load() != 0 {
							overlap("a shared hold of key %d overlaps an exclusive one", i)
						}
						ranS.Add(1)
					} else {
						if n := excl[i].Add(1); n != 1 || shared[i].Load() != 0 {
							overlap("an exclusive hold of key %d overlaps: %d exclusive, %d shared", i, n, shared[i].Load())
						}
						ranX.Add(1)
					}
					time.Sleep(time.Duration(r.IntN(1500)) * time.Microsecond)
					if isShared {
						shared[i].Add(-1)
					} else {
						excl[i].Add(-1)
					}
					return nil
				}
				lk := lkX
				if isShared {
					lk = lkS
				}
				exp.push(keys[i])
				var err error
				if r.IntN(2) == 0 {
					_, err = lk.TryDo(bg, names[i], fn)
				} else {
					ctx, cancel := context.WithTimeout(bg, time.Duration(1+r.IntN(50))*time.Millisecond)
					err = lk.Do(ctx, names[i], fn)
					cancel()
				}
				exp.pop()
				switch {
				case err == nil:
				case errors.Is(err, pglock.ErrNotAcquired):
				case errors.Is(err, pglock.ErrLockLost) && isShared:
					lostDo[i].Add(1)
				default:
					t.Errorf("shared %v: %v", isShared, err)
				}
			}
		})
	}
	kills := 0
	time.Sleep(2 * time.Second)
	killing.Store(true)
	for time.Now().Before(deadline.Add(-400 * time.Millisecond)) {
		time.Sleep(time.Duration(100+rand.IntN(150)) * time.Millisecond)
		for _, k := range keys {
			hs, err := pgtest.Holders(bg, watch, k)
			if err != nil {
				continue
			}
			for _, h := range hs {
				if h.Granted && h.Mode == "ShareLock" {
					var ok bool
					if watch.QueryRow(bg, "SELECT pg_terminate_backend($1)", h.PID).Scan(&ok) == nil && ok {
						kills++
					}
					break
				}
			}
		}
	}
	wg.Wait()
	t.Logf("shared ran %d, exclusive ran %d, %d backends terminated; lost: key 0 %d (EventLost %d), key 1 %d (EventLost %d)",
		ranS.Load(), ranX.Load(), kills, lostDo[0].Load(), lostEv[0].Load(), lostDo[1].Load(), lostEv[1].Load())
	for i := range 2 {
		if lostDo[i].Load() != lostEv[i].Load() {
			t.Errorf("key %d: %d EventLost, %d Do returned ErrLockLost", i, lostEv[i].Load(), lostDo[i].Load())
		}
	}
	_ = lkS.Close()
	_ = lkX.Close()
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}
}

// TestReview30PerHoldDriver: a Locker on a *sql.DB of a driver other than
// pgx's (one connection per hold, behind the multiplexer's perHoldBackend,
// whose Locks ee65198 recycles too): Do and TryDo of three keys with a
// contending pgx Locker, kept contexts, and (in a second phase) the
// sessions of the *sql.DB's holds terminated; checked as above: no overlap
// (in the first phase), events of the right key, EventLost per key as many
// as the Do calls that returned ErrLockLost.
func TestReview30PerHoldDriver(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	registerHidden.Do(func() { sql.Register("review2-other", hiddenDriver{stdlib.GetDefaultDriver()}) })
	u, err := url.Parse(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	app := "r30-perhold-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	q := u.Query()
	q.Set("application_name", app)
	u.RawQuery = q.Encode()
	db, err := sql.Open("review2-other", u.String())
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(6)
	t.Cleanup(func() { db.Close() })
	exp := &r30expect{m: map[uint64][]pglock.Key{}}
	var lostEv [3]atomic.Int64
	keyIndex := map[pglock.Key]int{}
	var mu sync.RWMutex
	var strayLost atomic.Int64
	observer := func(lostOf *[3]atomic.Int64) func(pglock.Event) {
		return func(ev pglock.Event) {
			if ev.Kind == pglock.EventLost {
				mu.RLock()
				i, ok := keyIndex[ev.Key]
				mu.RUnlock()
				if !ok {
					t.Errorf("EventLost of key %s, which no Do of this test takes", ev.Key)
					return
				}
				if lostOf == nil {
					strayLost.Add(1)
					return
				}
				lostOf[i].Add(1)
				return
			}
			if want, ok := exp.want(); !ok || want != ev.Key {
				t.Errorf("event %s of key %s on a goroutine whose Do is on %s (known %v)", ev.Kind, ev.Key, want, ok)
			}
		}
	}
	lkD := perHoldLocker(t, db, pglock.WithObserver(observer(&lostEv)), pglock.WithLostCheckInterval(100*time.Millisecond))
	lkP := muxLocker(t, pgtest.Pool(t, 4), pglock.WithObserver(observer(nil)))
	names := []string{pgtest.UniqueKey(t), pgtest.UniqueKey(t), pgtest.UniqueKey(t)}
	keys := make([]pglock.Key, 3)
	mu.Lock()
	for i, n := range names {
		keys[i] = locktest.Key(t, lkD, n)
		keyIndex[keys[i]] = i
	}
	mu.Unlock()
	var killing atomic.Bool
	var inside [3]atomic.Int32
	enter := func(i int, what string) {
		if n := inside[i].Add(1); n != 1 && !killing.Load() {
			t.Errorf("%d holds of key %d at once (%s)", n, i, what)
		}
	}
	var lostDo [3]atomic.Int64
	var ran, keptUsed, unlockFailed atomic.Int64
	keptCh := make(chan context.Context, 256)
	deadline := time.Now().Add(5 * time.Second)
	var wg sync.WaitGroup
	for g := range 6 {
		lk := lkD
		if g >= 4 {
			lk = lkP
		}
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 33))
			for time.Now().Before(deadline) {
				i := r.IntN(3)
				var kept context.Context
				fn := func(ctx context.Context) error {
					enter(i, "Do")
					ran.Add(1)
					select {
					case <-ctx.Done():
					case <-time.After(time.Duration(r.IntN(3000)) * time.Microsecond):
					}
					if lk == lkD && r.IntN(5) == 0 {
						kept = context.WithoutCancel(ctx) // sent once Do returned
					}
					inside[i].Add(-1)
					return nil
				}
				var err error
				exp.push(keys[i])
				if r.IntN(2) == 0 {
					_, err = lk.TryDo(bg, names[i], fn)
				} else {
					ctx, cancel := context.WithTimeout(bg, time.Duration(1+r.IntN(30))*time.Millisecond)
					err = lk.Do(ctx, names[i], fn)
					cancel()
				}
				exp.pop()
				if kept != nil {
					select {
					case keptCh <- kept:
					default:
					}
				}
				switch {
				case err == nil, errors.Is(err, pglock.ErrNotAcquired):
				case errors.Is(err, pglock.ErrLockLost) && lk == lkD:
					lostDo[i].Add(1)
				case killing.Load() && lk == lkD:
					// A session ended under a hold too short for its
					// watch to see (and a driver whose connections do not
					// tell they are closed): the unlock fails ("unlock
					// failed"), without EventLost. Not ee65198's doing
					// (sqlBackend.release).
					unlockFailed.Add(1)
				default:
					t.Errorf("%v", err)
				}
				// A kept context of an earlier Do (of any key): its own
				// key fails, another runs as a plain call.
				select {
				case kc := <-keptCh:
					keptUsed.Add(1)
					h, hErr := -1, error(nil)
					for j := range 3 {
						exp.push(keys[j])
						_, err := lkD.TryDo(kc, names[j], func(context.Context) error {
							enter(j, "kept context")
							inside[j].Add(-1)
							return nil
						})
						exp.pop()
						if errors.Is(err, pglock.ErrUnavailable) && killing.Load() {
							// An idle connection of the *sql.DB whose
							// session was terminated (not ee65198's doing).
							unlockFailed.Add(1)
						} else if errors.Is(err, pglock.ErrNotAcquired) {
							if h >= 0 {
								t.Errorf("a kept context refused keys %d and %d (killing %v): %v; %v", h, j, killing.Load(), hErr, err)
							}
							h, hErr = j, err
						} else if errors.Is(err, pglock.ErrLockLost) {
							lostDo[j].Add(1)
						} else if err != nil && killing.Load() {
							unlockFailed.Add(1)
						} else if err != nil {
							t.Errorf("TryDo in a kept context: %v", err)
						}
					}
					if h < 0 {
						t.Error("a kept context let a Do of its own key run")
					}
				default:
				}
			}
		})
	}
	kills := 0
	time.Sleep(2 * time.Second)
	killing.Store(true)
	for time.Now().Before(deadline.Add(-400 * time.Millisecond)) {
		time.Sleep(time.Duration(100+rand.IntN(150)) * time.Millisecond)
		rows, err := watch.Query(bg, `SELECT DISTINCT a.pid FROM pg_catalog.pg_stat_activity a JOIN pg_catalog.pg_locks l ON l.pid = a.pid
			WHERE a.application_name = $1 AND l.locktype = 'advisory' AND l.granted`, app)
		if err != nil {
			t.Fatal(err)
		}
		pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
		if err != nil {
			t.Fatal(err)
		}
		if len(pids) > 0 {
			var ok bool
			if watch.QueryRow(bg, "SELECT pg_terminate_backend($1)", pids[rand.IntN(len(pids))]).Scan(&ok) == nil && ok {
				kills++
			}
		}
	}
	wg.Wait()
	t.Logf("ran %d, kept contexts used %d, %d backends terminated, %d releases failed unseen; lost %d/%d/%d, EventLost %d/%d/%d (the pgx Locker's %d)", ran.Load(), keptUsed.Load(), kills, unlockFailed.Load(),
		lostDo[0].Load(), lostDo[1].Load(), lostDo[2].Load(), lostEv[0].Load(), lostEv[1].Load(), lostEv[2].Load(), strayLost.Load())
	for i := range 3 {
		if lostDo[i].Load() != lostEv[i].Load() {
			t.Errorf("key %d: %d EventLost, %d Do returned ErrLockLost", i, lostEv[i].Load(), lostDo[i].Load())
		}
	}
	if strayLost.Load() != 0 {
		t.Errorf("%d EventLost on the pgx Locker, whose sessions were not terminated", strayLost.Load())
	}
	_ = lkD.Close()
	_ = lkP.Close()
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}
}

// TestReview30TokensOnRecycledLocks: two Lockers made WithToken race on two
// hot keys with Do and TryDo, nested TryDo of the other key, and Do
// cancelled in its wait: a recycled Lock must never carry the token of an
// earlier hold (of its key or another) into a later one. Each function
// reads its token (TokenFromContext) while it holds its key alone, and a
// key's tokens must strictly increase from one hold to the next, across
// both Lockers.
func TestReview30TokensOnRecycledLocks(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	if _, err := pglock.Migrate(bg, watch); err != nil {
		t.Fatal(err)
	}
	lkA := muxLocker(t, pgtest.Pool(t, 4), pglock.WithToken())
	lkB := muxLocker(t, pgtest.Pool(t, 4), pglock.WithToken())
	names := []string{pgtest.UniqueKey(t), pgtest.UniqueKey(t)}
	var mu [2]sync.Mutex
	var last [2]int64
	var holds [2]atomic.Int64
	check := func(ctx context.Context, i int, what string) {
		tok, ok := pglock.TokenFromContext(ctx)
		if !ok || tok == 0 {
			t.Errorf("%s of key %d: no token (%d, %v)", what, i, tok, ok)
			return
		}
		if !mu[i].TryLock() {
			t.Errorf("%s of key %d: two holds at once", what, i)
			return
		}
		if tok <= last[i] {
			t.Errorf("%s of key %d: token %d after %d", what, i, tok, last[i])
		}
		last[i] = tok
		holds[i].Add(1)
		time.Sleep(time.Duration(rand.IntN(300)) * time.Microsecond)
		mu[i].Unlock()
	}
	deadline := time.Now().Add(3 * time.Second)
	var wg sync.WaitGroup
	for g := range 6 {
		lk := []*pglock.Locker{lkA, lkB}[g%2]
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 34))
			for time.Now().Before(deadline) {
				i := r.IntN(2)
				var err error
				switch r.IntN(4) {
				case 0:
					err = lk.Do(bg, names[i], func(ctx context.Context) error { check(ctx, i, "Do"); return nil })
				case 1:
					_, err = lk.TryDo(bg, names[i], func(ctx context.Context) error { check(ctx, i, "TryDo"); return nil })
				case 2:
					ctx, cancel := context.WithTimeout(bg, time.Duration(r.IntN(5000))*time.Microsecond)
					err = lk.Do(ctx, names[i], func(ctx context.Context) error { check(ctx, i, "Do with a deadline"); return nil })
					cancel()
					if errors.Is(err, pglock.ErrNotAcquired) {
						err = nil
					}
				case 3:
					err = lk.Do(bg, names[i], func(ctx context.Context) error {
						check(ctx, i, "Do (outer)")
						_, err := lk.TryDo(ctx, names[1-i], func(ctx context.Context) error { check(ctx, 1-i, "nested TryDo"); return nil })
						return err
					})
				}
				if err != nil {
					t.Errorf("%v", err)
				}
			}
		})
	}
	wg.Wait()
	t.Logf("holds %d/%d, last tokens %d/%d", holds[0].Load(), holds[1].Load(), last[0], last[1])
}

// TestReview30BadKeyOnRecycledPath: a key Locker.Do and TryDo refuse
// (unsupported type, nil) fails the same on a fresh Locker (a Lock made
// with NewLock) and on one whose sync.Pool holds Locks (lockFor's init of a
// recycled Lock), the Lock taken for it is not left half made, and the
// next call of a good key works and reports its own key.
func TestReview30BadKeyOnRecycledPath(t *testing.T) {
	bg := context.Background()
	var mu sync.Mutex
	var seen []pglock.Key
	lk := muxLocker(t, pgtest.Pool(t, 2), pglock.WithObserver(func(ev pglock.Event) {
		mu.Lock()
		seen = append(seen, ev.Key)
		mu.Unlock()
	}))
	bad := []any{struct{ x int }{1}, nil, 1.5}
	fresh := make([]string, len(bad))
	for i, k := range bad {
		err := lk.Do(bg, k, func(context.Context) error { t.Error("ran with a bad key"); return nil })
		if err == nil {
			t.Fatalf("Do with key %#v: no error", k)
		}
		fresh[i] = err.Error()
	}
	good := pgtest.UniqueKey(t)
	want := locktest.Key(t, lk, good)
	for range 50 {
		if err := lk.Do(bg, good, func(context.Context) error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	for round := range 20 {
		for i, k := range bad {
			err := lk.Do(bg, k, func(context.Context) error { t.Error("ran with a bad key"); return nil })
			if err == nil || err.Error() != fresh[i] {
				t.Fatalf("round %d: Do with key %#v on the recycled path: %v, want %q", round, k, err, fresh[i])
			}
			ok, err := lk.TryDo(bg, k, func(context.Context) error { t.Error("ran with a bad key"); return nil })
			if ok || err == nil || err.Error() != fresh[i] {
				t.Fatalf("round %d: TryDo with key %#v on the recycled path: %v %v, want %q", round, k, ok, err, fresh[i])
			}
		}
		mu.Lock()
		seen = seen[:0]
		mu.Unlock()
		if err := lk.Do(bg, good, func(ctx context.Context) error { return nil }); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		for _, k := range seen {
			if k != want {
				t.Errorf("round %d: an event of key %s, want %s", round, k, want)
			}
		}
		mu.Unlock()
	}
}

// TestReview30KeySetsAndRecycledDo: Locker.Do of a key of a set inside
// DoAll's function runs in the set's hold (the recycled Lock of that Do
// finds the set's hold in the context), Do of a key outside the set in it
// is an ordinary call, and a DoAll inside a Do's function over keys that
// include the Do's key runs that key in the Do's hold; all of this while
// other goroutines churn the Locker's Do on the same keys and a second
// Locker contends for them: no two holds of a key at once.
func TestReview30KeySetsAndRecycledDo(t *testing.T) {
	bg := context.Background()
	lkA := muxLocker(t, pgtest.Pool(t, 4))
	lkB := muxLocker(t, pgtest.Pool(t, 4))
	names := []string{pgtest.UniqueKey(t), pgtest.UniqueKey(t), pgtest.UniqueKey(t)}
	var inside [3]atomic.Int32
	enter := func(i int, what string) {
		if n := inside[i].Add(1); n != 1 {
			t.Errorf("%d holds of key %d at once (%s)", n, i, what)
		}
	}
	leave := func(i int) { inside[i].Add(-1) }
	deadline := time.Now().Add(3 * time.Second)
	var wg sync.WaitGroup
	for g := range 6 {
		lk := []*pglock.Locker{lkA, lkB}[g%2]
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 35))
			for time.Now().Before(deadline) {
				i, j := r.IntN(3), 0
				j = (i + 1 + r.IntN(2)) % 3
				k := 3 - i - j // the key outside the set {i, j}
				var err error
				switch r.IntN(3) {
				case 0: // a set, and Do of its keys and of another inside it
					err = lk.DoAll(bg, []any{names[i], names[j]}, func(ctx context.Context) error {
						enter(i, "set")
						enter(j, "set")
						defer leave(i)
						defer leave(j)
						ran := false
						if err := lk.Do(ctx, names[i], func(context.Context) error { ran = true; return nil }); err != nil || !ran {
							t.Errorf("Do of a key of the set inside DoAll: ran %v, %v", ran, err)
						}
						_, err := lk.TryDo(ctx, names[k], func(context.Context) error {
							enter(k, "TryDo in a set")
							leave(k)
							return nil
						})
						return err
					})
				case 1: // a Do, and a set with its key inside it
					err = lk.Do(bg, names[i], func(ctx context.Context) error {
						enter(i, "Do")
						defer leave(i)
						_, err := lk.TryDoAll(ctx, []any{names[i], names[j]}, func(ctx context.Context) error {
							enter(j, "set in a Do")
							leave(j)
							return nil
						})
						return err
					})
				case 2: // churn
					_, err = lk.TryDo(bg, names[i], func(context.Context) error {
						enter(i, "TryDo")
						leave(i)
						return nil
					})
				}
				if err != nil {
					t.Errorf("%v", err)
				}
			}
		})
	}
	wg.Wait()
}
