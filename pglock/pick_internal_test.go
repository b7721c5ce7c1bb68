package pglock

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Issue 21, distinct keys at low concurrency: two keys that hash to the same
// lock connection do not queue behind each other while another lock
// connection is free, even one not opened yet, and once moved, a key's next
// try goes straight to where it went (its hint), so that two goroutines on
// such keys run side by side rather than taking turns on one connection.
// Seen failing before: the try queued at its home behind the running
// statement (the other slot, never opened, did not count as free), and a
// moved key went home again at its next try.
func TestPickMovesOffABusyHome(t *testing.T) {
	bg := context.Background()
	lk := internalLocker(t, WithLockConns(2))
	m := lk.mux
	// Two keys of one home and one hint bucket each, the first lock of
	// the Locker on a third key of that home (its first lock connection
	// opens there: the self-test's).
	keyOn := func(slot int, not ...Key) Key {
		for {
			k := Key{v: rand.Int64()}
			if m.slotOf(k) != slot {
				continue
			}
			taken := false
			for _, o := range not {
				taken = taken || hintOf(o) == hintOf(k)
			}
			if !taken {
				return k
			}
		}
	}
	warm := keyOn(0)
	a := keyOn(0, warm)
	b := keyOn(0, warm, a)
	if err := lk.Do(bg, warm, func(context.Context) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if c := m.lc.Peek(1); c != nil && c.HasConn() {
		t.Fatal("the second lock connection is open before the test needs it")
	}

	// Keep the home busy: a use of the connection that ends when told.
	home := m.lc.Slot(0)
	release, running := make(chan struct{}), make(chan struct{})
	busyDone := make(chan struct{})
	go func() {
		defer close(busyDone)
		home.Do(&connOp{Fn: func(*pgx.Conn) { close(running); <-release }})
	}()
	<-running
	ctx, cancel := context.WithTimeout(bg, 10*time.Second)
	defer cancel()
	la, err := lk.NewLock(a)
	if err != nil {
		t.Fatal(err)
	}
	ok, err := la.TryAcquire(ctx)
	if !ok || err != nil {
		close(release)
		t.Fatalf("TryAcquire of a key whose home is busy = %v, %v; want true on the other lock connection", ok, err)
	}
	if got := heldSlot(t, m, a); got != 1 {
		t.Errorf("the key was taken on slot %d, want 1 (its home, 0, was busy)", got)
	}
	close(release)
	<-busyDone
	if err := la.Release(bg); err != nil {
		t.Fatal(err)
	}

	// Home free now: the moved key goes where it went; a key of the same
	// home that never moved goes home.
	for _, c := range []struct {
		k    Key
		want int
	}{{a, 1}, {b, 0}} {
		l, err := lk.NewLock(c.k)
		if err != nil {
			t.Fatal(err)
		}
		if ok, err := l.TryAcquire(ctx); !ok || err != nil {
			t.Fatalf("TryAcquire(%s) = %v, %v", c.k, ok, err)
		}
		if got := heldSlot(t, m, c.k); got != c.want {
			t.Errorf("key %s taken on slot %d, want %d", c.k, got, c.want)
		}
		if err := l.Release(bg); err != nil {
			t.Fatal(err)
		}
	}
}

// heldSlot is the slot of the lock connection that holds k.
func heldSlot(t *testing.T, m *mux, k Key) int {
	t.Helper()
	var c *lockConn
	if e := m.t.Find(k); e != nil {
		c, _ = m.t.HeldOn(e)
	}
	if c == nil {
		t.Fatalf("key %s is not held", k)
	}
	return c.Slot()
}
