package pglock_test

// Issue 21, "fair across processes": a key that sessions of another
// process contend for is shared in the server's order. These tests put an
// outside session (another process, as the server sees it) against one
// Locker and read the server's queue from a second pool (pg_locks).

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// fairOutside is a session of "another process": a connection of its own.
func fairOutside(t *testing.T) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

// fairHandBackSQL is what the outside session does to hand the key on and
// queue for it again at once, in one statement: unlock, then take it back
// at once (1: no request of another session was in the server's queue) or
// wait for it (2: one was, and was granted the key first); -1: the key was
// not held.
const fairHandBackSQL = `SELECT CASE WHEN NOT pg_advisory_unlock($1::bigint) THEN -1
	WHEN pg_try_advisory_lock($1::bigint) THEN 1
	ELSE (SELECT 2 FROM pg_advisory_lock($1::bigint)) END`

// Invariant (issue 21): while a session of another process contends for a
// key, a Locker whose goroutines contend for it too has a request in the
// server's queue whenever the other session lets go, so the key alternates
// in the server's order; and a session that was queued in the server when
// the Locker's holder let go gets the key before any other goroutine of the
// Locker.
//
// The outside session hands the key on and queues again in one statement
// (fairHandBackSQL), 300 times, while three goroutines of one Locker loop
// Do on it. Before the fix, a holder's release retook the key for the next
// goroutine unless a session was queued; when one was (the outside
// session), the next goroutine tried the key on its lock connection and
// only then sent its wait, two round trips after the unlock: the outside
// session, back one round trip after its grant, found no request of the
// Locker queued and took the key straight back about every other time
// (the share of each process then swings with who is scheduled first: 0.26
// to 0.70 across runs). Now the holder sends the next goroutine's wait on
// its own session in the same write as its unlock, so the Locker is queued
// from the instant its hold ends, behind the outside session when that one
// was queued first.
func TestFairHotKeyQueuedWhenHolderLetsGo(t *testing.T) {
	t.Parallel()
	const rounds = 300
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pgtest.Pool(t, 2))
	_, keys := muxKeys(t, lk, 1)
	k := keys[0]
	b := fairOutside(t)
	if _, err := b.Exec(bg, "SELECT pg_advisory_lock($1::bigint)", k.Int64()); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(bg)
	var stop atomic.Bool
	var grants, inside, overlaps atomic.Int64
	errs := make(chan error, 3)
	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() {
			for !stop.Load() {
				err := lk.Do(ctx, k, func(context.Context) error {
					if inside.Add(1) != 1 {
						overlaps.Add(1)
					}
					grants.Add(1)
					inside.Add(-1)
					return nil
				})
				if err != nil && !stop.Load() {
					errs <- err
					return
				}
			}
		})
	}
	locktest.WaitFor(t, "a goroutine of the Locker to wait in the server's queue and two in the process",
		func() bool { return locktest.Waiters(t, watch, k) == 1 && lk.Stats().Queued == 2 })

	// trials: hand-backs that follow one the Locker won, that is, a hold of
	// the Locker that ended while the outside session waited in the
	// server's queue; back: those in which the outside session took the key
	// straight back (the Locker had no request in the queue again by then);
	// jumped: the Locker had the key twice while the outside session
	// waited.
	var trials, back, jumped int
	won := false
	for i := range rounds {
		before := grants.Load()
		var r int
		if err := b.QueryRow(bg, fairHandBackSQL, k.Int64()).Scan(&r); err != nil {
			t.Fatal(err)
		}
		n := grants.Load() - before
		trial := won
		if trial {
			trials++
		}
		won = r == 2
		switch {
		case r == -1:
			t.Fatalf("round %d: the outside session did not hold the key", i)
		case r == 1:
			if trial {
				back++
			}
			// The next hand-back waits until the Locker has a request in
			// the queue again (else the outside session, spinning on a
			// key it keeps taking back, starves the Locker's sessions of
			// the machine).
			locktest.WaitFor(t, "a goroutine of the Locker to wait in the server's queue",
				func() bool { return locktest.Waiters(t, watch, k) == 1 })
		case n != 1:
			// Queued in the server when the Locker's holder let go, the
			// outside session gets the key next (unless its own wait
			// reached the queue late: its backend not scheduled between
			// the unlock and the wait of its statement).
			jumped++
			t.Logf("round %d: %d grants of the Locker while the outside session waited", i, n)
		}
	}
	stop.Store(true)
	if _, err := b.Exec(bg, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	cancel()
	close(errs)
	for err := range errs {
		t.Errorf("Do: %v", err)
	}
	t.Logf("%d hand-backs of the outside session, %d right after a hold of the Locker: %d of these took the key straight back (no request of the Locker queued again); %d grants of the Locker",
		rounds, trials, back, grants.Load())
	if trials < rounds/4 || back > trials/4 {
		t.Errorf("INVARIANT queued-when-letting-go: %d of %d hand-backs of the outside session that came right after a hold of the Locker found no request of the Locker in the server's queue and took the key straight back (want at most a quarter)",
			back, trials)
	}
	if jumped > rounds/20 {
		t.Errorf("INVARIANT server-order: %d times of %d the Locker was granted the key twice while the outside session waited in the server's queue (want at most %d)",
			jumped, rounds, rounds/20)
	}
	if o := overlaps.Load(); o != 0 {
		t.Errorf("INVARIANT exclusion: %d times two goroutines held the key at once", o)
	}
	pgtest.WaitFree(t, watch, k)
	if s := lk.Stats(); s.HeldKeys != 0 || s.ServerLocks != 0 || s.Queued != 0 {
		t.Errorf("Stats at the end = %+v", s)
	}
}

// Invariant (issue 21): a blocking acquire of a key that a session of
// another process contends for waits in the server's queue at once, without
// trying the key on its lock connection first: the try costs a round trip in
// which the other session's next request reaches the queue first. A free key
// is then granted at once, on the waiting connection.
//
// An outside session holds a key; a TryDo of the Locker finds it busy (the
// sign of contention); the Locker takes a second key, which goes to its lock
// connection; the outside session lets the first key go; an Acquire of it
// then holds it on another session than the lock connection. Before the
// fix it was tried, and so taken, on the lock connection.
func TestFairHotKeyWaitsWithoutTrying(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pgtest.Pool(t, 2), pglock.WithLockConns(1))
	_, keys := muxKeys(t, lk, 2)
	b := fairOutside(t)
	if _, err := b.Exec(bg, "SELECT pg_advisory_lock($1::bigint)", keys[0].Int64()); err != nil {
		t.Fatal(err)
	}
	ran, err := lk.TryDo(bg, keys[0], func(context.Context) error { return nil })
	if err != nil || ran {
		t.Fatalf("TryDo of a key held by another session = %v, %v; want busy", ran, err)
	}
	other, _ := lk.NewLock(keys[1])
	if err := other.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	defer other.Release(bg)
	lockConn := pgtest.Granted(t, watch, keys[1])
	if len(lockConn) != 1 {
		t.Fatalf("second key: pg_locks shows %+v", lockConn)
	}
	if _, err := b.Exec(bg, "SELECT pg_advisory_unlock($1::bigint)", keys[0].Int64()); err != nil {
		t.Fatal(err)
	}
	hot, _ := lk.NewLock(keys[0])
	if err := hot.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	hs := pgtest.Granted(t, watch, keys[0])
	if len(hs) != 1 {
		t.Fatalf("hot key: pg_locks shows %+v", hs)
	}
	if hs[0].PID == lockConn[0].PID {
		t.Errorf("INVARIANT hot-waits-at-once: the acquire of a key that another session contends for was taken by a try on the lock connection (pid %d), not by a wait in the server's queue", hs[0].PID)
	}
	if err := hot.Release(bg); err != nil {
		t.Error(err)
	}
	if err := other.Release(bg); err != nil {
		t.Error(err)
	}
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}
}

// Invariant (issue 21, with the relay of mux.relay): the goroutines of a
// Locker take a key that another process contends for in the order they
// queued in, and one that gives up while it waits in the server's queue
// with a wait relayed to it leaves nothing behind.
//
// The outside session holds the key; one goroutine of the Locker waits for
// it in the server, three more queue behind it in the process; the outside
// session hands the key over and queues again (one statement); the first
// goroutine runs at once and lets go, which grants the outside session the
// key and relays a wait to the second goroutine. The second gives up (its
// context is cancelled) while the outside session holds the key: its Do
// fails, and the third waits in the server. The outside session lets go:
// the third and fourth goroutines run, in that order; nothing stays in
// pg_locks or in the Locker.
func TestFairRelayedWaitKeepsOrder(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pgtest.Pool(t, 2))
	_, keys := muxKeys(t, lk, 1)
	k := keys[0]
	b := fairOutside(t)
	if _, err := b.Exec(bg, "SELECT pg_advisory_lock($1::bigint)", k.Int64()); err != nil {
		t.Fatal(err)
	}
	// The sign of contention.
	if ran, err := lk.TryDo(bg, k, func(context.Context) error { return nil }); err != nil || ran {
		t.Fatalf("TryDo of a key held by another session = %v, %v; want busy", ran, err)
	}

	var mu sync.Mutex
	var order []int
	var inside, overlaps atomic.Int64
	run := func(i int) func(context.Context) error {
		return func(context.Context) error {
			if inside.Add(1) != 1 {
				overlaps.Add(1)
			}
			mu.Lock()
			order = append(order, i)
			mu.Unlock()
			inside.Add(-1)
			return nil
		}
	}
	cancels := make([]context.CancelFunc, 4)
	done := make([]chan error, 4)
	for i := range 4 {
		ctx, cancel := context.WithCancel(bg)
		cancels[i] = cancel
		defer cancel()
		done[i] = make(chan error, 1)
		go func() { done[i] <- lk.Do(ctx, k, run(i)) }()
		if i == 0 {
			locktest.WaitFor(t, "goroutine 0 to wait in the server's queue",
				func() bool { return locktest.Waiters(t, watch, k) == 1 })
		} else {
			locktest.WaitFor(t, "the goroutine to queue in the process",
				func() bool { return lk.Stats().Queued == i })
		}
	}
	var r int
	if err := b.QueryRow(bg, fairHandBackSQL, k.Int64()).Scan(&r); err != nil {
		t.Fatal(err)
	}
	if r != 2 {
		t.Fatalf("the outside session's hand-over = %d, want 2 (goroutine 0 first)", r)
	}
	if err := <-done[0]; err != nil {
		t.Fatalf("goroutine 0: Do = %v", err)
	}
	locktest.WaitFor(t, "goroutine 1 to wait in the server's queue while the outside session holds the key",
		func() bool { return locktest.Waiters(t, watch, k) == 1 && lk.Stats().Queued == 2 })
	cancels[1]()
	if err := <-done[1]; !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.Canceled) {
		t.Errorf("goroutine 1, cancelled while it waited in the server: Do = %v, want ErrNotAcquired and context.Canceled", err)
	}
	locktest.WaitFor(t, "goroutine 2 to wait in the server's queue",
		func() bool { return locktest.Waiters(t, watch, k) == 1 && lk.Stats().Queued == 1 })
	if _, err := b.Exec(bg, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()); err != nil {
		t.Fatal(err)
	}
	for i := 2; i < 4; i++ {
		if err := <-done[i]; err != nil {
			t.Errorf("goroutine %d: Do = %v", i, err)
		}
	}
	mu.Lock()
	got := append([]int(nil), order...)
	mu.Unlock()
	if len(got) != 3 || got[0] != 0 || got[1] != 2 || got[2] != 3 {
		t.Errorf("INVARIANT fifo: the goroutines ran in the order %v, want [0 2 3] (the order they queued in)", got)
	}
	if o := overlaps.Load(); o != 0 {
		t.Errorf("INVARIANT exclusion: %d times two goroutines held the key at once", o)
	}
	pgtest.WaitFree(t, watch, k)
	locktest.WaitFor(t, "the Locker to hold and queue nothing", func() bool {
		s := lk.Stats()
		return s.HeldKeys == 0 && s.ServerLocks == 0 && s.Queued == 0 && s.WaitingConns == 0 && s.HoldingConns == 0
	})
}
