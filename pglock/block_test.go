package pglock_test

import (
	"context"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Issue 21: a lock connection that holds many locks runs inside an open
// transaction block, so that its statements do not pay for every lock it
// holds (PostgreSQL walks the session's lock table at each transaction's
// end). What the server sees: with 100 locks the session is "idle in
// transaction" with no transaction ID (it writes nothing); an unlock frees
// its key for others at once; an idle block is ended by the watch's first
// ping, so that no snapshot is kept while idle; a new lock opens one again;
// releasing below half the threshold ends it; no lock is lost on the way.
func TestLockConnTransactionBlock(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool, pglock.WithLockConns(1))
	_, ks := muxKeys(t, lk, 102)
	locks := make([]*pglock.Lock, len(ks))
	for i := range 100 {
		l, err := lk.NewLock(ks[i])
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		locks[i] = l
	}
	byPID := advisoryByPID(t, watch, ks)
	if len(byPID) != 1 {
		t.Fatalf("the locks are held by %d sessions, want 1: %v", len(byPID), byPID)
	}
	var pid int32
	for p := range byPID {
		pid = p
	}
	heldNow := func(want int) {
		t.Helper()
		if got := advisoryByPID(t, watch, ks)[pid]; got != want {
			t.Fatalf("INVARIANT nil-means-held: the lock connection holds %d of the keys, want %d", got, want)
		}
	}
	// state waits until the session is not running a statement (the watch
	// may be pinging) and returns its state, and whether it has a
	// transaction ID or a snapshot.
	state := func() (string, bool) {
		t.Helper()
		for {
			var st string
			var xid bool
			if err := watch.QueryRow(ctx, `SELECT state, backend_xid IS NOT NULL
				FROM pg_catalog.pg_stat_activity WHERE pid = $1`, pid).Scan(&st, &xid); err != nil {
				t.Fatal(err)
			}
			if st != "active" {
				return st, xid
			}
			time.Sleep(time.Millisecond)
		}
	}
	if st, xid := state(); st != "idle in transaction" || xid {
		t.Fatalf("holding 100 locks, the lock connection is %q (transaction ID or snapshot: %v), want idle in transaction without either", st, xid)
	}

	if !frozenTry(t, ctx, watch, ks[1]) {
		t.Fatal("a key held inside the block is free for others")
	}
	// An unlock inside the block frees the key at once.
	if err := locks[0].Release(ctx); err != nil {
		t.Fatal(err)
	}
	locks[0] = nil
	if busy := frozenTry(t, ctx, watch, ks[0]); busy {
		t.Fatal("a key released inside the block is still held for others")
	}
	heldNow(99)

	// Idle, the block is ended by the watch's first ping (after a quiet
	// check interval): the session keeps no snapshot while idle.
	deadline := time.Now().Add(3*pglock.DefaultLostCheckInterval + 2*time.Second)
	for {
		st, _ := state()
		if st == "idle" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the idle lock connection is still %q", st)
		}
		time.Sleep(50 * time.Millisecond)
	}
	heldNow(99)

	// A new lock opens a block again.
	l, err := lk.NewLock(ks[100])
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	locks[100] = l
	if st, _ := state(); st != "idle in transaction" {
		t.Fatalf("after a lock on a connection holding 100, it is %q, want idle in transaction", st)
	}
	heldNow(100)

	// Below half the threshold, the block ends.
	kept := 0
	for i, l := range locks {
		if l == nil {
			continue
		}
		if kept < 20 {
			kept++
			continue
		}
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
		locks[i] = nil
	}
	if st, _ := state(); st != "idle" {
		t.Fatalf("holding 20 locks, the lock connection is %q, want idle", st)
	}
	heldNow(20)
	for _, l := range locks {
		if l != nil {
			if err := l.Release(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	heldNow(0)
}
