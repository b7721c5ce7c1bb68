package pglocktest_test

// Adversarial review of the in-memory double (issue 25). Each TestReview25*
// test names the defect it shows, or what it checks that held up.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/pglock/pglocktest"
)

func r25Replica(t *testing.T, srv *pglocktest.Server) *pglock.Locker {
	t.Helper()
	lk, err := pglocktest.NewLocker(srv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	return lk
}

func r25Lock(t *testing.T, lk *pglock.Locker, key string, opts ...pglock.Option) *pglock.Lock {
	t.Helper()
	l, err := lk.NewLock(key, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// DEFECT: Server.Lose promises that every holder is told (Lost closed, Do's
// context cancelled) "before Lose returns and before any waiter is granted
// the key (the double has no overlap window)". memlock.Server.Lose takes
// the holds out of the table under the Server's mutex, unlocks it, and only
// then tells the watchers one by one (tell): in between the key is free in
// the table, and another replica's TryAcquire (or a waiter woken by any
// other wake of the key) is granted while holders of the lost hold still
// believe they hold it. With 40 shared holders the last ones are told long
// after another replica holds the key exclusively.
func TestReview25LoseOverlapWindow(t *testing.T) {
	srv := pglocktest.NewServer()
	a, b := r25Replica(t, srv), r25Replica(t, srv)
	bg := context.Background()
	overlaps := 0
	for round := range 300 {
		name := fmt.Sprintf("lose-overlap-%d", round)
		key, err := a.Key(name)
		if err != nil {
			t.Fatal(err)
		}
		var holders []*pglock.Lock
		for range 40 {
			l := r25Lock(t, a, name, pglock.WithMode(pglock.Shared))
			if err := l.Acquire(bg); err != nil {
				t.Fatal(err)
			}
			holders = append(holders, l)
		}
		other := r25Lock(t, b, name)
		var wg sync.WaitGroup
		start := make(chan struct{})
		wg.Go(func() { <-start; srv.Lose(key) })
		close(start)
		deadline := time.Now().Add(5 * time.Second)
		for {
			ok, err := other.TryAcquire(bg)
			if err != nil {
				t.Fatal(err)
			}
			if ok {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the key was never free after Lose")
			}
		}
		// b holds the key exclusively: every holder of a must know it lost.
		stillHeld := 0
		for _, l := range holders {
			select {
			case <-l.Lost():
			default:
				stillHeld++
			}
		}
		if stillHeld > 0 {
			overlaps++
			if overlaps == 1 {
				t.Logf("round %d: another replica holds the key exclusively while %d of the lost holders' Lost() is still open", round, stillHeld)
			}
		}
		wg.Wait()
		_ = other.Release(bg)
		for _, l := range holders {
			_ = l.Release(bg)
		}
	}
	if overlaps > 0 {
		t.Errorf("DEFECT: in %d of 300 rounds, a replica was granted the key before Lose had told every holder (the double promises no overlap window)", overlaps)
	}
}

// HELD? BusyNext and FailNext are consumed by exactly one acquire each,
// whether a try, a wait (Acquire), a Do, or a Semaphore's; BusyNext makes a
// wait wait until its bound; Lose while a waiter is queued grants the
// waiter after the holder is told; Close with waiters ends them with
// ErrLockerClosed.
func TestReview25DoubleFaultsOnce(t *testing.T) {
	srv := pglocktest.NewServer()
	a, b := r25Replica(t, srv), r25Replica(t, srv)
	bg := context.Background()
	key, _ := a.Key("faults")

	// BusyNext: a wait waits out its bound, then the key is free.
	srv.BusyNext(key)
	ctx, cancel := context.WithTimeout(bg, 200*time.Millisecond)
	err := a.Do(ctx, "faults", func(context.Context) error { return nil })
	cancel()
	if !errors.Is(err, pglock.ErrNotAcquired) {
		t.Errorf("Do after BusyNext = %v; want a wait that times out", err)
	}
	if ok, err := a.TryDo(bg, "faults", func(context.Context) error { return nil }); !ok || err != nil {
		t.Errorf("TryDo after the BusyNext was used = %v, %v; want it to run", ok, err)
	}
	// FailNext twice: two acquires fail, the third runs.
	boom := errors.New("boom")
	srv.FailNext(key, boom)
	srv.FailNext(key, pglock.ErrUnavailable)
	if err := a.Do(bg, "faults", func(context.Context) error { return nil }); !errors.Is(err, boom) || !errors.Is(err, pglock.ErrNotAcquired) {
		t.Errorf("first Do after FailNext = %v", err)
	}
	if _, err := b.TryDo(bg, "faults", func(context.Context) error { return nil }); !errors.Is(err, pglock.ErrUnavailable) {
		t.Errorf("second acquire after FailNext = %v", err)
	}
	if err := a.Do(bg, "faults", func(context.Context) error { return nil }); err != nil {
		t.Errorf("third Do = %v", err)
	}
	if len(srv.Keys()) != 0 {
		t.Errorf("keys left: %v", srv.Keys())
	}

	// Lose while a waiter is queued: the holder's context is cancelled with
	// ErrLockLost before the waiter's function runs.
	var holderCtx context.Context
	held := make(chan struct{})
	doneA := make(chan error, 1)
	go func() {
		doneA <- a.Do(bg, "faults", func(ctx context.Context) error {
			holderCtx = ctx
			close(held)
			<-ctx.Done()
			return nil
		})
	}()
	<-held
	ranB := make(chan error, 1)
	go func() {
		ranB <- b.Do(bg, "faults", func(context.Context) error {
			if holderCtx.Err() == nil {
				return errors.New("granted while the lost holder's context is live")
			}
			return nil
		})
	}()
	for len(srv.Waiters(key)) != 1 {
		time.Sleep(time.Millisecond)
	}
	if n := srv.Lose(key); n != 1 {
		t.Errorf("Lose = %d", n)
	}
	if err := <-ranB; err != nil {
		t.Error(err)
	}
	if err := <-doneA; !errors.Is(err, pglock.ErrLockLost) {
		t.Errorf("the lost holder's Do = %v; want ErrLockLost", err)
	}
	if c := context.Cause(holderCtx); !errors.Is(c, pglock.ErrLockLost) {
		t.Errorf("the lost holder's cause = %v", c)
	}

	// Close with waiters.
	l := r25Lock(t, b, "faults")
	if err := l.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	c := r25Replica(t, srv)
	var wg sync.WaitGroup
	var closedErrs atomic.Int32
	for range 5 {
		wg.Go(func() {
			err := c.Do(bg, "faults", func(context.Context) error { return nil })
			if errors.Is(err, pglock.ErrLockerClosed) {
				closedErrs.Add(1)
			} else {
				t.Errorf("a wait ended by Close = %v", err)
			}
		})
	}
	for len(srv.Waiters(key)) != 5 {
		time.Sleep(time.Millisecond)
	}
	_ = c.Close()
	wg.Wait()
	if len(srv.Waiters(key)) != 0 {
		t.Errorf("waiters left after Close: %v", srv.Waiters(key))
	}
	_ = l.Release(bg)
	if len(srv.Keys()) != 0 {
		t.Errorf("keys left: %v", srv.Keys())
	}
}

// HELD? Shared/exclusive FIFO on the double, as PostgreSQL: a shared request
// does not pass a queued exclusive one; many goroutines over several
// replicas, race-detector clean, never a writer with anyone else.
func TestReview25DoubleRWStorm(t *testing.T) {
	srv := pglocktest.NewServer()
	var lks []*pglock.Locker
	for range 4 {
		lks = append(lks, r25Replica(t, srv))
	}
	bg := context.Background()
	var readers, writers atomic.Int32
	var bad atomic.Int32
	var wg sync.WaitGroup
	until := time.Now().Add(2 * time.Second)
	for g := range 32 {
		lk := lks[g%len(lks)]
		mode := pglock.Shared
		if g%4 == 0 {
			mode = pglock.Exclusive
		}
		wg.Go(func() {
			for time.Now().Before(until) {
				l, err := lk.NewLock("rw", pglock.WithMode(mode))
				if err != nil {
					t.Error(err)
					return
				}
				ctx, cancel := context.WithTimeout(bg, time.Duration(1+g%7)*time.Millisecond)
				err = l.Do(ctx, func(context.Context) error {
					if mode == pglock.Exclusive {
						if writers.Add(1) != 1 || readers.Load() != 0 {
							bad.Add(1)
						}
						time.Sleep(100 * time.Microsecond)
						writers.Add(-1)
					} else {
						readers.Add(1)
						if writers.Load() != 0 {
							bad.Add(1)
						}
						time.Sleep(100 * time.Microsecond)
						readers.Add(-1)
					}
					return nil
				})
				cancel()
				if err != nil && !errors.Is(err, pglock.ErrNotAcquired) {
					t.Errorf("Do: %v", err)
				}
			}
		})
	}
	wg.Wait()
	if bad.Load() > 0 {
		t.Errorf("exclusion broken %d times", bad.Load())
	}
	if len(srv.Keys()) != 0 {
		t.Errorf("keys left: %v", srv.Keys())
	}
}
