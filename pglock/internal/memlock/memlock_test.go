package memlock

import (
	"context"
	"errors"
	"testing"
	"time"
)

func mustHold(t *testing.T, c *Session, k Key, m Mode) *Hold {
	t.Helper()
	h, err := c.Acquire(context.Background(), k, m, false, "")
	if err != nil || h == nil {
		t.Fatalf("try %v: %v, %v; want held", m, h, err)
	}
	return h
}

func busy(t *testing.T, c *Session, k Key, m Mode) {
	t.Helper()
	if h, err := c.Acquire(context.Background(), k, m, false, ""); err != nil || h != nil {
		t.Fatalf("try %v: %v, %v; want busy", m, h, err)
	}
}

// A queue [S, X, S] behind an X holder: the release grants the first S
// only (the X waits for it, the last S for the X), then the X, then the S.
func TestWakeOrder(t *testing.T) {
	t.Parallel()
	s := NewServer()
	a, b := s.NewSession("a"), s.NewSession("b")
	k := Key{V: 1}
	x := mustHold(t, a, k, Exclusive)
	busy(t, b, k, Shared)
	var cancels []func()
	var hs []*Hold
	for _, m := range []Mode{Shared, Exclusive, Shared} {
		h, cancel := b.Enqueue(k, m, "")
		hs, cancels = append(hs, h), append(cancels, cancel)
	}
	if _, w := s.Holders(k); len(w) != 3 {
		t.Fatalf("waiters %v", w)
	}
	busy(t, a, k, Shared) // no barging past the queued X
	if err := x.Release(); err != nil {
		t.Fatal(err)
	}
	states := func() []state { return []state{hs[0].state, hs[1].state, hs[2].state} }
	s.mu.Lock()
	got := states()
	s.mu.Unlock()
	if got[0] != held || got[1] != waiting || got[2] != waiting {
		t.Fatalf("after the X: %v", got)
	}
	cancels[0]()
	s.mu.Lock()
	got = states()
	s.mu.Unlock()
	if got[1] != held || got[2] != waiting {
		t.Fatalf("after the first S: %v", got)
	}
	cancels[1]()
	cancels[2]()
	cancels[2]() // twice: no change
	if len(s.Keys()) != 0 {
		t.Fatalf("keys left: %v", s.Keys())
	}
}

// Lose tells the watcher before the waiter is granted, and Release then
// says lost; Close loses a session's holds and ends its waits.
func TestLoseAndClose(t *testing.T) {
	t.Parallel()
	s := NewServer()
	a, b := s.NewSession("a"), s.NewSession("b")
	k := Key{V: 2, Pair: true}
	h := mustHold(t, a, k, Exclusive)
	told := make(chan error, 1)
	stop := h.Watch(func(err error) { told <- err })
	defer stop()
	got := make(chan *Hold, 1)
	go func() {
		w, err := b.Acquire(context.Background(), k, Exclusive, true, "")
		if err != nil {
			t.Error(err)
		}
		got <- w
	}()
	waitFor(t, func() bool { _, w := s.Holders(k); return len(w) == 1 })
	why := errors.New("injected")
	if n := s.Lose(k, why); n != 1 {
		t.Fatalf("Lose = %d", n)
	}
	select {
	case err := <-told:
		if err != why {
			t.Fatalf("told %v", err)
		}
	default:
		t.Fatal("Lose returned before telling the watcher")
	}
	if err := h.Release(); !errors.Is(err, ErrLost) || !errors.Is(err, why) {
		t.Fatalf("Release after Lose = %v", err)
	}
	w := <-got
	// Close: b's hold is lost, a's wait ends.
	waitErr := make(chan error, 1)
	go func() {
		_, err := a.Acquire(context.Background(), k, Shared, true, "")
		waitErr <- err
	}()
	waitFor(t, func() bool { _, w := s.Holders(k); return len(w) == 1 })
	a.Close()
	if err := <-waitErr; !errors.Is(err, ErrClosed) {
		t.Fatalf("wait on a closed session = %v", err)
	}
	b.Close()
	if err := w.Release(); !errors.Is(err, ErrLost) || !errors.Is(err, ErrClosed) {
		t.Fatalf("Release after Close = %v", err)
	}
	if _, err := b.Acquire(context.Background(), k, Shared, false, ""); !errors.Is(err, ErrClosed) {
		t.Fatalf("acquire on a closed session = %v", err)
	}
	if len(s.Keys()) != 0 {
		t.Fatalf("keys left: %v", s.Keys())
	}
}

// A wait that its context ends leaves the queue, and lets the waiters
// behind it in when it blocked them.
func TestCancelWakes(t *testing.T) {
	t.Parallel()
	s := NewServer()
	a, b, c := s.NewSession("a"), s.NewSession("b"), s.NewSession("c")
	k := Key{V: 3}
	sh := mustHold(t, a, k, Shared)
	ctx, cancel := context.WithCancel(context.Background())
	xErr := make(chan error, 1)
	go func() {
		_, err := b.Acquire(ctx, k, Exclusive, true, "")
		xErr <- err
	}()
	waitFor(t, func() bool { _, w := s.Holders(k); return len(w) == 1 })
	sGot := make(chan error, 1)
	go func() {
		h, err := c.Acquire(context.Background(), k, Shared, true, "")
		if err == nil {
			err = h.Release()
		}
		sGot <- err
	}()
	waitFor(t, func() bool { _, w := s.Holders(k); return len(w) == 2 })
	cancel()
	if err := <-xErr; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait = %v", err)
	}
	if err := <-sGot; err != nil {
		t.Fatal(err)
	}
	_ = sh.Release()
}

func TestFaults(t *testing.T) {
	t.Parallel()
	s := NewServer()
	a := s.NewSession("")
	k := Key{V: 4}
	boom := errors.New("boom")
	s.FailNext(k, boom)
	s.BusyNext(k)
	if _, err := a.Acquire(context.Background(), k, Exclusive, true, ""); err != boom {
		t.Fatalf("first = %v", err)
	}
	busy(t, a, k, Exclusive)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	s.BusyNext(k)
	if _, err := a.Acquire(ctx, k, Exclusive, true, ""); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("busy wait = %v", err)
	}
	h := mustHold(t, a, k, Exclusive)
	if h.Token() != 1 || h.Token() != 2 {
		t.Fatal("tokens do not count up from 1")
	}
	_ = h.Release()
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(end) {
			t.Fatal("condition not met within 5 s")
		}
		time.Sleep(time.Millisecond)
	}
}

// SetDown loses every hold (watchers told before it returns), ends every
// wait, and refuses every request and Enqueue until SetDown(nil); faults
// wait for the Server to come up.
func TestSetDown(t *testing.T) {
	t.Parallel()
	s := NewServer()
	a, b, c := s.NewSession("a"), s.NewSession("b"), s.NewSession("c")
	k1, k2, k3, k4 := Key{V: 11}, Key{V: 12}, Key{V: 13}, Key{V: 14}
	h := mustHold(t, a, k1, Exclusive)
	told := make(chan error, 1)
	stop := h.Watch(func(err error) { told <- err })
	defer stop()
	waits := make(chan error, 2)
	go func() { _, err := b.Acquire(context.Background(), k1, Shared, true, ""); waits <- err }()
	s.BusyNext(k2)
	go func() { _, err := c.Acquire(context.Background(), k2, Exclusive, true, ""); waits <- err }()
	waitFor(t, func() bool { _, w := s.Holders(k1); return len(w) == 1 })
	waitFor(t, func() bool { s.mu.Lock(); defer s.mu.Unlock(); return len(s.faults) == 0 })
	elsewhere, _ := c.Enqueue(k3, Exclusive, "")

	why := errors.New("down")
	if n := s.SetDown(why); n != 2 {
		t.Fatalf("SetDown = %d holds lost, want 2", n)
	}
	select {
	case err := <-told:
		if err != why {
			t.Fatalf("told %v", err)
		}
	default:
		t.Fatal("SetDown returned before telling the watcher")
	}
	for range 2 {
		if err := <-waits; err != why {
			t.Fatalf("a wait ended by SetDown: %v, want %v", err, why)
		}
	}
	if err := h.Release(); !errors.Is(err, ErrLost) || !errors.Is(err, why) {
		t.Fatalf("Release after SetDown = %v", err)
	}
	if err := elsewhere.Release(); !errors.Is(err, ErrLost) {
		t.Fatalf("Release of the Enqueue hold after SetDown = %v", err)
	}
	if len(s.Keys()) != 0 {
		t.Fatalf("keys left: %v", s.Keys())
	}
	s.FailNext(k4, errors.New("boom"))
	if _, err := a.Acquire(context.Background(), k4, Exclusive, false, ""); err != why {
		t.Fatalf("try while down = %v", err)
	}
	if h, _ := b.Enqueue(k4, Exclusive, ""); h.state != ended || len(s.Keys()) != 0 {
		t.Fatal("Enqueue while down holds or queues")
	}
	if n := s.SetDown(errors.New("again")); n != 0 {
		t.Fatalf("SetDown while down = %d", n)
	}
	if _, err := a.Acquire(context.Background(), k4, Exclusive, true, ""); err != why {
		t.Fatalf("wait while down = %v, want the first reason", err)
	}

	s.SetDown(nil)
	if _, err := a.Acquire(context.Background(), k4, Exclusive, false, ""); err == nil || err.Error() != "boom" {
		t.Fatalf("the fault after SetDown(nil) = %v", err)
	}
	_ = mustHold(t, a, k4, Exclusive).Release()
	_ = mustHold(t, b, k1, Exclusive).Release()
}

// SetDelay holds every request back: a context that ends first ends it
// with nothing held, and the Server going down sends it on to be refused.
func TestSetDelay(t *testing.T) {
	t.Parallel()
	s := NewServer()
	a := s.NewSession("a")
	k := Key{V: 21}
	const d = 30 * time.Millisecond
	s.SetDelay(d)
	start := time.Now()
	h := mustHold(t, a, k, Exclusive)
	if took := time.Since(start); took < d {
		t.Fatalf("an acquire took %v with a delay of %v", took, d)
	}
	_ = h.Release()

	s.SetDelay(time.Hour)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if h, err := a.Acquire(ctx, k, Exclusive, false, ""); h != nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a try whose context ends during the delay = %v, %v", h, err)
	}
	got := make(chan error, 1)
	go func() { _, err := a.Acquire(context.Background(), k, Exclusive, true, ""); got <- err }()
	why := errors.New("down")
	s.SetDown(why)
	if err := <-got; err != why {
		t.Fatalf("a request on its way when the Server went down = %v", err)
	}
	s.SetDown(nil)
	s.SetDelay(0)
	_ = mustHold(t, a, k, Exclusive).Release()
	if len(s.Keys()) != 0 {
		t.Fatalf("keys left: %v", s.Keys())
	}
}
