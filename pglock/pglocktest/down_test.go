package pglocktest_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/pglock/pglocktest"
)

// unavailable reports whether err is an acquire that failed because the
// server is down.
func unavailable(err error) bool {
	return errors.Is(err, pglock.ErrNotAcquired) && errors.Is(err, pglock.ErrUnavailable)
}

// SetDown(true) is a database going away: every hold of every replica is
// lost before it returns (Lost closed, Do's context cancelled with
// ErrLockLost), every wait ends with ErrUnavailable, and every acquire fails
// with it until SetDown(false); then locks are taken again, and the faults
// set meanwhile apply.
func TestSetDown(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	a, b := replica(t, srv), replica(t, srv)
	held := newLock(t, a, "held")
	if !try(t, held) {
		t.Fatal("free key busy")
	}
	inDo := make(chan struct{})
	cause := make(chan error, 1)
	doErr := make(chan error, 1)
	go func() {
		doErr <- b.Do(bounded(t), "work", func(ctx context.Context) error {
			close(inDo)
			<-ctx.Done()
			cause <- context.Cause(ctx)
			return context.Cause(ctx)
		})
	}()
	<-inDo
	waitErr := make(chan error, 1)
	go func() { waitErr <- newLock(t, b, "held").Acquire(bounded(t)) }()
	waitFor(t, "b waits", func() bool { return len(srv.Waiters(keyOf(t, a, "held"))) == 1 })
	elsewhere := keyOf(t, a, "elsewhere")
	let := srv.HoldElsewhere(elsewhere)
	defer let()

	srv.SetDown(true)
	select {
	case <-held.Lost(): // closed before SetDown returned
	default:
		t.Fatal("Lost not closed when SetDown returned")
	}
	select {
	case err := <-cause:
		if !errors.Is(err, pglock.ErrLockLost) {
			t.Fatalf("Do's context ended with %v, want ErrLockLost", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Do's context not cancelled")
	}
	if err := <-doErr; !errors.Is(err, pglock.ErrLockLost) {
		t.Fatalf("Do = %v, want ErrLockLost", err)
	}
	if err := <-waitErr; !unavailable(err) {
		t.Fatalf("the wait = %v, want ErrNotAcquired and ErrUnavailable", err)
	}
	if err := held.Release(bounded(t)); !errors.Is(err, pglock.ErrLockLost) || !errors.Is(err, pglock.ErrUnavailable) {
		t.Fatalf("Release of a hold lost to SetDown = %v, want ErrLockLost and ErrUnavailable", err)
	}
	if keys := srv.Keys(); len(keys) != 0 {
		t.Fatalf("keys while down: %v", keys)
	}
	if err := a.CheckHealth(bounded(t)); !errors.Is(err, pglock.ErrUnavailable) {
		t.Fatalf("CheckHealth while down = %v, want ErrUnavailable", err)
	}

	// While down: every acquire fails at once, whether it waits or not.
	srv.FailNext(keyOf(t, a, "k"), errors.New("boom")) // kept for after
	if ok, err := a.TryDo(bounded(t), "k", func(context.Context) error { return nil }); ok || !unavailable(err) {
		t.Fatalf("TryDo while down = %v, %v", ok, err)
	}
	if err := newLock(t, b, "k", pglock.WithWait(time.Hour)).Acquire(context.Background()); !unavailable(err) {
		t.Fatalf("Acquire while down = %v", err)
	}
	srv.SetDown(true) // no change
	srv.HoldElsewhere(keyOf(t, a, "k"))
	if len(srv.Holders(keyOf(t, a, "k"))) != 0 {
		t.Fatal("HoldElsewhere held a key while down")
	}

	srv.SetDown(false)
	srv.SetDown(false) // no change
	// Healthy again within a check interval (the answer is kept for one).
	waitFor(t, "CheckHealth healthy once up", func() bool { return a.CheckHealth(bounded(t)) == nil })
	if err := a.Do(bounded(t), "k", func(context.Context) error { return nil }); err == nil || !errors.Is(err, pglock.ErrNotAcquired) || errors.Is(err, pglock.ErrUnavailable) {
		t.Fatalf("the first acquire after SetDown(false) = %v, want FailNext's error", err)
	}
	for _, lk := range []*pglock.Locker{a, b} {
		if err := lk.Do(bounded(t), "held", func(context.Context) error { return nil }); err != nil {
			t.Fatalf("Do after SetDown(false): %v", err)
		}
	}
	if !try(t, newLock(t, b, "elsewhere")) {
		t.Fatal("a key held elsewhere before SetDown is still held after")
	}
}

// A Leader's term ends when the server goes down, and a new one begins when
// it comes back.
func TestSetDownLeader(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	lk := replica(t, srv)
	ld, err := lk.Leader("lead", pglock.LeaderConfig{MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	terms := make(chan struct{}, 4)
	ended := make(chan error, 4)
	done := make(chan error, 1)
	go func() {
		done <- ld.Run(ctx, func(ctx context.Context) error {
			terms <- struct{}{}
			<-ctx.Done()
			ended <- context.Cause(ctx)
			return context.Cause(ctx)
		})
	}()
	<-terms
	srv.SetDown(true)
	select {
	case err := <-ended:
		if !errors.Is(err, pglock.ErrLockLost) {
			t.Fatalf("the term ended with %v, want ErrLockLost", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the term did not end within 5 s of SetDown(true)")
	}
	select {
	case <-terms:
		t.Fatal("a term began while the server was down")
	default:
	}
	srv.SetDown(false)
	select {
	case <-terms:
	case <-time.After(5 * time.Second):
		t.Fatal("no new term within 5 s of SetDown(false)")
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v", err)
	}
}

// SetDelay makes every acquire take the delay; an acquire whose context
// ends first fails, holding nothing.
func TestSetDelay(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	lk := replica(t, srv)
	const d = 30 * time.Millisecond
	srv.SetDelay(d)
	start := time.Now()
	if !try(t, newLock(t, lk, "k")) {
		t.Fatal("free key busy")
	}
	if took := time.Since(start); took < d {
		t.Fatalf("TryAcquire took %v with a delay of %v", took, d)
	}

	srv.SetDelay(time.Hour)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	l := newLock(t, lk, "other")
	if _, err := l.TryAcquire(ctx); !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("TryAcquire cut short by its context = %v", err)
	}
	if l.Held() || len(srv.Holders(keyOf(t, lk, "other"))) != 0 {
		t.Fatal("held after a delayed acquire failed")
	}
	got := make(chan error, 1)
	go func() { got <- lk.Do(bounded(t), "other", func(context.Context) error { return nil }) }()
	srv.SetDown(true) // the acquire on its way fails now, not in an hour
	if err := <-got; !unavailable(err) {
		t.Fatalf("an acquire on its way when the server went down = %v", err)
	}
	srv.SetDown(false)
	srv.SetDelay(0)
	if err := lk.Do(bounded(t), "other", func(context.Context) error { return nil }); err != nil {
		t.Fatal(err)
	}
}
