package pglock_test

// Regression tests for issue 19 ("Lock connections you can bet a ledger on"),
// items 3, 4, 7, 8 and 11, against the real server. Each states the
// invariant a user relies on; the scenarios and timings are those of
// ../shared/repro/lockconn.md.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// TestSharedReadersDoNotStarveOtherProcessWriter (issue 19, item 3): the
// server serves its lock queue in order across sessions, so a writer in
// another process gets its turn although the readers of one Locker
// overlap. Locker A runs 4 goroutines that take the key Shared for 20-30 ms
// each, back to back and staggered, so that some reader always holds it,
// for up to 8 s; Locker B (another pool: another process) takes it
// Exclusive. B must get it within 3 s, while the readers still run, and no
// reader may hold it meanwhile.
func TestSharedReadersDoNotStarveOtherProcessWriter(t *testing.T) {
	t.Parallel()
	const readers = 4
	const readFor = 8 * time.Second
	const writerWithin = 3 * time.Second
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	lkA := muxLocker(t, pgtest.Pool(t, 2))
	lkB := muxLocker(t, pgtest.Pool(t, 2))
	name := pgtest.UniqueKey(t)
	key := locktest.Key(t, lkA, name)

	rctx, stopReaders := context.WithTimeout(bg, readFor)
	defer stopReaders()
	var holding, reads atomic.Int64
	var wg sync.WaitGroup
	for i := range readers {
		wg.Go(func() {
			time.Sleep(time.Duration(i) * 7 * time.Millisecond) // staggered: the holds overlap
			for rctx.Err() == nil {
				l, err := lkA.NewLock(name, pglock.WithMode(pglock.Shared))
				if err != nil {
					t.Error(err)
					return
				}
				if err := l.Acquire(rctx); err != nil {
					if rctx.Err() == nil {
						t.Errorf("reader %d: Acquire = %v", i, err)
					}
					return
				}
				holding.Add(1)
				reads.Add(1)
				time.Sleep(time.Duration(20+rand.IntN(11)) * time.Millisecond)
				holding.Add(-1)
				if err := l.Release(bg); err != nil {
					t.Errorf("reader %d: Release = %v", i, err)
					return
				}
			}
		})
	}
	// The readers are in their stride: several rounds each.
	locktest.WaitFor(t, "the readers to start", func() bool { return reads.Load() >= 2*readers })

	w, err := lkB.NewLock(name)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(bg, readFor+10*time.Second)
	defer cancel()
	start := time.Now()
	err = w.Acquire(wctx)
	took := time.Since(start)
	readersRunning := rctx.Err() == nil
	if err != nil {
		t.Fatalf("the other process's exclusive Acquire = %v after %v", err, took.Round(time.Millisecond))
	}
	if n := holding.Load(); n != 0 {
		t.Errorf("%d readers hold the key while the other process's writer holds it", n)
	}
	if g := pgtest.Granted(t, watch, key); len(g) != 1 || g[0].Mode != "ExclusiveLock" {
		t.Errorf("pg_locks holders while the writer holds the key = %+v, want one ExclusiveLock", g)
	}
	if err := w.Release(bg); err != nil {
		t.Errorf("writer's Release = %v", err)
	}
	stopReaders()
	wg.Wait()
	t.Logf("the writer got the key after %v; %d shared holds by the readers in all", took.Round(time.Millisecond), reads.Load())
	if took > writerWithin || !readersRunning {
		t.Errorf("another process's exclusive Acquire took %v (readers still running when it got the key: %v), want within %v while the readers of one Locker overlap",
			took.Round(time.Millisecond), readersRunning, writerWithin)
	}
	pgtest.WaitFree(t, watch, key)
	if s := lkA.Stats(); s.HeldKeys != 0 || s.Queued != 0 {
		t.Errorf("reader Locker's Stats at the end = %+v", s)
	}
}

// TestSharedWaiterAdmittedWhenExclusiveWaiterLeaves (issue 19, item 4): a
// shared waiter queued behind an exclusive waiter of the same Locker is let
// in as soon as that exclusive waiter gives up, while the key is held shared
// only; and a shared TryAcquire made then succeeds.
func TestSharedWaiterAdmittedWhenExclusiveWaiterLeaves(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pgtest.Pool(t, 2))
	name := pgtest.UniqueKey(t)

	s1, _ := lk.NewLock(name, pglock.WithMode(pglock.Shared))
	if err := s1.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	x, _ := lk.NewLock(name)
	xctx, cancelX := context.WithCancel(bg)
	defer cancelX()
	xdone := make(chan error, 1)
	go func() { xdone <- x.Acquire(xctx) }()
	locktest.WaitFor(t, "the exclusive Acquire to queue", func() bool { return lk.Stats().Queued == 1 })

	s2, _ := lk.NewLock(name, pglock.WithMode(pglock.Shared))
	s2ctx, cancelS2 := context.WithTimeout(bg, 30*time.Second)
	defer cancelS2()
	s2done := make(chan error, 1)
	go func() { s2done <- s2.Acquire(s2ctx) }()
	locktest.WaitFor(t, "the shared Acquire to queue behind the exclusive one", func() bool { return lk.Stats().Queued == 2 })

	cancelX()
	if err := <-xdone; !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.Canceled) {
		t.Errorf("the cancelled exclusive Acquire = %v, want ErrNotAcquired and context.Canceled", err)
	}
	left := time.Now()
	s2ok := false
	select {
	case err := <-s2done:
		if err != nil {
			t.Fatalf("the shared Acquire behind the exclusive one = %v", err)
		}
		s2ok = true
	case <-time.After(2 * time.Second):
		t.Errorf("the shared Acquire is still queued %v after the exclusive waiter ahead of it left, while the key is held shared only (Stats %+v)",
			time.Since(left).Round(time.Millisecond), lk.Stats())
	}
	s3, _ := lk.NewLock(name, pglock.WithMode(pglock.Shared))
	if ok, err := s3.TryAcquire(bg); !ok || err != nil {
		t.Errorf("a shared TryAcquire after the exclusive waiter left, while the key is held shared only = %v, %v; want true, nil", ok, err)
	}
	if g := pgtest.Granted(t, watch, s1.Key()); len(g) != 1 || g[0].Mode != "ShareLock" {
		t.Errorf("pg_locks holders = %+v, want one ShareLock", g)
	}

	if err := s1.Release(bg); err != nil {
		t.Error(err)
	}
	if !s2ok { // s1's release lets it in at the latest
		if err := <-s2done; err != nil {
			t.Errorf("the shared Acquire, after the first holder released = %v", err)
		}
	}
	for _, l := range []*pglock.Lock{s2, s3} {
		if err := l.Release(bg); err != nil {
			t.Error(err)
		}
	}
	pgtest.WaitFree(t, watch, s1.Key())
	if s := lk.Stats(); s.HeldKeys != 0 || s.Queued != 0 || s.ServerLocks != 0 {
		t.Errorf("Stats at the end = %+v", s)
	}
}

// TestLockerSessionsBoundedByLockAndWaitConns (issue 19, item 7): the server
// sessions a multiplexing Locker opens are at most WithLockConns +
// WithWaitConns, whatever the load: here 2 + 2, under a burst of 10 waits
// each granted and then held for 400 ms. The Locker's sessions are counted
// in pg_stat_activity by an application_name of this test's own (the lock
// connections copy the pool's settings), and in Stats, throughout. Every
// waiter still gets its key.
func TestLockerSessionsBoundedByLockAndWaitConns(t *testing.T) {
	t.Parallel()
	const lockConns, waitConns, n = 2, 2, 10
	const hold = 400 * time.Millisecond
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	app := "pglock-regress-" + randomSuffix()
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 2
	cfg.ConnConfig.RuntimeParams["application_name"] = app
	pool, err := pgxpool.NewWithConfig(bg, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	lk := muxLocker(t, pool, pglock.WithLockConns(lockConns), pglock.WithWaitConns(waitConns))
	names, keys := muxKeys(t, lk, n)

	// Another process (one session) holds the 10 keys.
	other := faultConnect(t)
	holds := make([]*pglock.Lock, n)
	for i, k := range keys {
		l, err := pglock.NewLock(other, k)
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Acquire(bg); err != nil {
			t.Fatal(err)
		}
		holds[i] = l
	}
	faultReleaseAtEnd(t, holds...)

	// Sample the Locker's sessions until the end.
	var maxSessions, maxStats atomic.Int64
	var worst atomic.Value // string: the sample with the most sessions
	sampled := make(chan struct{})
	stopSampling := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			var sessions int64
			if err := watch.QueryRow(bg, `SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1`, app).Scan(&sessions); err != nil {
				t.Errorf("read pg_stat_activity: %v", err)
				return
			}
			sessions -= int64(pool.Stat().TotalConns()) // the pool's own (none expected)
			s := lk.Stats()
			if sessions > maxSessions.Load() {
				maxSessions.Store(sessions)
				// The sessions themselves, to tell which one was too many.
				var rows []string
				rs, err := watch.Query(bg, `SELECT pid, backend_start, coalesce(state, ''), left(query, 60) FROM pg_catalog.pg_stat_activity WHERE application_name = $1 ORDER BY backend_start`, app)
				if err == nil {
					for rs.Next() {
						var pid int32
						var started time.Time
						var state, query string
						if rs.Scan(&pid, &started, &state, &query) == nil {
							rows = append(rows, fmt.Sprintf("pid %d started %s %s %q", pid, started.Format("15:04:05.000"), state, query))
						}
					}
					rs.Close()
				}
				worst.Store(fmt.Sprintf("%d sessions named %q besides the pool's (%d), Stats %+v, at %s: %s", sessions, app,
					pool.Stat().TotalConns(), s, time.Now().Format("15:04:05.000"), strings.Join(rows, "; ")))
			}
			if c := int64(s.LockConns + s.WaitConns); c > maxStats.Load() {
				maxStats.Store(c)
			}
			select {
			case <-stopSampling:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()

	ctx, cancel := context.WithTimeout(bg, 60*time.Second)
	defer cancel()
	var got atomic.Int64
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			l, err := lk.NewLock(names[i])
			if err != nil {
				t.Error(err)
				return
			}
			if err := l.Acquire(ctx); err != nil {
				t.Errorf("waiter %d: Acquire = %v", i, err)
				return
			}
			got.Add(1)
			time.Sleep(hold)
			if err := l.Release(bg); err != nil {
				t.Errorf("waiter %d: Release = %v", i, err)
			}
		})
	}
	locktest.WaitFor(t, "the Locker to wait in the server", func() bool {
		w := 0
		for _, k := range keys {
			w += locktest.Waiters(t, watch, k)
		}
		return w == waitConns
	})
	// The other process gives the keys up one by one.
	start := time.Now()
	for i, l := range holds {
		if err := l.Release(bg); err != nil {
			t.Fatalf("release of foreign hold %d: %v", i, err)
		}
		time.Sleep(30 * time.Millisecond)
	}
	wg.Wait()
	close(stopSampling)
	<-sampled
	t.Logf("%d of %d waiters got their keys in %v; at most %d sessions (%v), Stats at most %d connections",
		got.Load(), n, time.Since(start).Round(time.Millisecond), maxSessions.Load(), worst.Load(), maxStats.Load())
	if got.Load() != n {
		t.Errorf("%d of %d waiters got their keys", got.Load(), n)
	}
	if m := maxSessions.Load(); m > lockConns+waitConns {
		t.Errorf("the Locker had %d server sessions at once (%v), want at most WithLockConns + WithWaitConns = %d",
			m, worst.Load(), lockConns+waitConns)
	}
	if m := maxStats.Load(); m > lockConns+waitConns {
		t.Errorf("Stats showed %d connections (LockConns + WaitConns) at once, want at most %d", m, lockConns+waitConns)
	}
	regressIdle(t, watch, lk, keys...)
}

// TestMaxLocksCountsOnlyHeldLocks (issue 19, item 8): WithMaxLocks caps the
// locks a Locker holds; goroutines that only wait for keys held elsewhere
// (in the server's queue, or in the process for a waiting connection) do not
// use it up. With WithMaxLocks(4) and 4 such waiters, an Acquire and a
// TryAcquire of free keys succeed.
func TestMaxLocksCountsOnlyHeldLocks(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		waitConns int // 0: the default (4), every waiter waits in the server
	}{
		{"waiting in the server", 0},
		{"queued for a waiting connection", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const waiters, maxLocks = 4, 4
			bg := context.Background()
			watch := pgtest.Pool(t, 2)
			lk := muxLocker(t, pgtest.Pool(t, 2), pglock.WithMaxLocks(maxLocks), pglock.WithWaitConns(tc.waitConns))
			names, keys := muxKeys(t, lk, waiters+2)
			busy, free := keys[:waiters], names[waiters:]

			other := faultConnect(t)
			var holds []*pglock.Lock
			for _, k := range busy {
				l, err := pglock.NewLock(other, k)
				if err != nil {
					t.Fatal(err)
				}
				if err := l.Acquire(bg); err != nil {
					t.Fatal(err)
				}
				holds = append(holds, l)
			}
			faultReleaseAtEnd(t, holds...)

			wctx, cancelWaiters := context.WithCancel(bg)
			defer cancelWaiters()
			var started sync.WaitGroup
			errs := make(chan error, waiters)
			var wg sync.WaitGroup
			for i := range waiters {
				started.Add(1)
				wg.Go(func() {
					l, err := lk.NewLock(names[i])
					started.Done()
					if err != nil {
						errs <- err
						return
					}
					err = l.Acquire(wctx)
					if err == nil {
						err = fmt.Errorf("waiter %d got a key held elsewhere", i)
						_ = l.Release(bg)
					}
					errs <- err
				})
			}
			started.Wait()
			inServer := waiters
			if tc.waitConns > 0 {
				inServer = tc.waitConns
			}
			locktest.WaitFor(t, fmt.Sprintf("%d waits in the server", inServer), func() bool {
				w := 0
				for _, k := range busy {
					w += locktest.Waiters(t, watch, k)
				}
				return w == inServer
			})
			if inServer < waiters {
				// The others queue in the process for a waiting connection,
				// which nothing outside can see: give them time to get
				// there. Too short a pause only makes the test pass
				// vacuously, never fail falsely.
				time.Sleep(500 * time.Millisecond)
			}

			ctx, cancel := context.WithTimeout(bg, 10*time.Second)
			defer cancel()
			a, _ := lk.NewLock(free[0])
			if err := a.Acquire(ctx); err != nil {
				t.Errorf("Acquire of a free key while %d goroutines only wait (WithMaxLocks(%d), nothing held) = %v; Stats %+v",
					waiters, maxLocks, err, lk.Stats())
			}
			b, _ := lk.NewLock(free[1])
			if ok, err := b.TryAcquire(ctx); !ok || err != nil {
				t.Errorf("TryAcquire of a free key while %d goroutines only wait (WithMaxLocks(%d)) = %v, %v; want true, nil",
					waiters, maxLocks, ok, err)
			}
			for _, l := range []*pglock.Lock{a, b} {
				if l.Held() {
					if g := pgtest.Granted(t, watch, l.Key()); len(g) != 1 {
						t.Errorf("pg_locks holders of a held free key = %+v, want one", g)
					}
				}
				if err := l.Release(bg); err != nil {
					t.Error(err)
				}
			}

			cancelWaiters()
			wg.Wait()
			close(errs)
			for err := range errs {
				if !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.Canceled) {
					t.Errorf("a cancelled waiter's Acquire = %v, want ErrNotAcquired and context.Canceled", err)
				}
			}
			for _, l := range holds {
				if err := l.Release(bg); err != nil {
					t.Error(err)
				}
			}
			regressIdle(t, watch, lk, keys...)
		})
	}
}

// TestLockConnectOutlivesCallerDeadline (issue 19, item 11): a Locker opens
// its lock connections on its own time, not within one caller's deadline: a
// connect that a caller's context cut short goes on in the background, so
// that later calls find the connection open. On a cold Locker (a warm pool
// whose new connections take 40 ms longer to open), 20 Do calls 50 ms apart,
// each with a 15 ms deadline, on keys nobody holds: the calls succeed after
// the first few, both lock connections open, and a call that fails because
// its connection was not open yet fails with ErrUnavailable, never with a
// bare context.DeadlineExceeded (which callers read as "busy").
func TestLockConnectOutlivesCallerDeadline(t *testing.T) {
	t.Parallel()
	const calls, spacing, deadline, connectDelay = 20, 50 * time.Millisecond, 15 * time.Millisecond, 40 * time.Millisecond
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	pool := proofSlowPool(t, func() time.Duration { return connectDelay }, func() error { return nil })
	if _, err := pool.Exec(bg, "SELECT 1"); err != nil { // a warm pool
		t.Fatal(err)
	}
	lk := muxLocker(t, pool)
	names, keys := muxKeys(t, lk, calls)

	type result struct {
		err       error
		connsOpen int // lock connections open when the call began
	}
	results := make([]result, calls)
	t0 := time.Now()
	for i, name := range names {
		time.Sleep(time.Until(t0.Add(time.Duration(i) * spacing)))
		open := lk.Stats().LockConns
		ctx, cancel := context.WithTimeout(bg, deadline)
		err := lk.Do(ctx, name, func(context.Context) error { return nil })
		cancel()
		results[i] = result{err, open}
	}
	ok := 0
	var slow, bad []int // slow: failed on an open connection (a loaded machine)
	for i, r := range results {
		switch {
		case r.err == nil:
			ok++
		case errors.Is(r.err, pglock.ErrUnavailable) && !errors.Is(r.err, context.DeadlineExceeded):
			t.Logf("call %d (lock connections open: %d): %v", i+1, r.connsOpen, r.err)
		case r.connsOpen == pglock.DefaultLockConns && errors.Is(r.err, context.DeadlineExceeded):
			slow = append(slow, i+1)
			t.Logf("call %d, both lock connections open: %v", i+1, r.err)
		default:
			bad = append(bad, i+1)
		}
	}
	t.Logf("%d of %d calls with a %v deadline succeeded; Stats %+v", ok, calls, deadline, lk.Stats())
	if len(bad) > 0 {
		r := results[bad[0]-1]
		t.Errorf("calls %v on free keys failed with an error that is not ErrUnavailable, or that matches context.DeadlineExceeded (read as busy); the first (call %d, lock connections open: %d): %v",
			bad, bad[0], r.connsOpen, r.err)
	}
	if len(slow) > calls/4 {
		t.Errorf("calls %v failed with their deadline although both lock connections were open", slow)
	}
	var late []int
	for i := calls - 5; i < calls; i++ {
		if r := results[i]; r.err != nil && r.connsOpen < pglock.DefaultLockConns {
			late = append(late, i+1)
		}
	}
	if len(late) > 0 {
		t.Errorf("calls %v of %d (%v or more after the first) failed with a lock connection still not open; want the calls after the first few to succeed",
			late, calls, time.Duration(late[0]-1)*spacing)
	}
	deadlineWait := time.Now().Add(10 * time.Second)
	for lk.Stats().LockConns < pglock.DefaultLockConns && time.Now().Before(deadlineWait) {
		time.Sleep(10 * time.Millisecond)
	}
	if s := lk.Stats(); s.LockConns != pglock.DefaultLockConns {
		t.Errorf("Stats().LockConns = %d 10 s after the calls, want %d: the connects cut short by the callers never completed", s.LockConns, pglock.DefaultLockConns)
	}
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}
}

// regressIdle checks that nothing of keys is left in pg_locks (read through
// watch) and that the Locker holds, queues and counts nothing.
func regressIdle(t *testing.T, watch *pgxpool.Pool, lk *pglock.Locker, keys ...pglock.Key) {
	t.Helper()
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}
	if s := lk.Stats(); s.HeldKeys != 0 || s.Queued != 0 || s.ServerLocks != 0 {
		t.Errorf("Stats at the end = %+v", s)
	}
}

// TestIdleTimerKeepsTheWatch: a lock connection's idle timer, set while it
// held nothing, fires after it took a lock: the connection is in use, not
// idle, and its watch must go on. (The first version of the idle end ran
// as the connection's owner after stopping the watch, and left a
// connection that held locks unwatched: a server that then ended its
// session was noticed only at the next use; TestFrozenHolderMuxBlock
// failed once so in CI.) After the timer's time, the session is ended from
// another one, and the hold must be told it is lost.
func TestIdleTimerKeepsTheWatch(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pgtest.Pool(t, 2), pglock.WithLockConns(1))
	// A use that leaves the connection holding nothing sets its idle timer
	// (half the abandoned-session bound).
	if ok, err := lk.TryDo(bg, pgtest.UniqueKey(t), func(context.Context) error { return nil }); err != nil || !ok {
		t.Fatalf("TryDo = %v, %v", ok, err)
	}
	l, err := lk.NewLock(pgtest.UniqueKey(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Release(bg) }()
	// The timer fires meanwhile (a wait for a timer, not for a condition:
	// on a loaded machine it can fire later, and the test then passes
	// without having tested; it cannot fail for that).
	time.Sleep(pglock.AbandonedSessionTimeout/2 + 500*time.Millisecond)
	holders := pgtest.Granted(t, watch, l.Key())
	if len(holders) != 1 {
		t.Fatalf("the held key in pg_locks: %+v", holders)
	}
	pgtest.Terminate(t, watch, holders[0].PID)
	select {
	case <-l.Lost():
	case <-time.After(10 * time.Second):
		t.Fatal("the hold was not told it was lost within 10 s of its session's end: its connection is not watched")
	}
}

// TestClosedLockerStatsCountNothing: once Close has returned, every session
// of the Locker is closed and the server holds none of its locks, so Stats
// counts nothing, whatever its holders have not released yet: a hold on a
// lock connection, a hold granted after a wait (on its waiting connection)
// and a Leader leading (on its campaign connection). Found by
// TestSessionsModel (seed 206029497023472416: a Leader's connection and a
// hold still counted just after Close returned).
func TestClosedLockerStatsCountNothing(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pgtest.Pool(t, 2), pglock.WithLockConns(1), pglock.WithWaitConns(2))
	other := muxLocker(t, pgtest.Pool(t, 2))

	held, err := lk.NewLock(pgtest.UniqueKey(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := held.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	// A hold granted after a wait: another Locker holds the key first.
	waitKey := pgtest.UniqueKey(t)
	blocker, err := other.NewLock(waitKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := blocker.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	waited, err := lk.NewLock(waitKey)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() { got <- waited.Acquire(bg) }()
	locktest.WaitFor(t, "the Acquire to wait in the server", func() bool { return locktest.Waiters(t, watch, waited.Key()) == 1 })
	if err := blocker.Release(bg); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatalf("the waited Acquire: %v", err)
	}
	ld, err := lk.Leader(pgtest.UniqueKey(t), pglock.LeaderConfig{})
	if err != nil {
		t.Fatal(err)
	}
	ran := make(chan error, 1)
	leading := make(chan struct{})
	go func() {
		ran <- ld.Run(context.Background(), func(ctx context.Context) error {
			close(leading)
			<-ctx.Done()
			time.Sleep(200 * time.Millisecond) // steps down slowly: its connection stays out
			return nil
		})
	}()
	<-leading
	before := lk.Stats()
	if before.HoldingConns != 1 || before.LeaderConns != 1 || before.HeldKeys != 3 || before.ServerLocks != 3 {
		t.Fatalf("before Close: Stats %+v, want a holding connection, a Leader's, 3 keys held (the Leader's among them)", before)
	}
	if err := lk.Close(); err != nil {
		t.Fatal(err)
	}
	after := lk.Stats()
	want := pglock.LockerStats{MaxSessions: 3, MaxLocks: after.MaxLocks}
	if after != want {
		t.Errorf("just after Close returned: Stats %+v, want %+v", after, want)
	}
	<-ran
	_ = held.Release(bg)
	_ = waited.Release(bg)
}
