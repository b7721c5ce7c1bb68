package pglock

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

// The lock-table guard bounds what passes between two counts however slow a
// count is (CI at 680ba55: nine Lockers whose counts queued behind their busy
// lock connections went on with a stale count and took 2,725 locks against a
// limit of 1,920). While one caller counts, a caller whose users took a
// step since the last count (or anything before the first) waits for that
// count and is judged by it.
func TestGuardWaitsForTheCountUnderWay(t *testing.T) {
	const capacity = 2560
	limit := serverLimitOf(capacity)
	for _, first := range []bool{true, false} {
		name := map[bool]string{true: "before the first count", false: "a step past the last count"}[first]
		t.Run(name, func(t *testing.T) {
			g := &tableGuard{capacity: capacity}
			var held atomic.Int64
			held.Store(capacity / guardFromShare) // where counting starts
			if !first {
				// A count long ago, far below the limit.
				g.count, g.countHeld, g.at = 100, int(held.Load()), time.Now()
			}
			heldNow := func() int { return int(held.Load()) }
			counting, release := make(chan struct{}), make(chan struct{})
			var counts atomic.Int32
			slowCount := func() (int, int, error) {
				if counts.Add(1) == 1 {
					close(counting)
					<-release
				}
				// The server's table is at the limit now: every other Locker
				// took locks meanwhile.
				return limit, capacity, nil
			}
			if !first {
				held.Add(capacity / guardGrantsShare) // a step taken: a count is due
			}
			aErr := make(chan error, 1)
			go func() { aErr <- g.admit(context.Background(), Int64Key(1), heldNow, slowCount) }()
			<-counting
			// B's users took one more lock while A counts.
			held.Add(1)
			bErr := make(chan error, 1)
			go func() { bErr <- g.admit(context.Background(), Int64Key(2), heldNow, slowCount) }()
			select {
			case err := <-bErr:
				t.Fatalf("admit returned %v while the count it must wait for is under way", err)
			case <-time.After(100 * time.Millisecond):
			}
			close(release)
			for _, c := range []chan error{aErr, bErr} {
				if err := <-c; !errors.Is(err, ErrTooManyLocks) {
					t.Errorf("admit after a count at the limit = %v, want ErrTooManyLocks", err)
				}
			}
			if n := counts.Load(); n != 1 {
				t.Errorf("%d counts, want 1: the waiter is judged by the count it waited for", n)
			}
		})
	}
}

// A caller whose context ends while it waits for another's count stops
// waiting.
func TestGuardWaitEndsWithContext(t *testing.T) {
	g := &tableGuard{capacity: 2560}
	held := 2560 / guardFromShare
	heldNow := func() int { return held }
	counting, release := make(chan struct{}), make(chan struct{})
	defer close(release)
	go func() {
		_ = g.admit(context.Background(), Int64Key(1), heldNow, func() (int, int, error) {
			close(counting)
			<-release
			return 0, 2560, nil
		})
	}()
	<-counting
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- g.admit(ctx, Int64Key(2), heldNow, func() (int, int, error) { return 0, 2560, nil })
	}()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("admit with a cancelled context, no count yet = %v, want nil (the lock statement reports the context)", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("admit did not return after its context ended")
	}
}
