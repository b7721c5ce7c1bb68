package pglock

import (
	"context"
	"errors"
	"log/slog"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/pglockkit/kit/pglock/internal/connwatch"
)

// The Locks of Locker.Do and TryDo are used again for later calls (see
// Locker.putLock). reset must bring back to zero every field of a Lock's
// last hold, so that nothing of it leaks into the next call, of any key: a
// field added to Lock must be added to one of the lists below, or this test
// fails.
func TestLockResetClearsTheHold(t *testing.T) {
	// kept: what the Locker's Locks share, or what init sets again for the
	// next key; refused: what reset leaves alone, refusing the Lock, while
	// it is set (a hold under way); the hold number grows across calls.
	kept := map[string]bool{"cfg": true, "src": true, "st": true, "domain": true, "mu": true, "lostMu": true, "hold": true, "lockerClosed": true}
	refused := map[string]bool{"b": true, "tx": true, "inDo": true, "stopWatch": true, "watch": true, "peer": true, "guard": true}

	l := &Lock{}
	// Every other field set, by hand: a field this misses fails below.
	l.key, l.name = Key{v: 7}, "seven"
	l.log = slog.Default()
	l.lostCh, l.lostErr, l.lostDone, l.lostGiven = make(chan struct{}), errors.New("lost"), true, true
	l.onLost = func(error) {}
	l.since = time.Now()
	l.held.Store(true)
	l.tokenV.Store(42)
	h := errors.New("handled")
	l.handled.Store(&h)
	l.muxb = muxBackend{l: l}
	l.hold = 9

	v := reflect.ValueOf(l).Elem()
	for i := range v.NumField() {
		f := v.Type().Field(i)
		if kept[f.Name] || refused[f.Name] || f.Name == "hold" {
			continue
		}
		if v.Field(i).IsZero() {
			t.Fatalf("field %s is not set by this test: set it, or list it as kept or refused", f.Name)
		}
	}
	if !l.reset() {
		t.Fatal("reset refused a Lock that holds nothing")
	}
	for i := range v.NumField() {
		f := v.Type().Field(i)
		if kept[f.Name] || refused[f.Name] {
			continue
		}
		if !v.Field(i).IsZero() {
			t.Errorf("after reset, field %s is %v, want its zero value", f.Name, v.Field(i))
		}
	}
	if l.hold != 9 {
		t.Errorf("after reset, the hold number is %d, want 9 (kept: a context of an earlier hold never passes for a later one)", l.hold)
	}
	for name := range refused {
		t.Run("refused while "+name+" is set", func(t *testing.T) {
			l := &Lock{key: Key{v: 7}}
			switch name {
			case "b":
				l.b = &l.muxb
			case "tx":
				l.tx = &givenTx{}
			case "inDo":
				l.inDo.Store(true)
			case "stopWatch":
				l.stopWatch = func() {}
			case "watch":
				l.watch = new(connwatch.Rewatch)
			case "peer":
				l.peer = new(connwatch.PeerWatch)
			case "guard":
				l.guard = &callerGuard{}
			}
			if l.reset() {
				t.Fatalf("reset took a Lock whose %s is set", name)
			}
			if l.key != (Key{v: 7}) {
				t.Fatal("a refused reset changed the Lock")
			}
		})
	}
}

// Locker.Do and TryDo use their Lock again for the next call, of another
// key, once it holds nothing; a context kept past its call carries that call's
// hold only: on the recycled Lock it neither passes for the later hold nor
// keeps a Do of another key from running, and a Do of its own key inside it
// fails as the hold has ended (ErrNotAcquired), as without recycling.
func TestLockerDoLockUsedAgain(t *testing.T) {
	bg := context.Background()
	lk := internalLocker(t)

	first, err := lk.lockFor("recycle-a")
	if err != nil {
		t.Fatal(err)
	}
	var kept context.Context
	if err := first.Do(bg, func(ctx context.Context) error {
		kept = context.WithoutCancel(ctx) // kept past the hold
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	again := r30Recycled(t, lk, first, "recycle-b")
	want, err := lk.Key("recycle-b")
	if err != nil {
		t.Fatal(err)
	}
	if again.Key() != want {
		t.Fatalf("the recycled Lock's key is %s, want recycle-b's %s", again.Key(), want)
	}
	ran := false
	err = again.Do(kept, func(ctx context.Context) error {
		ran = true
		h, _ := kept.Value(holdsKey{}).(*holdCtx)
		if h == nil || h.l != again || h.live() {
			t.Errorf("the kept context's hold: %+v, want the recycled Lock's earlier hold, not live", h)
		}
		if again.enclosing(kept) != nil {
			t.Error("the kept context's hold, of another key, passes for an enclosing hold of the recycled Lock")
		}
		return nil
	})
	if err != nil || !ran {
		t.Fatalf("Do of another key in a context kept from the recycled Lock's earlier hold: ran %v, %v", ran, err)
	}
	// The kept context's own key: its hold has ended.
	err = lk.Do(kept, "recycle-a", func(context.Context) error { return nil })
	if !errors.Is(err, ErrNotAcquired) {
		t.Fatalf("Do of the kept context's own key = %v, want ErrNotAcquired (its hold ended)", err)
	}
}

// Goroutines that call Locker.Do on a few keys, each function leaving a
// goroutine behind that uses its context after the call returned (a Do of
// its key and of another, which read the context's hold) while the Lock is
// recycled for other calls: no data race (the race detector), no overlap of
// two holds of one key, and every kept context's Do of its own key fails as
// its hold has ended (or, run while it was live, that it ended meanwhile).
func TestLockerDoRecycledUnderKeptContexts(t *testing.T) {
	bg := context.Background()
	lk := internalLocker(t)
	keys := []string{"recycle-race-0", "recycle-race-1", "recycle-race-2"}
	var inside [3]int32
	var mu sync.Mutex
	var later sync.WaitGroup
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 60 {
				k := (g + i) % len(keys)
				err := lk.Do(bg, keys[k], func(ctx context.Context) error {
					mu.Lock()
					inside[k]++
					n := inside[k]
					mu.Unlock()
					if n != 1 {
						t.Errorf("two holds of %s at once", keys[k])
					}
					kept := context.WithoutCancel(ctx)
					later.Go(func() {
						err := lk.Do(kept, keys[k], func(context.Context) error { return nil })
						// Run in the hold if it was still live (nil, or
						// ErrLockLost when it ended meanwhile), else refused.
						if err != nil && !errors.Is(err, ErrNotAcquired) && !errors.Is(err, ErrLockLost) {
							t.Errorf("Do of the kept context's own key: %v", err)
						}
						other := keys[(k+1)%len(keys)]
						if err := lk.Do(kept, other, func(context.Context) error { return nil }); err != nil {
							t.Errorf("Do of another key in a kept context: %v", err)
						}
					})
					mu.Lock()
					inside[k]--
					mu.Unlock()
					return nil
				})
				if err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	later.Wait()
}
