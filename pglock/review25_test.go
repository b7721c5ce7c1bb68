package pglock_test

// Adversarial review of issue 25 (Leader identity, health, campaign
// connections) and of semaphores. Each TestReview25* test names the defect
// it shows, or what it checks that held up.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// r25Sessions counts the server sessions whose application_name is app, or
// every client backend of the database when app is "".
func r25Sessions(t testing.TB, watch *pgxpool.Pool, app string) int {
	t.Helper()
	var n int
	if err := watch.QueryRow(context.Background(),
		`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend' AND application_name = $1`,
		app).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// HELD? A Leader and ordinary Locks of its key on one Locker exclude each
// other: a Lock's Acquire waits while the Leader leads, and a Leader's
// campaign waits while a Lock holds.
func TestReview25LeaderExcludesLocksOfItsKey(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pgtest.Pool(t, 4))
	key := pgtest.UniqueKey(t)
	k := locktest.Key(t, lk, key)

	ld, err := lk.Leader(key, pglock.LeaderConfig{Identity: "r25-excl", MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(bg)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	var inFn atomic.Int32
	elected := make(chan struct{}, 8)
	wg.Go(func() {
		_ = ld.Run(ctx, func(ctx context.Context) error {
			inFn.Add(1)
			defer inFn.Add(-1)
			elected <- struct{}{}
			<-ctx.Done()
			return nil
		})
	})
	select {
	case <-elected:
	case <-time.After(10 * time.Second):
		t.Fatal("not elected")
	}
	// While the Leader leads, a Lock of the key on the same Locker is busy.
	ok, err := lk.TryDo(bg, key, func(context.Context) error { return nil })
	if err != nil || ok {
		t.Fatalf("TryDo while the Leader of the key leads on the same Locker = %v, %v; want busy", ok, err)
	}
	actx, acancel := context.WithTimeout(bg, 300*time.Millisecond)
	err = lk.Do(actx, key, func(context.Context) error { return nil })
	acancel()
	if !errors.Is(err, pglock.ErrNotAcquired) {
		t.Fatalf("Do while the Leader leads = %v; want a wait that times out", err)
	}
	if g := pgtest.Granted(t, watch, k); len(g) != 1 {
		t.Fatalf("granted %+v; want one session", g)
	}
	cancel()
	wg.Wait()
	pgtest.WaitFree(t, watch, k)

	// A Lock holds; a Leader campaigns: it must not lead until the Lock goes.
	l, err := lk.NewLock(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	ctx2, cancel2 := context.WithCancel(bg)
	defer cancel2()
	wg.Go(func() {
		_ = ld.Run(ctx2, func(ctx context.Context) error {
			inFn.Add(1)
			defer inFn.Add(-1)
			elected <- struct{}{}
			<-ctx.Done()
			return nil
		})
	})
	select {
	case <-elected:
		t.Fatal("the Leader was elected while a Lock of its key held it on the same Locker")
	case <-time.After(500 * time.Millisecond):
	}
	if ld.IsLeader() {
		t.Fatal("IsLeader while a Lock holds the key")
	}
	if err := l.Release(bg); err != nil {
		t.Fatal(err)
	}
	select {
	case <-elected:
	case <-time.After(10 * time.Second):
		t.Fatal("the Leader was not elected after the Lock was released")
	}
	cancel2()
	wg.Wait()
	pgtest.WaitFree(t, watch, k)
}

// HELD? Leaders of one key, two on each of two Lockers, Runs cancelled at
// random moments and restarted, Locks of the same key on the same Lockers
// in between: never two leaders at once (fns, IsLeader), the budget holds,
// nothing left in pg_locks or pg_stat_activity afterwards.
func TestReview25LeaderStorm(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	key := pgtest.UniqueKey(t)
	lks := []*pglock.Locker{
		muxLocker(t, pgtest.Pool(t, 4), pglock.WithWaitConns(2)),
		muxLocker(t, pgtest.Pool(t, 4), pglock.WithWaitConns(2)),
	}
	k := locktest.Key(t, lks[0], key)
	var lds []*pglock.Leader
	for i := range 4 {
		ld, err := lks[i%2].Leader(key, pglock.LeaderConfig{
			Identity:   fmt.Sprintf("r25-storm-%d", i),
			MinBackoff: 10 * time.Millisecond, MaxBackoff: 40 * time.Millisecond,
		})
		if err != nil {
			t.Fatal(err)
		}
		lds = append(lds, ld)
	}
	var (
		ov       locktest.Overlap // fns of Leaders and Locks of the key at once
		twoLead  atomic.Int32
		overBudg atomic.Int32
		terms    atomic.Int32
		locks    atomic.Int32
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	// Samplers: IsLeader on two at once; the budget.
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			n := 0
			for _, ld := range lds {
				if ld.IsLeader() {
					n++
				}
			}
			if n > 1 {
				twoLead.Add(1)
			}
			for _, lk := range lks {
				if s := lk.Stats(); s.Sessions > s.MaxSessions {
					overBudg.Add(1)
				}
			}
			time.Sleep(time.Millisecond)
		}
	})
	for _, ld := range lds {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				// A campaign opens a connection of its own: on a loaded
				// machine that alone can take 100 ms, so one Run in four
				// has up to 400 ms.
				d := time.Duration(rand.IntN(80)) * time.Millisecond
				if rand.IntN(4) == 0 {
					d = time.Duration(rand.IntN(400)) * time.Millisecond
				}
				ctx, cancel := context.WithTimeout(bg, d)
				_ = ld.Run(ctx, func(ctx context.Context) error {
					ov.Enter()
					terms.Add(1)
					defer ov.Leave()
					select {
					case <-ctx.Done():
					case <-time.After(time.Duration(rand.IntN(20)) * time.Millisecond):
					}
					if rand.IntN(2) == 0 {
						return errors.New("step down")
					}
					return nil
				})
				cancel()
			}
		})
	}
	for _, lk := range lks {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(bg, time.Duration(rand.IntN(60))*time.Millisecond)
				_ = lk.Do(ctx, key, func(context.Context) error {
					ov.Enter()
					locks.Add(1)
					time.Sleep(time.Millisecond)
					ov.Leave()
					return nil
				})
				cancel()
			}
		})
	}
	// 6 s of storm, and at least one term: on a loaded machine a campaign
	// (a connection of its own, named) can take longer than the Runs'
	// contexts for a while.
	time.Sleep(6 * time.Second)
	for end := time.Now().Add(30 * time.Second); terms.Load() == 0 && time.Now().Before(end); {
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("terms %d, locks %d, max at once %d", terms.Load(), locks.Load(), ov.Max())
	if ov.Max() > 1 {
		t.Errorf("%d holders of the key ran at once (Leaders' fns and Locks' fns)", ov.Max())
	}
	if n := twoLead.Load(); n > 0 {
		t.Errorf("IsLeader true on two Leaders at once, %d samples", n)
	}
	if n := overBudg.Load(); n > 0 {
		t.Errorf("Stats().Sessions > MaxSessions in %d samples", n)
	}
	if terms.Load() == 0 {
		t.Error("no term ran")
	}
	pgtest.WaitFree(t, watch, k)
	for _, lk := range lks {
		if s := lk.Stats(); s.LeaderConns != 0 || s.HeldKeys != 0 || s.Queued != 0 {
			t.Errorf("after the storm: %+v", s)
		}
	}
	locktest.WaitFor(t, "the Leaders' sessions to end", func() bool {
		n := 0
		for i := range 4 {
			n += r25Sessions(t, watch, fmt.Sprintf("r25-storm-%d", i))
		}
		return n == 0
	})
}

// HELD? CurrentLeader and OnNewLeader follow the leader when its session is
// killed (pg_terminate_backend): the other replica is elected and every
// replica reads its identity.
func TestReview25CurrentLeaderAfterKill(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	key := pgtest.UniqueKey(t)
	ctx, cancel := context.WithCancel(bg)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	type rep struct {
		ld   *pglock.Leader
		mu   sync.Mutex
		seen []string
	}
	mk := func(id string) *rep {
		lk := muxLocker(t, pgtest.Pool(t, 4), pglock.WithLostCheckInterval(200*time.Millisecond))
		r := &rep{}
		var err error
		r.ld, err = lk.Leader(key, pglock.LeaderConfig{
			Identity: id, MinBackoff: time.Hour, ObserveInterval: 100 * time.Millisecond,
			OnNewLeader: func(s string) { r.mu.Lock(); r.seen = append(r.seen, s); r.mu.Unlock() },
		})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	a, b := mk("r25-kill-a"), mk("r25-kill-b")
	wg.Go(func() { _ = a.ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) })
	locktest.WaitFor(t, "a to lead", a.ld.IsLeader)
	wg.Go(func() { _ = b.ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) })
	k := a.ld.Key()
	locktest.WaitFor(t, "b to wait in the server", func() bool { return locktest.Waiters(t, watch, k) == 1 })
	id, ok, err := b.ld.CurrentLeader(bg)
	if err != nil || !ok || id != "r25-kill-a" {
		t.Fatalf("CurrentLeader = %q, %v, %v; want r25-kill-a", id, ok, err)
	}
	g := pgtest.Granted(t, watch, k)
	if len(g) != 1 {
		t.Fatalf("granted %+v", g)
	}
	pgtest.Terminate(t, watch, g[0].PID)
	locktest.WaitFor(t, "b to lead", b.ld.IsLeader)
	locktest.WaitFor(t, "a to stop believing", func() bool { return !a.ld.IsLeader() })
	for _, r := range []*rep{a, b} {
		id, ok, err := r.ld.CurrentLeader(bg)
		if err != nil || !ok || id != "r25-kill-b" {
			t.Errorf("CurrentLeader after the kill = %q, %v, %v; want r25-kill-b", id, ok, err)
		}
		locktest.WaitFor(t, "OnNewLeader to see b", func() bool {
			r.mu.Lock()
			defer r.mu.Unlock()
			return len(r.seen) > 0 && r.seen[len(r.seen)-1] == "r25-kill-b"
		})
	}
	if err := b.ld.CheckHealth(bg); err != nil {
		t.Errorf("CheckHealth of the new leader = %v", err)
	}
	cancel()
	wg.Wait()
	pgtest.WaitFree(t, watch, k)
}

// HELD? A Locker closed under a Leader that leads: Run returns (the
// Locker is closed) in a bounded time, IsLeader goes false, the key is
// freed, and CheckHealth is nil (not leading).
func TestReview25LeaderLockerClosed(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	key := pgtest.UniqueKey(t)
	lk, err := pglock.NewLocker(pgtest.Pool(t, 4))
	if err != nil {
		t.Fatal(err)
	}
	ld, err := lk.Leader(key, pglock.LeaderConfig{Identity: "r25-close", MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ld.Run(bg, func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }) }()
	locktest.WaitFor(t, "lead", ld.IsLeader)
	if err := lk.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, pglock.ErrLockerClosed) {
			t.Errorf("Run after Close = %v; want ErrLockerClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after the Locker was closed")
	}
	if ld.IsLeader() {
		t.Error("IsLeader after Close")
	}
	if err := ld.CheckHealth(bg); err != nil {
		t.Errorf("CheckHealth after Close = %v", err)
	}
	pgtest.WaitFree(t, watch, ld.Key())
}

// A Leader's CheckHealth while the Locker's pool is saturated by the
// application's own work (every pool connection acquired): the Leader leads
// soundly on its own session, which the server shows holding the key.
func TestReview25LeaderHealthBusyPool(t *testing.T) {
	bg := context.Background()
	key := pgtest.UniqueKey(t)
	pool := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool)
	ld, err := lk.Leader(key, pglock.LeaderConfig{Identity: "r25-busy"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(bg)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Go(func() { _ = ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) })
	locktest.WaitFor(t, "lead", ld.IsLeader)
	if err := ld.CheckHealth(bg); err != nil {
		t.Fatalf("CheckHealth of a sound leader = %v", err)
	}
	// The application's work takes every pool connection for a while.
	var conns []*pgxpool.Conn
	for range 2 {
		c, err := pool.Acquire(bg)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	defer func() {
		for _, c := range conns {
			c.Release()
		}
	}()
	time.Sleep(600 * time.Millisecond) // past the cached result
	if !ld.IsLeader() {
		t.Fatal("no longer leads")
	}
	err = ld.CheckHealth(bg)
	if err != nil {
		t.Errorf("DEFECT: CheckHealth of a leader whose session holds its key, with the pool busy with other work = %v\n"+
			"(wired to a liveness probe, as documented, this restarts a sound leader whenever the application uses its whole pool)", err)
	}
}

// DEFECT: a Locker's CheckHealth overruns its documented bound ("each
// bounded by twice the interval") when the network goes silent: with 16
// concurrent callers right after a blackhole, calls take 4 intervals (2 s at
// the default 500 ms, past Kubernetes' default 1 s probe timeout that the
// doc recommends). The check request is queued behind a statement in flight
// on the lock connection (bounded by statementBound, 2 intervals) and, once
// handed the connection, is flushed with a bound of its own (another 2
// intervals): the ctx of reach is honoured only while the request is queued.
// After the network comes back the check is nil again (that held).
// INTERMITTENT: the overrun depends on where the silence catches the
// connection's traffic; it showed in about half of 5-cycle runs (and with
// the default interval a 16-caller run saw 2 s calls), not in every run.
func TestReview25LockerHealthSilentNetwork(t *testing.T) {
	const interval = 200 * time.Millisecond
	bg := context.Background()
	proxy, pool := faultProxyPool(t, 4)
	defer proxy.Restore()
	lk := muxLocker(t, pool, pglock.WithLostCheckInterval(interval))
	key := pgtest.UniqueKey(t)
	var worstAll time.Duration
	for cycle := range 5 {
		if err := lk.Do(bg, key, func(context.Context) error { return nil }); err != nil {
			t.Fatal(err)
		}
		if err := lk.CheckHealth(bg); err != nil {
			t.Fatalf("healthy: %v", err)
		}
		time.Sleep(time.Duration(rand.IntN(int(interval))))
		proxy.Blackhole()
		cut := time.Now()
		var wg sync.WaitGroup
		var healthy atomic.Int32
		var worst atomic.Int64
		until := time.Now().Add(1500 * time.Millisecond)
		for range 16 {
			wg.Go(func() {
				for time.Now().Before(until) {
					t0 := time.Now()
					err := lk.CheckHealth(bg)
					if d := int64(time.Since(t0)); d > worst.Load() {
						worst.Store(d)
					}
					if err == nil && t0.Sub(cut) > 3*interval {
						healthy.Add(1) // a fresh check while silent said healthy
					}
					time.Sleep(time.Duration(rand.IntN(20)) * time.Millisecond)
				}
			})
		}
		wg.Wait()
		w := time.Duration(worst.Load())
		worstAll = max(worstAll, w)
		t.Logf("cycle %d: worst CheckHealth while silent: %v", cycle, w)
		if n := healthy.Load(); n > 0 {
			t.Errorf("%d CheckHealth calls said healthy late in the silence", n)
		}
		proxy.Restore()
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := lk.CheckHealth(bg)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("still unhealthy 10 s after the network came back: %v", err)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if w > 2*interval+300*time.Millisecond {
			break
		}
	}
	if worstAll > 2*interval+300*time.Millisecond {
		t.Errorf("DEFECT: a CheckHealth call took %v; documented bound twice the interval (%v)", worstAll, 2*interval)
	}
}

// HELD? A Semaphore of 3 on three Lockers each with WithWaitConns(1) (the
// head waits for one slot in the server and polls the others), 24
// goroutines, random cancels: never more than 3 functions at once, no
// Locker over its session budget, every goroutine gets turns, nothing left
// in pg_locks.
func TestReview25SemaphoreOneWaitConn(t *testing.T) {
	const n, replicas, goroutines = 3, 3, 8
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	var lks []*pglock.Locker
	var sems []*pglock.Semaphore
	for range replicas {
		lk := muxLocker(t, pgtest.Pool(t, 4), pglock.WithWaitConns(1), pglock.WithLockConns(1))
		s, err := lk.Semaphore(name, n)
		if err != nil {
			t.Fatal(err)
		}
		lks, sems = append(lks, lk), append(sems, s)
	}
	var ov locktest.Overlap
	var overBudget atomic.Int32
	turns := make([]atomic.Int32, replicas*goroutines)
	until := time.Now().Add(4 * time.Second)
	var wg sync.WaitGroup
	wg.Go(func() {
		for time.Now().Before(until) {
			for _, lk := range lks {
				if s := lk.Stats(); s.Sessions > s.MaxSessions || s.Sessions > 2 {
					overBudget.Add(1)
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	})
	for g := range replicas * goroutines {
		s := sems[g%replicas]
		wg.Go(func() {
			for time.Now().Before(until) {
				ctx, cancel := context.WithTimeout(bg, time.Duration(20+rand.IntN(400))*time.Millisecond)
				err := s.Do(ctx, func(ctx context.Context) error {
					ov.Enter()
					defer ov.Leave()
					turns[g].Add(1)
					time.Sleep(time.Duration(1+rand.IntN(5)) * time.Millisecond)
					return nil
				})
				cancel()
				if err != nil && !errors.Is(err, pglock.ErrNotAcquired) {
					t.Errorf("Do: %v", err)
				}
			}
		})
	}
	wg.Wait()
	minTurns := int32(1 << 30)
	for i := range turns {
		minTurns = min(minTurns, turns[i].Load())
	}
	t.Logf("max at once %d, fewest turns %d", ov.Max(), minTurns)
	if ov.Max() > n {
		t.Errorf("%d functions ran at once, semaphore of %d", ov.Max(), n)
	}
	if overBudget.Load() > 0 {
		t.Errorf("a Locker went over WithLockConns(1)+WithWaitConns(1) in %d samples", overBudget.Load())
	}
	if minTurns == 0 {
		t.Errorf("a goroutine never got a slot in 4 s")
	}
	pgtestWaitNoLocks(t, watch, lks[0], name, n)
}

// HELD? pg_terminate_backend of the sessions that hold slots (and of those
// that wait for them): a holder whose slot is killed sees its function's
// context cancelled with cause ErrLockLost, and Do returns ErrLockLost; no
// error but ErrNotAcquired / ErrLockLost; nothing left in pg_locks.
func TestReview25SemaphoreKills(t *testing.T) {
	const n, replicas, goroutines = 3, 3, 6
	bg := context.Background()
	watch := pgtest.Pool(t, 4)
	name := pgtest.UniqueKey(t)
	var lks []*pglock.Locker
	var sems []*pglock.Semaphore
	for range replicas {
		lk := muxLocker(t, pgtest.Pool(t, 4), pglock.WithLostCheckInterval(100*time.Millisecond))
		s, err := lk.Semaphore(name, n)
		if err != nil {
			t.Fatal(err)
		}
		lks, sems = append(lks, lk), append(sems, s)
	}
	var keys []pglock.Key
	for i := range n {
		keys = append(keys, locktest.Key(t, lks[0], fmt.Sprintf("%s#%d", name, i)))
	}
	keys = append(keys, locktest.Key(t, lks[0], name+"#queue"))
	var live atomic.Int32
	var maxLive atomic.Int32
	var lostSeen, lostNotSaid, otherErr atomic.Int32
	until := time.Now().Add(4 * time.Second)
	var wg sync.WaitGroup
	wg.Go(func() { // the killer
		for time.Now().Before(until) {
			time.Sleep(time.Duration(50+rand.IntN(150)) * time.Millisecond)
			k := keys[rand.IntN(len(keys))]
			hs, err := pgtest.Holders(bg, watch, k)
			if err != nil || len(hs) == 0 {
				continue
			}
			h := hs[rand.IntN(len(hs))]
			_, _ = watch.Exec(bg, "SELECT pg_terminate_backend($1)", h.PID)
		}
	})
	for g := range replicas * goroutines {
		s := sems[g%replicas]
		wg.Go(func() {
			for time.Now().Before(until) {
				ctx, cancel := context.WithTimeout(bg, time.Duration(50+rand.IntN(400))*time.Millisecond)
				var cause error
				err := s.Do(ctx, func(fctx context.Context) error {
					l := live.Add(1)
					for {
						m := maxLive.Load()
						if l <= m || maxLive.CompareAndSwap(m, l) {
							break
						}
					}
					select {
					case <-fctx.Done():
					case <-time.After(time.Duration(5+rand.IntN(40)) * time.Millisecond):
					}
					live.Add(-1)
					cause = context.Cause(fctx)
					return nil
				})
				cancel()
				switch {
				case errors.Is(cause, pglock.ErrLockLost):
					lostSeen.Add(1)
					if !errors.Is(err, pglock.ErrLockLost) {
						lostNotSaid.Add(1)
						t.Logf("fn's context lost, Do = %v", err)
					}
				case err == nil, errors.Is(err, pglock.ErrNotAcquired), errors.Is(err, pglock.ErrLockLost):
				default:
					otherErr.Add(1)
					t.Logf("Do: %v", err)
				}
			}
		})
	}
	wg.Wait()
	t.Logf("max live %d, losses seen %d, other errors %d", maxLive.Load(), lostSeen.Load(), otherErr.Load())
	// Not asserted: after a kill, a lost holder runs on until it reads the
	// loss (the documented window), and one lock connection may hold
	// several slots, so up to 2n functions can overlap for that window.
	if lostNotSaid.Load() > 0 {
		t.Errorf("%d Dos whose function's context was lost did not return ErrLockLost", lostNotSaid.Load())
	}
	pgtestWaitNoLocks(t, watch, lks[0], name, n)
}
