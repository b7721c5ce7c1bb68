package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Issue 24, key sets: two Lockers on pools of their own ("processes") take
// overlapping random sets of 3 of 10 keys, 2,000 times in all from 8
// goroutines, blocking and trying, in Session scope (lock connections) and
// Transaction scope: never two holders of a key at once (a counter per key,
// raised inside the function), no deadlock (every DoAll ends well within
// its bound), nothing left held afterwards.
func TestKeySetsOverlapWithoutDeadlock(t *testing.T) {
	watch := pgtest.Pool(t, 2)
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		t.Run(scope.String(), func(t *testing.T) {
			lockers := []*pglock.Locker{
				muxLocker(t, pgtest.Pool(t, 8), pglock.WithScope(scope)),
				muxLocker(t, pgtest.Pool(t, 8), pglock.WithScope(scope)),
			}
			base := pgtest.UniqueKey(t)
			names := make([]any, 10)
			keys := make([]pglock.Key, 10)
			for i := range names {
				names[i] = fmt.Sprintf("%s-%d", base, i)
				keys[i], _ = lockers[0].Key(names[i])
			}
			var inside [10]atomic.Int32
			var ran, busy atomic.Int32
			const goroutines, each = 8, 250
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			var wg sync.WaitGroup
			for g := range goroutines {
				lk := lockers[g%2]
				wg.Go(func() {
					rng := rand.New(rand.NewPCG(uint64(g), 24))
					for i := range each {
						perm := rng.Perm(10)[:3]
						set := []any{names[perm[0]], names[perm[1]], names[perm[2]]}
						fn := func(context.Context) error {
							for _, p := range perm {
								if n := inside[p].Add(1); n != 1 {
									t.Errorf("INVARIANT one-holder: key %d held by %d sets at once", p, n)
								}
							}
							time.Sleep(50 * time.Microsecond) // a hold long enough to be overlapped
							for _, p := range perm {
								inside[p].Add(-1)
							}
							ran.Add(1)
							return nil
						}
						if i%4 == 3 {
							ok, err := lk.TryDoAll(ctx, set, fn)
							if err != nil {
								t.Errorf("TryDoAll: %v", err)
								return
							}
							if !ok {
								busy.Add(1)
							}
							continue
						}
						if err := lk.DoAll(ctx, set, fn); err != nil {
							t.Errorf("DoAll: %v", err)
							return
						}
					}
				})
			}
			wg.Wait()
			t.Logf("%d sets ran, %d tries found a key busy", ran.Load(), busy.Load())
			if got := ran.Load() + busy.Load(); got != goroutines*each {
				t.Errorf("%d DoAll and TryDoAll ended, want %d", got, goroutines*each)
			}
			for _, k := range keys {
				pgtest.WaitFree(t, watch, k)
			}
		})
	}
}

// A try of a set in which one key is busy holds none of the set afterwards;
// once the key is free, the same try holds them all while its function
// runs, and none after. Bad input is refused.
func TestKeySetTryHoldsNothingWhenBusy(t *testing.T) {
	watch := pgtest.Pool(t, 2)
	bg := context.Background()
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		t.Run(scope.String(), func(t *testing.T) {
			lk := muxLocker(t, pgtest.Pool(t, 4), pglock.WithScope(scope))
			other := muxLocker(t, pgtest.Pool(t, 2))
			base := pgtest.UniqueKey(t)
			set := []any{base + "-c", base + "-a", base + "-b", base + "-a"} // unordered, one twice
			keys := make([]pglock.Key, 3)
			for i, n := range []string{"-a", "-b", "-c"} {
				keys[i], _ = lk.Key(base + n)
			}
			held := func() (n int) {
				for _, k := range keys {
					n += len(pgtest.Granted(t, watch, k))
				}
				return n
			}
			busy, err := other.NewLock(base + "-c")
			if err != nil {
				t.Fatal(err)
			}
			if err := busy.Acquire(bg); err != nil {
				t.Fatal(err)
			}
			ok, err := lk.TryDoAll(bg, set, func(context.Context) error {
				t.Error("the function ran though a key of the set was busy")
				return nil
			})
			if ok || err != nil {
				t.Errorf("TryDoAll with a busy key = %v, %v; want false, nil", ok, err)
			}
			if n := held(); n != 1 {
				t.Errorf("after the failed try, %d holds of the set's keys, want 1 (the other Locker's)", n)
			}
			if err := busy.Release(bg); err != nil {
				t.Fatal(err)
			}
			ok, err = lk.TryDoAll(bg, set, func(ctx context.Context) error {
				if n := held(); n != 3 {
					t.Errorf("inside TryDoAll, %d of the 3 keys held", n)
				}
				// A Do of a key of the set runs in the set's hold.
				return lk.Do(ctx, base+"-b", func(context.Context) error { return nil })
			})
			if !ok || err != nil {
				t.Errorf("TryDoAll on free keys = %v, %v; want true, nil", ok, err)
			}
			for _, k := range keys {
				pgtest.WaitFree(t, watch, k)
			}

			if err := lk.DoAll(bg, nil, func(context.Context) error { return nil }); !errors.Is(err, pglock.ErrInvalidKey) {
				t.Errorf("DoAll of no keys = %v, want ErrInvalidKey", err)
			}
			if err := lk.DoAll(bg, []any{base}, nil); !errors.Is(err, pglock.ErrNilFunc) {
				t.Errorf("DoAll with a nil function = %v, want ErrNilFunc", err)
			}
			if err := lk.DoAll(bg, []any{base, 1.5}, func(context.Context) error { return nil }); !errors.Is(err, pglock.ErrInvalidKey) {
				t.Errorf("DoAll with a float key = %v, want ErrInvalidKey", err)
			}
		})
	}
}

// A key set's tries share statements, and so do its unlocks: on a default
// Locker (2 lock connections) a 3-key DoAll of free keys sends at most one
// statement per lock connection for the tries and one for the unlocks.
// Before, the first try (and the first unlock) of a set went alone, and the
// others followed in a second statement: 6 in all.
func TestKeySetSharesStatements(t *testing.T) {
	bg := context.Background()
	lk, err := pglock.NewLocker(pgtest.Pool(t, 4))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	base := pgtest.UniqueKey(t)
	set := []any{base + "-a", base + "-b", base + "-c"}
	noop := func(context.Context) error { return nil }
	if err := lk.DoAll(bg, set, noop); err != nil { // opens the lock connections
		t.Fatal(err)
	}
	const n = 200
	before := pglock.LockStatements(lk)
	for range n {
		if err := lk.DoAll(bg, set, noop); err != nil {
			t.Fatal(err)
		}
	}
	per := float64(pglock.LockStatements(lk)-before) / n
	t.Logf("statements per 3-key DoAll: %.2f", per)
	if per > 4.2 {
		t.Errorf("%.2f statements per 3-key DoAll on 2 lock connections; want at most 4 (one try and one unlock statement per connection)", per)
	}
}
