package pglock_test

import (
	"context"
	"errors"
	"runtime"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// The watch of a hold on a pool connection of its own is taken from a pool
// of watches and given back when the hold ends, and its timer is left set
// between holds (see connwatch.Rewatch): after many short holds of Locks made per hold,
// each armed and stopped before its watch started, a hold of another Lock,
// with a shorter check interval than theirs (so a shorter delay than the
// timer left set), still sees its connection terminated, and the loss is
// reported to that hold only: not to a Lock whose hold ended, nor to a later
// hold of the same Lock.
func TestWatchReusedAcrossHoldsAndLocks(t *testing.T) {
	t.Parallel()
	watchReuse(t)
}

// The same for holds in the lock's own transaction on a pool, whose watch
// asks the kernel whether the server closed the connection (Linux; see
// connwatch.Peer): reused across Locks made per hold, with its timer left set,
// it still sees the server end a hold's session, and tells that hold only.
func TestPeerWatchReusedAcrossHoldsAndLocks(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the peer watch needs Linux's TCP_INFO")
	}
	t.Parallel()
	watchReuse(t, pglock.WithScope(pglock.Transaction))
}

// watchReuse is the watch-reuse tests with opts (the scope): many short
// holds of Locks made per hold, a hold that ends cleanly, then for two check
// intervals a hold whose backend is terminated: its loss is seen and told to
// that hold only.
func watchReuse(t *testing.T, opts ...pglock.Option) {
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	watch := pgtest.Pool(t, 2)

	short := func() {
		t.Helper()
		l, err := pglock.NewLock(pool, pgtest.UniqueKey(t), opts...)
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
	}
	for range 100 {
		short()
	}

	// A hold that ends cleanly: its channel, taken during the hold, stays
	// open whatever happens to later holds that reuse its watch.
	done, err := pglock.NewLock(pool, pgtest.UniqueKey(t), opts...)
	if err != nil {
		t.Fatal(err)
	}
	if err := done.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	doneLost := done.Lost()
	if err := done.Release(ctx); err != nil {
		t.Fatal(err)
	}

	for _, interval := range []time.Duration{40 * time.Millisecond, pglock.DefaultLostCheckInterval} {
		short() // leaves the timer set for a later start than the next hold's
		l, err := pglock.NewLock(pool, pgtest.UniqueKey(t), append(opts, pglock.WithLostCheckInterval(interval))...)
		if err != nil {
			t.Fatal(err)
		}
		// On failure too: the pool closes once its connections are back.
		t.Cleanup(func() { _ = l.Release(context.Background()) })
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		lost := l.Lost()
		pgtest.Terminate(t, watch, pgtest.Granted(t, watch, l.Key())[0].PID)
		select {
		case <-lost:
		case <-time.After(5 * time.Second):
			t.Fatalf("interval %v: Lost not closed 5 s after the backend was terminated", interval)
		}
		if l.Held() {
			t.Fatalf("interval %v: Held after the loss", interval)
		}
		if err := l.Release(ctx); !errors.Is(err, pglock.ErrLockLost) {
			t.Fatalf("interval %v: Release after the loss = %v, want ErrLockLost", interval, err)
		}
		// The next hold of the same Lock is not lost.
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		next := l.Lost()
		for range 5 {
			short()
		}
		select {
		case <-next:
			t.Fatalf("interval %v: the next hold is reported lost", interval)
		default:
		}
		if err := l.Release(ctx); err != nil {
			t.Fatalf("interval %v: %v", interval, err)
		}
	}
	select {
	case <-doneLost:
		t.Fatal("a hold that ended cleanly was reported lost by a later hold's loss")
	default:
	}
	if n := pool.Stat().AcquiredConns(); n != 0 {
		t.Fatalf("%d connections acquired", n)
	}
}
