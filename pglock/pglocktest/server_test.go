package pglocktest_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/pglock/pglocktest"
)

// replica returns a Locker on srv, closed when the test ends.
func replica(t *testing.T, srv *pglocktest.Server, opts ...pglock.Option) *pglock.Locker {
	t.Helper()
	lk, err := pglocktest.NewLocker(srv, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lk.Close() })
	return lk
}

func TestLoseClosesLost(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	a, b := replica(t, srv), replica(t, srv)
	key := keyOf(t, a, "k")
	l := newLock(t, a, "k")
	if !try(t, l) {
		t.Fatal("free key busy")
	}
	got := make(chan error, 1)
	go func() { got <- newLock(t, b, "k").Acquire(bounded(t)) }()
	waitFor(t, "b waits", func() bool { return len(srv.Waiters(key)) == 1 })
	if n := srv.Lose(key); n != 1 {
		t.Fatalf("Lose = %d, want 1", n)
	}
	select {
	case <-l.Lost(): // closed when Lose returns
	default:
		t.Fatal("Lost not closed when Lose returned")
	}
	if l.Held() {
		t.Fatal("Held after Lose")
	}
	if err := <-got; err != nil {
		t.Fatalf("the waiter after Lose: %v", err)
	}
	if hs := srv.Holders(key); len(hs) != 1 || hs[0].Replica != "replica-2" {
		t.Fatalf("holders %+v, want replica-2", hs)
	}
	if err := l.Release(bounded(t)); !errors.Is(err, pglock.ErrLockLost) {
		t.Fatalf("Release = %v", err)
	}
	if srv.Lose(keyOf(t, a, "free")) != 0 {
		t.Fatal("Lose of a free key lost something")
	}
}

func TestFailNext(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	lk := replica(t, srv)
	key := keyOf(t, lk, "k")
	srv.FailNext(key, pglock.ErrUnavailable)
	err := lk.Do(bounded(t), "k", func(context.Context) error { return nil })
	if !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, pglock.ErrUnavailable) {
		t.Fatalf("Do after FailNext = %v, want ErrNotAcquired and ErrUnavailable", err)
	}
	boom := errors.New("boom")
	srv.FailNext(key, boom)
	if _, err := newLock(t, lk, "k").TryAcquire(bounded(t)); !errors.Is(err, boom) {
		t.Fatalf("TryAcquire after FailNext = %v", err)
	}
	if err := lk.Do(bounded(t), "k", func(context.Context) error { return nil }); err != nil {
		t.Fatalf("the acquire after: %v", err)
	}
}

func TestBusyNextAndHoldElsewhere(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	lk := replica(t, srv)
	key := keyOf(t, lk, "k")
	srv.BusyNext(key)
	if ok, err := lk.TryDo(bounded(t), "k", func(context.Context) error { return nil }); ok || err != nil {
		t.Fatalf("TryDo after BusyNext = %v, %v", ok, err)
	}
	srv.BusyNext(key)
	l := newLock(t, lk, "k", pglock.WithWait(20*time.Millisecond))
	if err := l.Acquire(bounded(t)); !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Acquire after BusyNext = %v", err)
	}

	release := srv.HoldElsewhere(key)
	if hs := srv.Holders(key); len(hs) != 1 || hs[0].Replica != "elsewhere" || hs[0].Mode != pglock.Exclusive {
		t.Fatalf("holders %+v", hs)
	}
	if try(t, newLock(t, lk, "k")) {
		t.Fatal("a key held elsewhere was taken")
	}
	got := make(chan error, 1)
	go func() { got <- lk.Do(bounded(t), "k", func(context.Context) error { return nil }) }()
	waitFor(t, "the Do waits", func() bool { return len(srv.Waiters(key)) == 1 })
	release()
	release()
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	// Queued behind a holder, elsewhere holds when its turn comes.
	h := newLock(t, lk, "k")
	if !try(t, h) {
		t.Fatal("free key busy")
	}
	release = srv.HoldElsewhere(key)
	if ws := srv.Waiters(key); len(ws) != 1 || ws[0].Replica != "elsewhere" {
		t.Fatalf("waiters %+v", ws)
	}
	release2 := release
	releaseHold(t, h)
	if hs := srv.Holders(key); len(hs) != 1 || hs[0].Replica != "elsewhere" {
		t.Fatalf("holders after the release %+v", hs)
	}
	release2()
	if len(srv.Keys()) != 0 {
		t.Fatalf("keys left %v", srv.Keys())
	}
}

func releaseHold(t *testing.T, l *pglock.Lock) { t.Helper(); release(t, l) }

func TestCloseLosesHolds(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	a, b := replica(t, srv), replica(t, srv)
	l := newLock(t, a, "k")
	if !try(t, l) {
		t.Fatal("free key busy")
	}
	other := keyOf(t, a, "other")
	release := srv.HoldElsewhere(other)
	defer release()
	waitErr := make(chan error, 1)
	go func() { waitErr <- newLock(t, a, "other").Acquire(bounded(t)) }()
	waitFor(t, "a's wait", func() bool { return len(srv.Waiters(other)) == 1 })
	if st := a.Stats(); st.HeldKeys != 1 || st.Queued != 1 {
		t.Fatalf("stats %+v, want 1 held key and 1 queued", st)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-l.Lost(): // closed when Close returned
	default:
		t.Fatal("Lost not closed by Close")
	}
	if err := <-waitErr; !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, pglock.ErrLockerClosed) {
		t.Fatalf("wait ended by Close = %v", err)
	}
	if len(srv.Waiters(other)) != 0 {
		t.Fatal("the closed replica still waits")
	}
	if !try(t, newLock(t, b, "k")) {
		t.Fatal("a closed replica's key still busy")
	}
	if err := a.Do(bounded(t), "k", func(context.Context) error { return nil }); !errors.Is(err, pglock.ErrLockerClosed) {
		t.Fatalf("Do after Close = %v", err)
	}
}

func TestTransactionScopeRefused(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	if _, err := pglocktest.NewLocker(srv, pglock.WithScope(pglock.Transaction)); !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Fatalf("NewLocker in Transaction scope = %v", err)
	}
	lk := replica(t, srv)
	if _, err := lk.NewLock("k", pglock.WithScope(pglock.Transaction)); !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Fatalf("NewLock in Transaction scope = %v", err)
	}
	if _, err := pglocktest.NewLocker(nil); !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Fatalf("NewLocker(nil) = %v", err)
	}
}

func TestStatsAndTokens(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	lk := replica(t, srv, pglock.WithToken())
	if !lk.Pooled() {
		t.Fatal("not Pooled: the adapters would refuse it")
	}
	var tokens []int64
	for range 2 {
		err := lk.Do(bounded(t), "k", func(ctx context.Context) error {
			tok, _ := pglock.TokenFromContext(ctx)
			tokens = append(tokens, tok)
			if st := lk.Stats(); st.HeldKeys != 1 {
				t.Errorf("stats while holding %+v", st)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if len(tokens) != 2 || tokens[0] <= 0 || tokens[1] <= tokens[0] {
		t.Fatalf("tokens %v: want increasing", tokens)
	}
	if st := lk.Stats(); st != (pglock.LockerStats{}) {
		t.Fatalf("stats idle %+v", st)
	}
	if err := lk.CheckHealth(bounded(t)); err != nil {
		t.Fatal(err)
	}
}

func TestDoAllAndSemaphore(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	a, b := replica(t, srv), replica(t, srv)
	err := a.DoAll(bounded(t), []any{"x", "y"}, func(ctx context.Context) error {
		if ok, _ := b.TryDoAll(bounded(t), []any{"y", "z"}, func(context.Context) error { return nil }); ok {
			t.Error("TryDoAll took a key of a held set")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(srv.Keys()) != 0 {
		t.Fatalf("keys left %v", srv.Keys())
	}

	sa, err := a.Semaphore("sem", 2)
	if err != nil {
		t.Fatal(err)
	}
	sb, err := b.Semaphore("sem", 2)
	if err != nil {
		t.Fatal(err)
	}
	var now, peak atomic.Int32
	work := func(context.Context) error {
		if n := now.Add(1); n > peak.Load() {
			peak.Store(n)
		}
		time.Sleep(10 * time.Millisecond)
		now.Add(-1)
		return nil
	}
	errs := make(chan error, 6)
	for i := range 6 {
		s := sa
		if i%2 == 1 {
			s = sb
		}
		go func() { errs <- s.Do(bounded(t), work) }()
	}
	for range 6 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if p := peak.Load(); p < 1 || p > 2 {
		t.Fatalf("peak %d holders of a semaphore of 2", p)
	}
}

func TestLeader(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	a, b := replica(t, srv), replica(t, srv)
	cfg := pglock.LeaderConfig{MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond}
	cfg.Identity = "a"
	la, err := a.Leader("lead", cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Identity = "b"
	seen := make(chan string, 16)
	cfg.OnNewLeader = func(id string) {
		select {
		case seen <- id:
		default:
		}
	}
	lb, err := b.Leader("lead", cfg)
	if err != nil {
		t.Fatal(err)
	}
	key := la.Key()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	terms := make(chan string, 4)
	lost := make(chan error, 4)
	run := func(ld *pglock.Leader, id string) chan error {
		done := make(chan error, 1)
		go func() {
			done <- ld.Run(ctx, func(ctx context.Context) error {
				terms <- id
				<-ctx.Done()
				lost <- context.Cause(ctx)
				return context.Cause(ctx)
			})
		}()
		return done
	}
	da := run(la, "a")
	if got := <-terms; got != "a" {
		t.Fatalf("first term %q", got)
	}
	db := run(lb, "b")
	waitFor(t, "b campaigns", func() bool { return len(srv.Waiters(key)) == 1 })
	if hs := srv.Holders(key); len(hs) != 1 || hs[0].Leader != "a" {
		t.Fatalf("holders %+v", hs)
	}
	if id, ok, err := lb.CurrentLeader(bounded(t)); err != nil || !ok || id != "a" {
		t.Fatalf("CurrentLeader = %q, %v, %v", id, ok, err)
	}
	if err := la.CheckHealth(bounded(t)); err != nil {
		t.Fatalf("CheckHealth of the leader: %v", err)
	}
	srv.Lose(key) // a's term ends; b is elected
	if err := <-lost; !errors.Is(err, pglock.ErrLockLost) {
		t.Fatalf("a's term ended with %v", err)
	}
	if got := <-terms; got != "b" {
		t.Fatalf("second term %q", got)
	}
	waitFor(t, "OnNewLeader saw b", func() bool {
		for {
			select {
			case id := <-seen:
				if id == "b" {
					return true
				}
			default:
				return false
			}
		}
	})
	cancel()
	if err := <-da; !errors.Is(err, context.Canceled) {
		t.Fatalf("a's Run = %v", err)
	}
	if err := <-db; !errors.Is(err, context.Canceled) {
		t.Fatalf("b's Run = %v", err)
	}
}

// Two replicas, each holding one key in a Do and waiting for the other's
// in a nested Do: one wait ends with ErrDeadlock within about a second, the
// other is granted once that side lets go (as on PostgreSQL).
func TestDeadlockEnds(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	lks := [2]*pglock.Locker{replica(t, srv), replica(t, srv)}
	keys := [2][2]string{{"k1", "k2"}, {"k2", "k1"}}
	var holding sync.WaitGroup
	holding.Add(2)
	errs := make(chan error, 2)
	start := time.Now()
	for i := range 2 {
		go func() {
			errs <- lks[i].Do(bounded(t), keys[i][0], func(ctx context.Context) error {
				holding.Done()
				holding.Wait()
				return lks[i].Do(ctx, keys[i][1], func(context.Context) error { return nil })
			})
		}()
	}
	first := <-errs
	if !errors.Is(first, pglock.ErrDeadlock) || !errors.Is(first, pglock.ErrNotAcquired) {
		t.Fatalf("the first Do to end = %v, want ErrDeadlock", first)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("the cycle ended after %v", d)
	}
	if err := <-errs; err != nil {
		t.Fatalf("the other Do = %v, want granted", err)
	}
}
