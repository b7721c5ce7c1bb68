package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// muxLocker returns a multiplexing Locker on pool, closed when the test ends.
func muxLocker(t testing.TB, pool *pgxpool.Pool, opts ...pglock.Option) *pglock.Locker {
	t.Helper()
	lk, err := pglock.NewLocker(pool, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	return lk
}

// advisoryByPID counts the advisory locks granted to each backend of this
// test's keys' database, read from a second pool.
func advisoryByPID(t testing.TB, watch *pgxpool.Pool, keys []pglock.Key) map[int32]int {
	t.Helper()
	classids, objids := lockTags(keys)
	rows, err := watch.Query(context.Background(), `
		SELECT l.pid, count(*) FROM pg_catalog.pg_locks l
		JOIN unnest($1::bigint[], $2::bigint[]) AS k(c, o) ON l.classid = k.c::oid AND l.objid = k.o::oid
		WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
		  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
		GROUP BY l.pid`, classids, objids)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[int32]int{}
	for rows.Next() {
		var pid int32
		var n int
		if err := rows.Scan(&pid, &n); err != nil {
			t.Fatal(err)
		}
		out[pid] = n
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// lockTags returns the classid and objid columns of keys (bigint keys) in
// pg_locks, for a query that unnests them.
func lockTags(keys []pglock.Key) (classids, objids []int64) {
	for _, k := range keys {
		c, o, _ := k.LockTag()
		classids, objids = append(classids, int64(c)), append(objids, int64(o))
	}
	return classids, objids
}

func muxKeys(t testing.TB, lk *pglock.Locker, n int) ([]string, []pglock.Key) {
	t.Helper()
	base := pgtest.UniqueKey(t)
	names := make([]string, n)
	keys := make([]pglock.Key, n)
	for i := range names {
		names[i] = fmt.Sprintf("%s:%d", base, i)
		k, err := lk.Key(names[i])
		if err != nil {
			t.Fatal(err)
		}
		keys[i] = k
	}
	return names, keys
}

// Many locks held at once cost no pool connection: a pool of 2, 300
// goroutines each holding a distinct key at the same moment. pg_locks shows
// every key held by the Locker's lock connections only; after release, none.
func TestMuxHoldsManyLocksOnFewConnections(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool, pglock.WithLockConns(2))
	names, keys := muxKeys(t, lk, 300)

	var held, release sync.WaitGroup
	release.Add(1)
	errs := make(chan error, len(names))
	held.Add(len(names))
	var done sync.WaitGroup
	for _, name := range names {
		done.Go(func() {
			err := lk.Do(ctx, name, func(ctx context.Context) error {
				held.Done()
				release.Wait()
				return nil
			})
			if err != nil {
				held.Done()
				errs <- err
			}
		})
	}
	held.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	if n := pool.Stat().AcquiredConns(); n != 0 {
		t.Errorf("%d pool connections acquired while 300 locks are held, want 0", n)
	}
	byPID := advisoryByPID(t, watch, keys)
	total := 0
	for _, n := range byPID {
		total += n
	}
	if total != len(keys) || len(byPID) > 2 {
		t.Errorf("pg_locks: %v (pid: locks), want %d locks on at most 2 sessions", byPID, len(keys))
	}
	if s := lk.Stats(); s.LockConns > 2 || s.HeldKeys != len(keys) || s.ServerLocks != len(keys) {
		t.Errorf("Stats = %+v", s)
	}
	// The pool is free for the work: a query on it does not wait.
	qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	if _, err := pool.Exec(qctx, "SELECT 1"); err != nil {
		t.Errorf("query on the pool while locks are held: %v", err)
	}
	cancel()
	release.Done()
	done.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if byPID := advisoryByPID(t, watch, keys); len(byPID) != 0 {
		t.Errorf("after release pg_locks still has %v", byPID)
	}
	if s := lk.Stats(); s.HeldKeys != 0 || s.ServerLocks != 0 || s.Queued != 0 {
		t.Errorf("Stats after release = %+v", s)
	}
}

// Two Locks of one Locker on one key exclude each other (PostgreSQL would
// stack them on the shared session); shared holders share one server lock.
func TestMuxExclusionInProcess(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool, pglock.WithLockConns(1))
	key := pgtest.UniqueKey(t)
	a, _ := lk.NewLock(key)
	b, _ := lk.NewLock(key)
	if err := a.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.TryAcquire(ctx); ok || err != nil {
		t.Fatalf("second Lock's TryAcquire on a held key = %v, %v; want false, nil", ok, err)
	}
	got := make(chan error, 1)
	go func() { got <- b.Acquire(ctx) }()
	select {
	case err := <-got:
		t.Fatalf("second Acquire returned %v while the first holds the key", err)
	case <-time.After(200 * time.Millisecond):
	}
	if err := a.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if h := pgtest.Granted(t, watch, b.Key()); len(h) != 1 {
		t.Fatalf("pg_locks = %+v, want one holder", h)
	}
	if err := b.Release(ctx); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, b.Key())

	// Shared: two local holders, one server lock; an exclusive waits for both.
	s1, _ := lk.NewLock(key, pglock.WithMode(pglock.Shared))
	s2, _ := lk.NewLock(key, pglock.WithMode(pglock.Shared))
	x, _ := lk.NewLock(key)
	for _, l := range []*pglock.Lock{s1, s2} {
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if h := pgtest.Granted(t, watch, s1.Key()); len(h) != 1 || h[0].Mode != "ShareLock" {
		t.Fatalf("two shared holders: pg_locks = %+v, want one ShareLock", h)
	}
	if ok, _ := x.TryAcquire(ctx); ok {
		t.Fatal("exclusive TryAcquire succeeded beside shared holders")
	}
	go func() { got <- x.Acquire(ctx) }()
	time.Sleep(100 * time.Millisecond)
	if err := s1.Release(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		t.Fatalf("exclusive Acquire returned %v while a shared holder remains", err)
	case <-time.After(200 * time.Millisecond):
	}
	if h := pgtest.Granted(t, watch, s1.Key()); len(h) != 1 {
		t.Fatalf("one shared holder left: pg_locks = %+v, want the shared lock kept", h)
	}
	if err := s2.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if h := pgtest.Granted(t, watch, x.Key()); len(h) != 1 || h[0].Mode != "ExclusiveLock" {
		t.Fatalf("pg_locks = %+v, want one ExclusiveLock", h)
	}
	if err := x.Release(ctx); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, x.Key())
}

// A key held by another session is waited for in the server's queue, on a
// waiting connection; cancelling the wait leaves nothing held; the Locker
// gets the key when the other session lets go.
func TestMuxWaitsInServerQueue(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	other := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool)
	key := pgtest.UniqueKey(t)
	holder, err := pglock.NewLock(other, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	l, _ := lk.NewLock(key)
	if ok, err := l.TryAcquire(ctx); ok || err != nil {
		t.Fatalf("TryAcquire on a key another session holds = %v, %v", ok, err)
	}
	cctx, cancel := context.WithTimeout(ctx, 150*time.Millisecond)
	err = l.Acquire(cctx)
	cancel()
	if !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Acquire past its deadline = %v", err)
	}
	if h := pgtest.Granted(t, watch, l.Key()); len(h) != 1 {
		t.Fatalf("after a cancelled wait pg_locks = %+v, want the other holder only", h)
	}
	got := make(chan error, 1)
	go func() { got <- l.Acquire(ctx) }()
	// The waiter is in the server's queue (pg_locks shows it waiting).
	deadline := time.Now().Add(3 * time.Second)
	for {
		hs, err := pgtest.Holders(ctx, watch, l.Key())
		if err != nil {
			t.Fatal(err)
		}
		if len(hs) == 2 && !hs[1].Granted {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no waiter in pg_locks: %+v", hs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if s := lk.Stats(); s.WaitConns != 1 {
		t.Errorf("Stats while waiting = %+v, want 1 waiting connection", s)
	}
	if err := holder.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, l.Key())
}

// The cap: past WithMaxLocks, acquires fail with ErrTooManyLocks and take
// nothing; releasing one makes room. The default cap comes from the server.
func TestMuxMaxLocks(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool, pglock.WithMaxLocks(5))
	names, keys := muxKeys(t, lk, 6)
	var locks []*pglock.Lock
	for _, n := range names[:5] {
		l, _ := lk.NewLock(n)
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		locks = append(locks, l)
	}
	l6, _ := lk.NewLock(names[5])
	ok, err := l6.TryAcquire(ctx)
	if ok || !errors.Is(err, pglock.ErrTooManyLocks) || !errors.Is(err, pglock.ErrNotAcquired) {
		t.Fatalf("sixth TryAcquire with WithMaxLocks(5) = %v, %v", ok, err)
	}
	if h := pgtest.Granted(t, watch, keys[5]); len(h) != 0 {
		t.Fatalf("refused key is in pg_locks: %+v", h)
	}
	if err := locks[0].Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l6.Acquire(ctx); err != nil {
		t.Fatalf("after a release: %v", err)
	}
	for _, l := range append(locks[1:], l6) {
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
	}

	def := muxLocker(t, pool)
	if err := def.Do(ctx, names[0], func(context.Context) error { return nil }); err != nil {
		t.Fatal(err)
	}
	var capacity int
	if err := watch.QueryRow(ctx, `SELECT current_setting('max_locks_per_transaction')::int *
		(current_setting('max_connections')::int + current_setting('max_prepared_transactions')::int)`).Scan(&capacity); err != nil {
		t.Fatal(err)
	}
	if s := def.Stats(); s.MaxLocks != capacity/4 {
		t.Errorf("default MaxLocks = %d, want a quarter of the lock table (%d)", s.MaxLocks, capacity/4)
	}
}

// Close ends every hold on the lock connections (each Lost closes), and the
// Locker and its Locks refuse further work with ErrLockerClosed.
func TestMuxClose(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk, err := pglock.NewLocker(pool)
	if err != nil {
		t.Fatal(err)
	}
	key := pgtest.UniqueKey(t)
	l, _ := lk.NewLock(key)
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	lost := l.Lost()
	if err := lk.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lost:
	case <-time.After(2 * time.Second):
		t.Fatal("Lost not closed by Close")
	}
	if err := l.Release(ctx); !errors.Is(err, pglock.ErrLockLost) {
		t.Errorf("Release after Close = %v, want ErrLockLost", err)
	}
	pgtest.WaitFree(t, watch, l.Key())
	if err := l.Acquire(ctx); !errors.Is(err, pglock.ErrLockerClosed) || !errors.Is(err, pglock.ErrNotAcquired) {
		t.Errorf("Acquire after Close = %v", err)
	}
	if _, err := lk.NewLock(key); !errors.Is(err, pglock.ErrLockerClosed) {
		t.Errorf("Lock after Close = %v", err)
	}
	if err := lk.Do(ctx, key, func(context.Context) error { return nil }); !errors.Is(err, pglock.ErrLockerClosed) || !errors.Is(err, pglock.ErrNotAcquired) {
		t.Errorf("Do after Close = %v", err)
	}
	if err := lk.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
}

// The Locker's own options are refused on a Lock.
func TestMuxLockerOnlyOptions(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t, 1)
	for _, o := range []pglock.Option{pglock.WithLockConns(3), pglock.WithWaitConns(2), pglock.WithMaxLocks(9), pglock.WithMultiplexing(false)} {
		if _, err := pglock.NewLock(pool, "k", o); !errors.Is(err, pglock.ErrInvalidOption) {
			t.Errorf("NewLock with a Locker option = %v, want ErrInvalidOption", err)
		}
		lk := muxLocker(t, pool)
		if _, err := lk.NewLock("k", o); !errors.Is(err, pglock.ErrInvalidOption) {
			t.Errorf("Locker.NewLock with a Locker option = %v, want ErrInvalidOption", err)
		}
	}
	for _, o := range []pglock.Option{pglock.WithLockConns(-1), pglock.WithWaitConns(-1), pglock.WithMaxLocks(-1)} {
		if _, err := pglock.NewLocker(pool, o); !errors.Is(err, pglock.ErrInvalidOption) {
			t.Errorf("NewLocker with a negative count = %v, want ErrInvalidOption", err)
		}
	}
}

// WithMultiplexing(false) keeps one pool connection per hold.
func TestMuxOff(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool, pglock.WithMultiplexing(false))
	err := lk.Do(ctx, pgtest.UniqueKey(t), func(context.Context) error {
		if n := pool.Stat().AcquiredConns(); n != 1 {
			return fmt.Errorf("%d pool connections acquired, want 1", n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if s := lk.Stats(); s.LockConns != 0 {
		t.Errorf("Stats = %+v", s)
	}
}

// A counter protected by one key, incremented without atomics by many
// goroutines through one Locker: exact.
func TestMuxCounterExact(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool)
	key := pgtest.UniqueKey(t)
	var counter int
	var inside atomic.Int32
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for range 20 {
				err := lk.Do(ctx, key, func(context.Context) error {
					if inside.Add(1) != 1 {
						t.Error("two holders at once")
					}
					counter++
					inside.Add(-1)
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
	if counter != 16*20 {
		t.Errorf("counter = %d, want %d", counter, 16*20)
	}
	k, _ := lk.Key(key)
	pgtest.WaitFree(t, watch, k)
}

// A Locker on a *sql.DB with pgx's driver multiplexes too: held locks take
// no connection of the *sql.DB.
func TestMuxOnSQLDB(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := faultSQLDB(t)
	db.SetMaxOpenConns(1)
	watch := pgtest.Pool(t, 2)
	lk, err := pglock.NewLocker(db)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	names, keys := muxKeys(t, lk, 50)
	var locks []*pglock.Lock
	for _, n := range names {
		l, _ := lk.NewLock(n)
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		locks = append(locks, l)
	}
	if n := db.Stats().InUse; n != 0 {
		t.Errorf("%d *sql.DB connections in use while 50 locks are held", n)
	}
	// The one connection of the *sql.DB is free for the work.
	if _, err := db.ExecContext(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	byPID := advisoryByPID(t, watch, keys)
	if len(byPID) == 0 || len(byPID) > pglock.DefaultLockConns {
		t.Errorf("pg_locks by pid = %v", byPID)
	}
	for _, l := range locks {
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if byPID := advisoryByPID(t, watch, keys); len(byPID) != 0 {
		t.Errorf("after release: %v", byPID)
	}
}

// A lock connection cut off by a silent network: the holder sees the loss
// within twice the check interval, and the server, told at connect to end an
// abandoned session (idle_session_timeout, keepalives), frees the lock within
// pglock.AbandonedSessionTimeout, so another replica gets it. Without the
// bound the server would keep it for hours (forever behind this proxy,
// which keeps TCP open).
func TestMuxAbandonedSessionEnds(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	proxy, pool := faultProxyPool(t, 2)
	other := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	const interval = 200 * time.Millisecond
	lk := muxLocker(t, pool, pglock.WithLostCheckInterval(interval))
	l, _ := lk.NewLock(pgtest.UniqueKey(t))
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // the watch starts 50 ms into the hold
	cut := time.Now()
	proxy.Blackhole()
	select {
	case <-l.Lost():
	case <-time.After(2*interval + time.Second):
		t.Fatalf("Lost not closed %v after the network went silent", time.Since(cut))
	}
	seen := time.Since(cut)
	rival, _ := pglock.NewLock(other, l.Key())
	wctx, cancel := context.WithTimeout(ctx, pglock.AbandonedSessionTimeout+3*time.Second)
	defer cancel()
	if err := rival.Acquire(wctx); err != nil {
		t.Fatalf("another session could not take the abandoned lock %v after the cut: %v", time.Since(cut), err)
	}
	freed := time.Since(cut)
	t.Logf("loss seen by the holder after %v; lock taken by another session after %v", seen, freed)
	if freed < seen {
		t.Errorf("the server freed the lock (%v) before the holder saw the loss (%v)", freed, seen)
	}
	if err := rival.Release(ctx); err != nil {
		t.Fatal(err)
	}
	proxy.Restore()
	if err := l.Release(ctx); !errors.Is(err, pglock.ErrLockLost) {
		t.Errorf("Release after the loss = %v, want ErrLockLost", err)
	}
	pgtest.WaitFree(t, watch, l.Key())
}

// Shared tries of one key at the same moment all get it: a shared try that
// finds another shared try in flight waits for its answer rather than
// calling the key busy. When the key is held exclusively elsewhere, shared
// tries are busy at once, even while a shared Acquire of the process waits
// for it in the server.
func TestMuxConcurrentSharedTries(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	other := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool)
	for round := range 20 {
		key := pgtest.UniqueKey(t)
		var wg sync.WaitGroup
		var got atomic.Int32
		locks := make([]*pglock.Lock, 4)
		for i := range locks {
			locks[i], _ = lk.NewLock(key, pglock.WithMode(pglock.Shared))
			wg.Go(func() {
				ok, err := locks[i].TryAcquire(ctx)
				if err != nil {
					t.Error(err)
				}
				if ok {
					got.Add(1)
				}
			})
		}
		wg.Wait()
		if n := got.Load(); n != 4 {
			t.Errorf("round %d: %d of 4 concurrent shared tries of a free key got it", round, n)
		}
		if h := pgtest.Granted(t, watch, locks[0].Key()); len(h) != 1 || h[0].Mode != "ShareLock" {
			t.Errorf("round %d: pg_locks = %+v, want one ShareLock", round, h)
		}
		for _, l := range locks {
			if err := l.Release(ctx); err != nil {
				t.Error(err)
			}
		}
		pgtest.WaitFree(t, watch, locks[0].Key())
	}

	key := pgtest.UniqueKey(t)
	x, _ := pglock.NewLock(other, key)
	if err := x.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	waiter, _ := lk.NewLock(key, pglock.WithMode(pglock.Shared))
	got := make(chan error, 1)
	go func() { got <- waiter.Acquire(ctx) }()
	time.Sleep(100 * time.Millisecond) // the shared Acquire waits in the server
	try, _ := lk.NewLock(key, pglock.WithMode(pglock.Shared))
	start := time.Now()
	ok, err := try.TryAcquire(ctx)
	if ok || err != nil || time.Since(start) > time.Second {
		t.Errorf("shared try of a key held exclusively elsewhere = %v, %v after %v; want false at once", ok, err, time.Since(start))
	}
	if err := x.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if err := waiter.Release(ctx); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, waiter.Key())
}

// A hold taken after a wait keeps its waiting connection, and its place among
// WithWaitConns, until it is released (so the Locker's sessions stay within
// WithLockConns + WithWaitConns); a wait that finds every place taken still
// gets its key once it is free, by trying it on its lock connection now and
// then (issue 19, item 7).
func TestMuxHoldAfterWaitKeepsItsPlace(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	other := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool, pglock.WithWaitConns(1))
	var held []*pglock.Lock
	defer func() {
		for _, l := range held {
			if err := l.Release(ctx); err != nil {
				t.Error(err)
			}
			pgtest.WaitFree(t, watch, l.Key())
		}
	}()
	for i, k := range []string{pgtest.UniqueKey(t), pgtest.UniqueKey(t)} {
		o, _ := pglock.NewLock(other, k)
		if err := o.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		l, _ := lk.NewLock(k)
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		done := make(chan error, 1)
		go func() { done <- l.Acquire(wctx) }()
		if i == 0 {
			// The first waits in the server, on the one waiting connection.
			locktest.WaitFor(t, "the first Acquire waits in the server", func() bool {
				return locktest.Waiters(t, watch, l.Key()) == 1
			})
		} else {
			// The second finds the place taken by the first's hold: it
			// waits in the process, trying the key now and then.
			locktest.WaitFor(t, "the second Acquire has tried the key", func() bool {
				return lk.Stats().ServerLocks == 1 && locktest.Waiters(t, watch, l.Key()) == 0
			})
		}
		if err := o.Release(ctx); err != nil {
			t.Fatal(err)
		}
		err := <-done
		cancel()
		if err != nil {
			t.Fatalf("Acquire(%s) after waiting, with %d other key(s) held after a wait: %v", k, i, err)
		}
		held = append(held, l)
	}
	if s := lk.Stats(); s.WaitConns != 1 || s.LockConns > 2 || s.HeldKeys != 2 {
		t.Errorf("Stats = %+v, want 1 waiting connection (holding the first key) and the second key on a lock connection", s)
	}
}

// A lock connection that goes silent while requests keep it busy (so its
// watch does not run) is lost within twice the check interval too, not only
// when the release timeout cuts its statement.
func TestMuxLossUnderTraffic(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	proxy, pool := faultProxyPool(t, 2)
	const interval = 200 * time.Millisecond
	lk := muxLocker(t, pool, pglock.WithLockConns(1), pglock.WithLostCheckInterval(interval), pglock.WithReleaseTimeout(time.Second))
	a, _ := lk.NewLock(pgtest.UniqueKey(t))
	if err := a.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	proxy.Blackhole()
	cut := time.Now()
	b, _ := lk.NewLock(pgtest.UniqueKey(t))
	tried := make(chan error, 1)
	go func() {
		_, err := b.TryAcquire(ctx)
		tried <- err
	}()
	select {
	case <-a.Lost():
	case <-time.After(5 * time.Second):
		t.Fatal("Lost not closed 5 s after the network went silent")
	}
	if took := time.Since(cut); took > 2*interval+500*time.Millisecond {
		t.Errorf("loss seen after %v with a request in flight, want within 2 x %v (+ margin)", took, interval)
	}
	if err := <-tried; err == nil {
		_ = b.Release(ctx)
		t.Error("TryAcquire on the silent connection succeeded")
	}
	proxy.Restore()
	if err := a.Release(ctx); !errors.Is(err, pglock.ErrLockLost) {
		t.Errorf("Release = %v, want ErrLockLost", err)
	}
}
