package pglock_test

// Adversarial review of the lock connections after issue 19 (ca1d175).
// Every test names the invariant it checks in its failure message.

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Invariant (issue 19 item 11, lockConn.open): a connect is the Locker's; a
// caller whose deadline ends before the connection is open gets
// ErrUnavailable at its deadline, not when someone else's connect is done.
// On a cold Locker, a first caller with a live context starts the connect
// (slow: 1.5 s); a second caller with a 100 ms deadline must return about
// then.
func TestColdLockerHonoursEachCallersDeadline(t *testing.T) {
	t.Parallel()
	const connectTime, shortWait = 1500 * time.Millisecond, 100 * time.Millisecond
	bg := context.Background()
	pool := proofSlowPool(t, func() time.Duration { return connectTime }, func() error { return nil })
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool, pglock.WithLockConns(1))

	first, _ := lk.NewLock(pgtest.UniqueKey(t))
	firstDone := make(chan error, 1)
	go func() { firstDone <- first.Acquire(bg) }()
	time.Sleep(50 * time.Millisecond) // the first is connecting

	second, _ := lk.NewLock(pgtest.UniqueKey(t))
	ctx, cancel := context.WithTimeout(bg, shortWait)
	defer cancel()
	start := time.Now()
	err := second.Acquire(ctx)
	took := time.Since(start)
	if err := <-firstDone; err != nil {
		t.Fatalf("first Acquire (live ctx): %v", err)
	}
	if took > shortWait+400*time.Millisecond {
		t.Errorf("INVARIANT connect-not-bound-by-caller: Acquire with a %v deadline on a cold Locker returned after %v (err %v): it waited for another caller's connect",
			shortWait, took.Round(time.Millisecond), err)
	}
	if err != nil && !errors.Is(err, pglock.ErrUnavailable) {
		t.Errorf("INVARIANT connect-under-way-is-ErrUnavailable: err = %v", err)
	}
	for _, l := range []*pglock.Lock{first, second} {
		if l.Held() {
			if err := l.Release(bg); err != nil {
				t.Error(err)
			}
		}
		pgtest.WaitFree(t, watch, l.Key())
	}
}

// Invariant (Shared mode, doc.go): shared holders admit other shared
// holders. With WithLockConns(1) (no probe possible), a shared hold older
// than keytable.SharedJoinRecheck starts draining although no writer exists
// anywhere: a second shared TryAcquire reports busy, and a shared Acquire
// waits for the first reader to leave.
func TestSharedHoldersJoinWithoutWriterOnOneLockConn(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool, pglock.WithLockConns(1))
	key := pgtest.UniqueKey(t)
	a, _ := lk.NewLock(key, pglock.WithMode(pglock.Shared))
	if err := a.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	b, _ := lk.NewLock(key, pglock.WithMode(pglock.Shared))
	ok, err := b.TryAcquire(bg)
	if err != nil || !ok {
		t.Errorf("INVARIANT shared-admits-shared: shared TryAcquire while the key is held Shared only (no writer in any session) = %v, %v; want true", ok, err)
	}
	if ok {
		_ = b.Release(bg)
	}
	c, _ := lk.NewLock(key, pglock.WithMode(pglock.Shared))
	ctx, cancel := context.WithTimeout(bg, time.Second)
	err = c.Acquire(ctx)
	cancel()
	if err != nil {
		t.Errorf("INVARIANT shared-admits-shared: shared Acquire (1 s) while the key is held Shared only = %v; want nil", err)
	} else {
		_ = c.Release(bg)
	}
	if err := a.Release(bg); err != nil {
		t.Error(err)
	}
	pgtest.WaitFree(t, watch, a.Key())
}

// Invariant (issue 19 item 10, mux.closedErr): an acquire with a live
// context interrupted by Locker.Close fails with ErrLockerClosed (never
// 57014, context.Canceled or ErrUnavailable alone), wherever it is: queued
// in the process, waiting in the server, polling for a waiting place, or
// waiting for a connect.
func TestCloseDuringFirstConnectFailsWithErrLockerClosed(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	for round := range 6 {
		var slow atomic.Bool
		pool := proofSlowPool(t, func() time.Duration {
			if slow.Load() {
				return 400 * time.Millisecond
			}
			return 0
		}, func() error { return nil })
		watch := pgtest.Pool(t, 2)
		lk, err := pglock.NewLocker(pool, pglock.WithLockConns(2), pglock.WithWaitConns(1))
		if err != nil {
			t.Fatal(err)
		}
		names, keys := muxKeys(t, lk, 4)
		var held []*pglock.Lock
		for _, k := range keys[:3] {
			held = append(held, locktest.HoldElsewhere(t, k))
		}
		if round%2 == 1 {
			slow.Store(true) // the Locker is cold: its connects are under way at Close
		}
		var wg sync.WaitGroup
		errs := make(chan error, 32)
		for i := range 12 {
			wg.Go(func() {
				l, _ := lk.NewLock(names[i%len(names)], pglock.WithMode(pglock.Mode(i%2)))
				if err := l.Acquire(bg); err != nil {
					errs <- err
					return
				}
				errs <- nil
				time.Sleep(50 * time.Millisecond)
				_ = l.Release(bg)
			})
		}
		time.Sleep(time.Duration(100+rand.IntN(300)) * time.Millisecond)
		_ = lk.Close()
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil && !errors.Is(err, pglock.ErrLockerClosed) {
				t.Errorf("round %d: INVARIANT close-is-ErrLockerClosed: Acquire(Background) interrupted by Close = %v (errors.Is context.Canceled: %v, though the caller's context never ended)",
					round, err, errors.Is(err, context.Canceled))
			}
		}
		for _, l := range held {
			_ = l.Release(bg)
		}
		for _, k := range keys {
			pgtest.WaitFree(t, watch, k)
		}
		if s := lk.Stats(); s.HeldKeys != 0 || s.Queued != 0 || s.ServerLocks != 0 {
			t.Errorf("round %d: INVARIANT stats-zero: Stats after Close and every release = %+v", round, s)
		}
	}
}
