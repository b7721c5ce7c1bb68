package pglocktest_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/pglock/pglocktest"
)

// A target is where the conformance tests run: PostgreSQL or the double.
type target struct {
	name string
	// replicas returns n Lockers, each a replica of a service (its own
	// pool, or its own session of the double) on one database, closed when
	// the test ends.
	replicas func(t *testing.T, n int) []*pglock.Locker
	// lose makes every hold of key lost, as the server ending the
	// holder's session does.
	lose func(t *testing.T, key pglock.Key)
	// waiters returns the number of acquires waiting for key in the
	// server's queue.
	waiters func(t *testing.T, key pglock.Key) int
}

// targets returns PostgreSQL's and the double's, each with a table of its
// own (a server for the double, a watching pool for PostgreSQL).
func targets(t *testing.T) []target {
	watch := pgtest.Pool(t, 2)
	return []target{
		{
			name: "postgres",
			replicas: func(t *testing.T, n int) []*pglock.Locker {
				lks := make([]*pglock.Locker, n)
				for i := range lks {
					lk, err := pglock.NewLocker(pgtest.Pool(t, 2))
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { lk.Close() })
					lks[i] = lk
				}
				return lks
			},
			lose: func(t *testing.T, key pglock.Key) {
				hs := pgtest.Granted(t, watch, key)
				if len(hs) == 0 {
					t.Fatalf("no session holds key %s", key)
				}
				for _, h := range hs {
					pgtest.Terminate(t, watch, h.PID)
				}
			},
			waiters: func(t *testing.T, key pglock.Key) int {
				hs, err := pgtest.Holders(context.Background(), watch, key)
				if err != nil {
					t.Fatal(err)
				}
				n := 0
				for _, h := range hs {
					if !h.Granted {
						n++
					}
				}
				return n
			},
		},
		doubleTarget(pglocktest.NewServer()),
	}
}

// doubleTarget is the target of the double on srv.
func doubleTarget(srv *pglocktest.Server) target {
	return target{
		name: "double",
		replicas: func(t *testing.T, n int) []*pglock.Locker {
			lks := make([]*pglock.Locker, n)
			for i := range lks {
				lk, err := pglocktest.NewLocker(srv)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { lk.Close() })
				lks[i] = lk
			}
			return lks
		},
		lose: func(t *testing.T, key pglock.Key) {
			if srv.Lose(key) == 0 {
				t.Fatalf("no hold of key %s", key)
			}
		},
		waiters: func(t *testing.T, key pglock.Key) int { return len(srv.Waiters(key)) },
	}
}

// conformance is the semantic suite: each case runs against every target.
var conformance = []struct {
	name string
	run  func(t *testing.T, tg target)
}{
	{"ExclusiveExcludes", testExclusive},
	{"SharedAdmitsShared", testShared},
	{"FIFO", testFIFO},
	{"CancelEndsWait", testCancel},
	{"LossCancelsDo", testLossCancelsDo},
	{"ReleaseAfterLoss", testReleaseAfterLoss},
	{"NestedDo", testNestedDo},
}

func TestConformance(t *testing.T) {
	t.Parallel()
	for _, tg := range targets(t) {
		t.Run(tg.name, func(t *testing.T) {
			t.Parallel()
			for _, c := range conformance {
				t.Run(c.name, func(t *testing.T) {
					t.Parallel()
					c.run(t, tg)
				})
			}
		})
	}
}

// bounded returns a context that ends after 10 s (a test that hangs fails).
func bounded(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func newLock(t *testing.T, lk *pglock.Locker, name string, opts ...pglock.Option) *pglock.Lock {
	t.Helper()
	l, err := lk.NewLock(name, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func keyOf(t *testing.T, lk *pglock.Locker, name string) pglock.Key {
	t.Helper()
	k, err := lk.Key(name)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func try(t *testing.T, l *pglock.Lock) bool {
	t.Helper()
	ok, err := l.TryAcquire(bounded(t))
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

func release(t *testing.T, l *pglock.Lock) {
	t.Helper()
	if err := l.Release(bounded(t)); err != nil {
		t.Fatal(err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(end) {
			t.Fatalf("%s: not within 10 s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Two replicas exclude each other; a try on a busy key reports false and
// holds nothing.
func testExclusive(t *testing.T, tg target) {
	lks := tg.replicas(t, 2)
	name := pgtest.UniqueKey(t)
	a, b := newLock(t, lks[0], name), newLock(t, lks[1], name)
	if !try(t, a) {
		t.Fatal("A: free key busy")
	}
	if try(t, b) {
		t.Fatal("B: held key taken")
	}
	if ok, err := lks[1].TryDo(bounded(t), name, func(context.Context) error { return nil }); ok || err != nil {
		t.Fatalf("TryDo on a held key = %v, %v", ok, err)
	}
	// Locks of one replica exclude each other too.
	if try(t, newLock(t, lks[0], name)) {
		t.Fatal("a second Lock of the holder's Locker took the key")
	}
	release(t, a)
	if !try(t, b) {
		t.Fatal("B: released key busy")
	}
	release(t, b)
}

// Shared holders hold together; an exclusive acquire waits for all of them,
// and a shared try queued behind it does not pass it.
func testShared(t *testing.T, tg target) {
	lks := tg.replicas(t, 4)
	name := pgtest.UniqueKey(t)
	key := keyOf(t, lks[0], name)
	sh := pglock.WithMode(pglock.Shared)
	a, b := newLock(t, lks[0], name, sh), newLock(t, lks[1], name, sh)
	if !try(t, a) || !try(t, b) {
		t.Fatal("two shared holders do not hold together")
	}
	x := newLock(t, lks[2], name)
	got := make(chan error, 1)
	go func() { got <- x.Acquire(bounded(t)) }()
	waitFor(t, "the exclusive acquire waits", func() bool { return tg.waiters(t, key) == 1 })
	if try(t, newLock(t, lks[3], name, sh)) {
		t.Fatal("a shared try passed the exclusive acquire waiting before it")
	}
	release(t, a)
	select {
	case err := <-got:
		t.Fatalf("exclusive granted while a shared holder holds (err %v)", err)
	case <-time.After(50 * time.Millisecond):
	}
	release(t, b)
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	release(t, x)
}

// Three waiters, queued one after the other, are granted in that order.
func testFIFO(t *testing.T, tg target) {
	lks := tg.replicas(t, 4)
	name := pgtest.UniqueKey(t)
	key := keyOf(t, lks[0], name)
	h := newLock(t, lks[0], name)
	if !try(t, h) {
		t.Fatal("free key busy")
	}
	order := make(chan int, 3)
	errs := make(chan error, 3)
	for i := 1; i <= 3; i++ {
		l := newLock(t, lks[i], name)
		go func() {
			err := l.Acquire(bounded(t))
			if err == nil {
				order <- i
				err = l.Release(bounded(t))
			}
			errs <- err
		}()
		waitFor(t, fmt.Sprintf("waiter %d queued", i), func() bool { return tg.waiters(t, key) == i })
	}
	release(t, h)
	for range 3 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	close(order)
	var got []int
	for i := range order {
		got = append(got, i)
	}
	if fmt.Sprint(got) != "[1 2 3]" {
		t.Fatalf("granted in order %v, want [1 2 3]", got)
	}
}

// A wait that its context ends returns ErrNotAcquired and the context's
// error, holds nothing and leaves the queue.
func testCancel(t *testing.T, tg target) {
	lks := tg.replicas(t, 2)
	name := pgtest.UniqueKey(t)
	key := keyOf(t, lks[0], name)
	h := newLock(t, lks[0], name)
	if !try(t, h) {
		t.Fatal("free key busy")
	}
	w := newLock(t, lks[1], name)
	ctx, cancel := context.WithCancel(bounded(t))
	got := make(chan error, 1)
	go func() { got <- w.Acquire(ctx) }()
	waitFor(t, "the wait queued", func() bool { return tg.waiters(t, key) == 1 })
	cancel()
	err := <-got
	if !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait = %v, want ErrNotAcquired and context.Canceled", err)
	}
	if w.Held() {
		t.Fatal("held after a cancelled wait")
	}
	waitFor(t, "the queue empty", func() bool { return tg.waiters(t, key) == 0 })
	release(t, h)
	if !try(t, w) {
		t.Fatal("free key busy after the cancelled wait")
	}
	release(t, w)
}

// A hold lost while Do's function runs cancels its context with a cause
// matching ErrLockLost, and Do says so.
func testLossCancelsDo(t *testing.T, tg target) {
	lks := tg.replicas(t, 1)
	name := pgtest.UniqueKey(t)
	key := keyOf(t, lks[0], name)
	running := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- lks[0].Do(bounded(t), name, func(ctx context.Context) error {
			close(running)
			select {
			case <-ctx.Done():
				return context.Cause(ctx)
			case <-time.After(10 * time.Second):
				return errors.New("not cancelled")
			}
		})
	}()
	<-running
	tg.lose(t, key)
	err := <-done
	if !errors.Is(err, pglock.ErrLockLost) {
		t.Fatalf("Do after a loss = %v, want ErrLockLost", err)
	}
}

// Release of a lost hold returns ErrLockLost; the key can be taken again.
func testReleaseAfterLoss(t *testing.T, tg target) {
	lks := tg.replicas(t, 2)
	name := pgtest.UniqueKey(t)
	key := keyOf(t, lks[0], name)
	l := newLock(t, lks[0], name)
	if !try(t, l) {
		t.Fatal("free key busy")
	}
	tg.lose(t, key)
	select {
	case <-l.Lost():
	case <-time.After(10 * time.Second):
		t.Fatal("Lost not closed")
	}
	if err := l.Release(bounded(t)); !errors.Is(err, pglock.ErrLockLost) {
		t.Fatalf("Release after a loss = %v, want ErrLockLost", err)
	}
	other := newLock(t, lks[1], name)
	waitFor(t, "the key free", func() bool { return try(t, other) })
	release(t, other)
}

// A Do of the key inside Do's function runs at once, in the same hold.
func testNestedDo(t *testing.T, tg target) {
	lks := tg.replicas(t, 1)
	name := pgtest.UniqueKey(t)
	ran := false
	err := lks[0].Do(bounded(t), name, func(ctx context.Context) error {
		ictx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		return lks[0].Do(ictx, name, func(context.Context) error {
			ran = true
			return nil
		})
	})
	if err != nil || !ran {
		t.Fatalf("nested Do = %v, ran %v", err, ran)
	}
}
