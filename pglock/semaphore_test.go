package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// semaphoreLocks counts the granted locks of a Semaphore's slots and queue
// (keys name#0..name#n-1, name#queue), read from pg_locks through watch.
func semaphoreLocks(t *testing.T, watch *pgxpool.Pool, lk *pglock.Locker, name string, n int) (slots, queue int) {
	t.Helper()
	for i := range n {
		k, _ := lk.Key(fmt.Sprintf("%s#%d", name, i))
		slots += len(pgtest.Granted(t, watch, k))
	}
	q, _ := lk.Key(name + "#queue")
	return slots, len(pgtest.Granted(t, watch, q))
}

// Issue 24, semaphores: 3 Lockers on pools of their own ("processes") x 20
// goroutines loop Do on a Semaphore of 3 slots for 3 s: the holders counted
// inside the function (and the slot locks sampled in pg_locks) never exceed
// 3, and reach 3; every goroutine gets turns (no starvation); then a storm
// of cancelled acquires leaves nothing held.
func TestSemaphoreNeverMoreThanN(t *testing.T) {
	const n, replicas, goroutines = 3, 3, 20
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	sems := make([]*pglock.Semaphore, replicas)
	var lk0 *pglock.Locker
	for i := range sems {
		lk := muxLocker(t, pgtest.Pool(t, 4))
		if i == 0 {
			lk0 = lk
		}
		s, err := lk.Semaphore(name, n)
		if err != nil {
			t.Fatal(err)
		}
		sems[i] = s
	}
	var holders, maxHolders atomic.Int32
	turns := make([]atomic.Int32, replicas*goroutines)
	var waitsMu sync.Mutex
	var waits []time.Duration
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	until := time.Now().Add(3 * time.Second)
	var wg sync.WaitGroup
	stopSampling := make(chan struct{})
	var sampledMax int
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stopSampling:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if s, _ := semaphoreLocks(t, watch, lk0, name, n); s > sampledMax {
				sampledMax = s
			}
		}
	}()
	for g := range replicas * goroutines {
		s := sems[g%replicas]
		wg.Go(func() {
			for time.Now().Before(until) {
				t0 := time.Now()
				err := s.Do(ctx, func(context.Context) error {
					w := time.Since(t0)
					h := holders.Add(1)
					for {
						m := maxHolders.Load()
						if h <= m || maxHolders.CompareAndSwap(m, h) {
							break
						}
					}
					if h > n {
						t.Errorf("INVARIANT at-most-n: %d holders of a semaphore of %d", h, n)
					}
					time.Sleep(time.Duration(1+rand.IntN(3)) * time.Millisecond)
					holders.Add(-1)
					turns[g].Add(1)
					waitsMu.Lock()
					waits = append(waits, w)
					waitsMu.Unlock()
					return nil
				})
				if err != nil {
					t.Errorf("Do: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(stopSampling)
	<-sampled
	if m := maxHolders.Load(); m != n {
		t.Errorf("at most %d holders at once, want exactly %d", m, n)
	}
	if sampledMax > n {
		t.Errorf("pg_locks showed %d slot locks held at once, want at most %d", sampledMax, n)
	}
	minTurns := int32(1 << 30)
	for i := range turns {
		minTurns = min(minTurns, turns[i].Load())
	}
	if minTurns == 0 {
		t.Error("a goroutine never got a slot in 3 s (starved)")
	}
	slices.Sort(waits)
	t.Logf("%d grants; wait p50 %v, p99 %v; fewest turns of a goroutine %d; pg_locks max %d",
		len(waits), waits[len(waits)/2], waits[len(waits)*99/100], minTurns, sampledMax)

	// A storm of cancelled acquires: nothing left.
	storm, stormCancel := context.WithCancel(context.Background())
	var held sync.WaitGroup
	held.Add(n)
	release := make(chan struct{})
	for i := range n {
		go func() {
			_ = sems[i%replicas].Do(storm, func(context.Context) error {
				held.Done()
				<-release
				return nil
			})
		}()
	}
	held.Wait() // every slot taken
	var sw sync.WaitGroup
	for g := range 60 {
		sw.Go(func() {
			c, cc := context.WithTimeout(storm, time.Duration(rand.IntN(50))*time.Millisecond)
			defer cc()
			err := sems[g%replicas].Do(c, func(context.Context) error { return nil })
			if err != nil && !errors.Is(err, pglock.ErrNotAcquired) {
				t.Errorf("a cancelled Do: %v, want ErrNotAcquired", err)
			}
		})
	}
	sw.Wait()
	close(release)
	stormCancel()
	pgtestWaitNoLocks(t, watch, lk0, name, n)
}

// pgtestWaitNoLocks waits until no slot or queue lock of the semaphore is
// held.
func pgtestWaitNoLocks(t *testing.T, watch *pgxpool.Pool, lk *pglock.Locker, name string, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, q := semaphoreLocks(t, watch, lk, name, n)
		if s == 0 && q == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d slot and %d queue locks still held", s, q)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A try on a full Semaphore returns false at once; a Do of it inside its
// own Do runs in the enclosing slot; bad input is refused.
func TestSemaphoreTryAndNesting(t *testing.T) {
	bg := context.Background()
	lk := muxLocker(t, pgtest.Pool(t, 4))
	name := pgtest.UniqueKey(t)
	s, err := lk.Semaphore(name, 1)
	if err != nil {
		t.Fatal(err)
	}
	err = s.Do(bg, func(ctx context.Context) error {
		ok, err := s.TryDo(bg, func(context.Context) error { return nil }) // another context
		if ok || err != nil {
			t.Errorf("TryDo on a full semaphore = %v, %v; want false, nil", ok, err)
		}
		nctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		ran := false
		if err := s.Do(nctx, func(context.Context) error { ran = true; return nil }); err != nil || !ran {
			t.Errorf("Do nested in its own Do = %v (ran %v); want nil, ran", err, ran)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		n    int
	}{{"", 1}, {name, 0}, {name, 1025}} {
		if _, err := lk.Semaphore(c.name, c.n); err == nil {
			t.Errorf("Semaphore(%q, %d) = nil error", c.name, c.n)
		}
	}
	// A Transaction-scope Locker's semaphore holds Session-scope slots; a
	// Locker on a transaction cannot make one.
	txl := muxLocker(t, pgtest.Pool(t, 2), pglock.WithScope(pglock.Transaction))
	ts, err := txl.Semaphore(name+"-tx", 2)
	if err != nil {
		t.Fatalf("Semaphore of a Transaction-scope Locker = %v", err)
	}
	if err := ts.Do(bg, func(context.Context) error { return nil }); err != nil {
		t.Errorf("Do of a Transaction-scope Locker's semaphore = %v", err)
	}
	tx, err := pgtest.Pool(t, 2).Begin(bg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(bg) }()
	onTx, err := pglock.NewLocker(tx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := onTx.Semaphore(name, 2); !errors.Is(err, pglock.ErrInvalidOption) {
		t.Errorf("Semaphore of a Locker on a transaction = %v, want ErrInvalidOption", err)
	}
	if err := s.Do(bg, nil); !errors.Is(err, pglock.ErrNilFunc) {
		t.Errorf("Do(nil) = %v, want ErrNilFunc", err)
	}
}

// The Locker's WithWait bounds a Semaphore acquire's whole wait (in the
// queue, then as its head), not each step: seen failing before (the second
// waiter, which became the head when the first gave up, waited the bound
// again as the head: 1.5 s for a bound of 1 s).
func TestSemaphoreWaitBound(t *testing.T) {
	bg := context.Background()
	const bound = time.Second
	lk := muxLocker(t, pgtest.Pool(t, 4), pglock.WithWait(bound))
	s, err := lk.Semaphore(pgtest.UniqueKey(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	held := make(chan struct{})
	go func() { _ = s.Do(bg, func(context.Context) error { close(held); <-release; return nil }) }()
	<-held
	defer close(release)
	// Two waiters, the second half a bound after the first (the head).
	var wg sync.WaitGroup
	took := make([]time.Duration, 2)
	errs := make([]error, 2)
	for i := range 2 {
		if i == 1 {
			time.Sleep(bound / 2)
		}
		wg.Go(func() {
			start := time.Now()
			errs[i] = s.Do(bg, func(context.Context) error { return nil })
			took[i] = time.Since(start)
		})
	}
	wg.Wait()
	for i := range 2 {
		if !errors.Is(errs[i], pglock.ErrNotAcquired) {
			t.Errorf("waiter %d: %v, want ErrNotAcquired", i, errs[i])
		}
		if took[i] > bound*13/10 {
			t.Errorf("waiter %d waited %v, want about %v (the Locker's WithWait)", i, took[i], bound)
		}
	}
}

// Locker.Close racing a Semaphore's head: every slot is held elsewhere, so
// the head of the Semaphore's queue waits for every slot at once; one slot
// frees and Close lands at a random moment around its grant, while the head
// may be running its function and its other slot waits' cancels and its
// queue unlock go on in the background. In every round every Do returns
// (nil, or an error saying the Locker closed, the slot was not acquired or
// was lost), Close returns, and once the other holder lets go no slot or
// queue key of the Semaphore is held or waited for (TestMain's goleak
// check covers the goroutines).
func TestSemaphoreCloseRacesHead(t *testing.T) {
	const n, rounds, goroutines = 2, 12, 3
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	otherPool := pgtest.Pool(t, n)
	var ran, closedErrs atomic.Int32
	defer func() { t.Logf("%d Dos ran their function, %d ended by the Close", ran.Load(), closedErrs.Load()) }()
	for r := range rounds {
		name := fmt.Sprintf("%s-%d", pgtest.UniqueKey(t), r)
		lk, err := pglock.NewLocker(pgtest.Pool(t, 4))
		if err != nil {
			t.Fatal(err)
		}
		s, err := lk.Semaphore(name, n)
		if err != nil {
			t.Fatal(err)
		}
		slotKeys := make([]pglock.Key, n)
		others := make([]*pglock.Lock, n)
		for i := range n {
			slotKeys[i], _ = lk.Key(fmt.Sprintf("%s#%d", name, i))
			if others[i], err = pglock.NewLock(otherPool, slotKeys[i]); err != nil {
				t.Fatal(err)
			}
			if err := others[i].Acquire(bg); err != nil {
				t.Fatal(err)
			}
		}
		ctx, cancel := context.WithTimeout(bg, 30*time.Second)
		results := make(chan error, goroutines)
		for range goroutines {
			go func() {
				results <- s.Do(ctx, func(fctx context.Context) error {
					ran.Add(1)
					select {
					case <-fctx.Done():
					case <-time.After(time.Duration(rand.IntN(3)) * time.Millisecond):
					}
					return nil
				})
			}()
		}
		// The head waits for every slot: each slot key has a waiter.
		deadline := time.Now().Add(15 * time.Second)
		for waiting := 0; waiting < n; {
			waiting = 0
			for _, k := range slotKeys {
				hs, err := pgtest.Holders(bg, watch, k)
				if err != nil {
					t.Fatal(err)
				}
				for _, h := range hs {
					if !h.Granted {
						waiting++
						break
					}
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("round %d: the head waits for %d of %d slots after 15 s", r, waiting, n)
			}
			time.Sleep(5 * time.Millisecond)
		}
		if err := others[r%n].Release(bg); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
		closed := make(chan error, 1)
		go func() { closed <- lk.Close() }()
		select {
		case err := <-closed:
			if err != nil {
				t.Errorf("round %d: Close = %v", r, err)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("round %d: Close did not return in 20 s", r)
		}
		for range goroutines {
			select {
			case err := <-results:
				if err != nil {
					closedErrs.Add(1)
				}
				if err != nil && !errors.Is(err, pglock.ErrLockerClosed) && !errors.Is(err, pglock.ErrNotAcquired) && !errors.Is(err, pglock.ErrLockLost) {
					t.Errorf("round %d: Do = %v", r, err)
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("round %d: a Do did not return 20 s after Close", r)
			}
		}
		cancel()
		for i, o := range others {
			if i != r%n {
				if err := o.Release(bg); err != nil {
					t.Fatal(err)
				}
			}
		}
		queue, _ := lk.Key(name + "#queue")
		for _, k := range append(slotKeys, queue) {
			pgtest.WaitFree(t, watch, k)
		}
	}
}
