package pglock

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// r30Recycled makes first, a Lock of lk.lockFor whose call has returned,
// the Lock of a later call of lk for key, as putLock and lockFor do (reset,
// then init), without going through the sync.Pool: taking a given Lock back
// from the pool is left to chance (it drops what it is given at random
// under the race detector), and putting it in again after a miss can leave
// it there twice, for two calls at once (a test's mistake, not the
// library's: putLock runs once per lockFor).
func r30Recycled(t *testing.T, lk *Locker, first *Lock, key string) *Lock {
	t.Helper()
	if lk.mux == nil || first.src != source(lk.mux) || first.cfg != &lk.cfg || !first.reset() {
		t.Fatal("putLock would not keep the Lock")
	}
	if err := first.init(lk.mux, key, &lk.cfg); err != nil {
		t.Fatal(err)
	}
	return first
}

// The stress tests of review30_test.go exercise recycled Locks: Locker.Do
// calls, one after the other, run on far fewer Locks than calls (seen
// through their function's context).
func TestReview30DoRecyclesLocks(t *testing.T) {
	lk := internalLocker(t)
	seen := map[*Lock]int{}
	const n = 200
	for i := range n {
		key := []string{"r30-recycles-a", "r30-recycles-b"}[i%2]
		if err := lk.Do(context.Background(), key, func(ctx context.Context) error {
			h, _ := ctx.Value(holdsKey{}).(*holdCtx)
			if h == nil {
				t.Fatal("no hold in Do's context")
			}
			seen[h.l]++
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("%d calls on %d Locks", n, len(seen))
	if len(seen) > n/2 {
		t.Errorf("%d calls on %d Locks: Locker.Do does not use its Locks again", n, len(seen))
	}
}

// A watch's report of a loss that comes late (keytable.LoseConn calls the
// holders' watches after letting go of its mutex, so a report can come
// after its hold ended), after the Lock was recycled for another key and
// holds that key: it must not mark the new hold lost, cancel its
// function's context, or emit EventLost (of the new key).
func TestReview30LateLossReportOnRecycledLock(t *testing.T) {
	var lost atomic.Int64
	lk := internalLocker(t, WithObserver(func(ev Event) {
		if ev.Kind == EventLost {
			lost.Add(1)
		}
	}))
	bg := context.Background()
	first, err := lk.lockFor("r30-late-a")
	if err != nil {
		t.Fatal(err)
	}
	var oldHold uint64
	if err := first.Do(bg, func(ctx context.Context) error {
		oldHold = first.holdGen()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	l := r30Recycled(t, lk, first, "r30-late-b")
	var wg sync.WaitGroup
	err = l.Do(bg, func(ctx context.Context) error {
		// Reports of the earlier hold, from other goroutines, as the
		// watch would send them.
		for range 8 {
			wg.Go(func() { l.markLostOf(oldHold, errors.New("r30: late report of the earlier hold")) })
		}
		wg.Wait()
		if ctx.Err() != nil {
			t.Errorf("a late report of the earlier hold (key a) ended the function of the recycled Lock's hold of key b: %v", context.Cause(ctx))
		}
		if !l.Held() {
			t.Error("a late report of the earlier hold marked the recycled Lock's hold lost")
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Do on the recycled Lock: %v", err)
	}
	if lost.Load() != 0 {
		t.Errorf("%d EventLost from late reports of an earlier hold", lost.Load())
	}
}

// A context kept past a hold of key a, whose Lock is then recycled for a
// hold of the same key a by another goroutine (so the kept hold's Lock is
// held, for a, at that moment, under a later hold number), must not pass
// for a live hold of a in the deadlock detector: G2 holds b and waits for
// a (held by the recycled Lock's new hold), G3 waits for b in the kept
// context. If the kept hold counted, G3 "holding a" waiting for b and G2
// holding b waiting for a would be a cycle, and one wait would end with
// ErrDeadlock; there is none: once the new hold of a ends, both go on.
func TestReview30KeptHoldOnRecycledLockNoFalseCycle(t *testing.T) {
	lk := internalLocker(t)
	bg := context.Background()
	first, err := lk.lockFor("r30-cycle-a")
	if err != nil {
		t.Fatal(err)
	}
	var kept context.Context
	if err := first.Do(bg, func(ctx context.Context) error {
		kept = context.WithoutCancel(ctx)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	la := r30Recycled(t, lk, first, "r30-cycle-a")
	held, release := make(chan struct{}), make(chan struct{})
	var wg sync.WaitGroup
	var errA, errG2, errG2in, errG3 error
	wg.Go(func() {
		errA = la.Do(bg, func(context.Context) error {
			close(held)
			<-release
			return nil
		})
		lk.putLock(la)
	})
	<-held
	g2in := make(chan struct{})
	wg.Go(func() {
		errG2 = lk.Do(bg, "r30-cycle-b", func(ctx context.Context) error {
			close(g2in)
			errG2in = lk.Do(ctx, "r30-cycle-a", func(context.Context) error { return nil })
			return nil
		})
	})
	<-g2in
	wg.Go(func() {
		errG3 = lk.Do(kept, "r30-cycle-b", func(context.Context) error { return nil })
	})
	// Long enough for several checks for cycles (every deadlock_timeout,
	// 1 s by default, after the first second).
	checks := DeadlockChecks()
	deadline := time.Now().Add(8 * time.Second)
	for DeadlockChecks() < checks+3 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%d checks for cycles made meanwhile", DeadlockChecks()-checks)
	close(release)
	wg.Wait()
	for what, err := range map[string]error{"hold of a (recycled Lock)": errA, "G2's hold of b": errG2, "G2's wait for a": errG2in, "G3's Do of b in the kept context": errG3} {
		if err != nil {
			t.Errorf("%s: %v", what, err)
		}
	}
}
