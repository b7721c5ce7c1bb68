package gocronlock_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-co-op/gocron/v2"
	"github.com/google/uuid"

	"github.com/pglockkit/kit/gocronlock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// lockErrs collects what gocron hands AfterLockError listeners.
type lockErrs struct {
	mu   sync.Mutex
	errs []error
}

func (l *lockErrs) listener() gocron.EventListener {
	return gocron.AfterLockError(func(_ uuid.UUID, _ string, err error) {
		l.mu.Lock()
		l.errs = append(l.errs, err)
		l.mu.Unlock()
	})
}

func (l *lockErrs) all() []error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]error(nil), l.errs...)
}

// TestThreeSchedulersEachTickOnce: three gocron schedulers, each with its
// own pool, *pglock.Locker and gocronlock Locker (WithDistributedLocker),
// run the same job every second (a CronJob with seconds) for 4 s. Each tick
// runs exactly once across them: never twice, never on two replicas at once
// (an in-process counter and pg_locks, read from a fourth pool, agree), and
// no tick between the first and the last is missed. The replicas that lose
// a tick get an AfterLockError matching ErrBusy, never a database error.
func TestThreeSchedulersEachTickOnce(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 2)
	var log tickLog
	var lerrs lockErrs
	var key pglock.Key
	ss := make([]gocron.Scheduler, 3)
	for i, lk := range newLockers(t, 3) {
		gl, err := gocronlock.NewLocker(lk, gocronlock.WithMinHold(700*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		if key, err = gl.Key(name); err != nil {
			t.Fatal(err)
		}
		ss[i] = newScheduler(t, gocron.WithDistributedLocker(gl))
		_, err = ss[i].NewJob(gocron.CronJob("* * * * * *", true), gocron.NewTask(func(ctx context.Context) {
			defer log.enter(time.Now().Truncate(time.Second), i)()
			// Not the job's context: the test's shutdown cancels it while
			// the last run may still be reading (make test, loaded: "err
			// context canceled"); the lock must be held until the run ends
			// all the same.
			pids, err := grantedPIDs(context.WithoutCancel(ctx), obs, key)
			if err != nil || len(pids) != 1 {
				log.problem("replica %d: pg_locks holders %v, err %v; want exactly one", i, pids, err)
			}
			time.Sleep(100 * time.Millisecond) // the work
		}), gocron.WithName(name), gocron.WithEventListeners(lerrs.listener()))
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range ss {
		s.Start()
	}
	// Four ticks come within 4 s on an idle machine; a loaded one may take
	// longer, which says nothing of the lock.
	waitFor(20*time.Second, func() bool { ticks, _, _ := log.ticks(); return len(ticks) >= 4 })
	shutdown(t, ss...)

	ticks, runs, listing := log.ticks()
	t.Logf("runs:\n%s", listing)
	for _, p := range log.problems {
		t.Error(p)
	}
	for _, tick := range ticks {
		if n := len(runs[tick]); n != 1 {
			t.Errorf("tick %s ran %d times, want once", tick.Format("15:04:05"), n)
		}
	}
	if len(ticks) < 3 {
		t.Fatalf("%d ticks ran in 20 s, want at least 3", len(ticks))
	}
	// A tick whose lock is still held (MinHold 700 ms after the previous
	// run) is skipped on every replica, as documented: a loaded machine can
	// stretch a hold past the next tick. Said, not failed.
	if span := ticks[len(ticks)-1].Sub(ticks[0]); span != time.Duration(len(ticks)-1)*time.Second {
		t.Logf("ticks %v apart from first to last, and %d ran: a tick was skipped (its lock was still held)", span, len(ticks))
	}
	busy := lerrs.all()
	for _, err := range busy {
		if !errors.Is(err, gocronlock.ErrBusy) || errors.Is(err, pglock.ErrNotAcquired) {
			t.Errorf("AfterLockError got %v, want an error matching ErrBusy only", err)
		}
	}
	if len(busy) < len(ticks) {
		t.Errorf("%d AfterLockError calls for %d ticks on three replicas, want two per tick", len(busy), len(ticks))
	}
	pgtest.WaitFree(t, obs, key)
}

// TestSplayNeedsMinHold: gocron's DurationJob counts from each scheduler's
// start, so three replicas started 150 ms apart fire "the same" tick at
// three instants. A 20 ms job releases its lock long before the later
// replicas fire. With MinHold (800 ms) above the splay the job runs once a
// second; without it (the control, which shows the test can fail) it runs
// at every replica's tick, three times a second.
func TestSplayNeedsMinHold(t *testing.T) {
	t.Parallel()
	run := func(t *testing.T, opts ...gocronlock.Option) (gaps []time.Duration) {
		name := pgtest.UniqueKey(t)
		obs := pgtest.Pool(t, 1)
		var log tickLog
		var key pglock.Key
		ss := make([]gocron.Scheduler, 3)
		for i, lk := range newLockers(t, 3) {
			gl, err := gocronlock.NewLocker(lk, opts...)
			if err != nil {
				t.Fatal(err)
			}
			key, _ = gl.Key(name)
			ss[i] = newScheduler(t, gocron.WithDistributedLocker(gl))
			_, err = ss[i].NewJob(gocron.DurationJob(time.Second), gocron.NewTask(func() {
				defer log.enter(time.Now(), i)()
				time.Sleep(20 * time.Millisecond)
			}), gocron.WithName(name))
			if err != nil {
				t.Fatal(err)
			}
		}
		for _, s := range ss {
			s.Start()
			time.Sleep(150 * time.Millisecond)
		}
		time.Sleep(3200 * time.Millisecond)
		shutdown(t, ss...)
		for _, p := range log.problems {
			t.Error(p)
		}
		runs := log.runsSince(time.Time{})
		for i := 1; i < len(runs); i++ {
			gaps = append(gaps, runs[i].at.Sub(runs[i-1].at).Round(time.Millisecond))
		}
		t.Logf("%d runs, gaps between them: %v", len(runs), gaps)
		pgtest.WaitFree(t, obs, key)
		return gaps
	}
	t.Run("MinHold", func(t *testing.T) {
		t.Parallel()
		gaps := run(t, gocronlock.WithMinHold(800*time.Millisecond))
		if len(gaps) < 2 {
			t.Errorf("%d runs, want at least 3", len(gaps)+1)
		}
		for _, g := range gaps {
			if g < 700*time.Millisecond {
				t.Errorf("two runs %v apart with MinHold covering the splay: a tick ran twice", g)
			}
		}
	})
	t.Run("control without MinHold", func(t *testing.T) {
		t.Parallel()
		short := 0
		for _, g := range run(t) {
			if g < 500*time.Millisecond {
				short++
			}
		}
		if short == 0 {
			t.Error("no tick ran twice without MinHold: the splay test cannot fail")
		}
	})
}

// TestUnlockDuringShutdown: Shutdown while a job runs cancels the job's
// context, which gocron then passes to Unlock; the lock is released anyway,
// and a MinHold wait (a minute here) is cut short: when Shutdown returns,
// pg_locks has no holder of the key.
func TestUnlockDuringShutdown(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 1)
	gl, err := gocronlock.NewLocker(newLockers(t, 1)[0], gocronlock.WithMinHold(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	key, _ := gl.Key(name)
	s := newScheduler(t)
	started, cancelled := make(chan struct{}), make(chan error, 1)
	_, err = s.NewJob(gocron.DurationJob(time.Hour), gocron.NewTask(func(ctx context.Context) {
		close(started)
		<-ctx.Done()
		cancelled <- ctx.Err()
	}), gocron.WithName(name), gocron.WithDistributedJobLocker(gl),
		gocron.WithStartAt(gocron.WithStartImmediately()))
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("the job did not start within 5 s")
	}
	if hs := pgtest.Granted(t, obs, key); len(hs) != 1 {
		t.Fatalf("pg_locks holders of %s during the run: %+v, want one", key, hs)
	}
	t0 := time.Now()
	if err := s.Shutdown(); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	took := time.Since(t0)
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Errorf("job context: %v, want context.Canceled", err)
	}
	if hs := pgtest.Granted(t, obs, key); len(hs) != 0 {
		t.Errorf("pg_locks holders of %s after Shutdown returned: %+v, want none", key, hs)
	}
	if took > 3*time.Second {
		t.Errorf("Shutdown took %v: the MinHold wait was not cut short", took)
	}
	t.Logf("Shutdown took %v", took.Round(time.Millisecond))
	pgtest.WaitFree(t, obs, key)
}

// TestBusyAfterLockError: while another session holds the job's key, each
// run is skipped: the job's AfterLockError listener gets an error matching
// ErrBusy (and not pglock's errors, which mean a database problem), and the
// skip is logged. Once the key is free, the next run goes ahead.
func TestBusyAfterLockError(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 1)
	lks := newLockers(t, 2)
	var rec recLog
	gl, err := gocronlock.NewLocker(lks[0], gocronlock.WithLogger(&rec))
	if err != nil {
		t.Fatal(err)
	}
	other, err := lks[1].NewLock(gocronlock.DefaultNamespace + name) // another replica
	if err != nil {
		t.Fatal(err)
	}
	if err := other.Acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	var lerrs lockErrs
	var runs atomic.Int32
	s := newScheduler(t)
	_, err = s.NewJob(gocron.DurationJob(100*time.Millisecond), gocron.NewTask(func() { runs.Add(1) }),
		gocron.WithName(name), gocron.WithDistributedJobLocker(gl), gocron.WithEventListeners(lerrs.listener()))
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	if !waitFor(5*time.Second, func() bool { return len(lerrs.all()) >= 2 }) {
		t.Fatal("AfterLockError was not called twice within 5 s")
	}
	if n := runs.Load(); n != 0 {
		t.Errorf("the job ran %d time(s) while another session held its key", n)
	}
	for _, err := range lerrs.all() {
		if !errors.Is(err, gocronlock.ErrBusy) || errors.Is(err, pglock.ErrNotAcquired) {
			t.Errorf("AfterLockError got %v, want an error matching ErrBusy only", err)
		}
		if !strings.Contains(err.Error(), "held elsewhere") || !strings.Contains(err.Error(), name) {
			t.Errorf("error %q does not say that the job's lock is held elsewhere", err)
		}
	}
	if rec.Count("INFO gocronlock: skip", "job="+name, "reason=held elsewhere") == 0 {
		t.Errorf("no skip logged; log:\n%s", rec.String())
	}
	if err := other.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !waitFor(5*time.Second, func() bool { return runs.Load() > 0 }) {
		t.Error("the job did not run within 5 s of the key's release")
	}
	shutdown(t, s)
	key, _ := gl.Key(name)
	pgtest.WaitFree(t, obs, key)
}

// TestDatabaseDownIsNotBusy: when the database cannot be reached, Lock
// returns pglock's error (ErrNotAcquired, ErrUnavailable), never ErrBusy,
// so that an AfterLockError listener can alert on it.
func TestDatabaseDownIsNotBusy(t *testing.T) {
	t.Parallel()
	lk, err := pglock.NewLocker(pgtest.UnreachablePool(t))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	var rec recLog
	gl, err := gocronlock.NewLocker(lk, gocronlock.WithLogger(&rec))
	if err != nil {
		t.Fatal(err)
	}
	l, err := gl.Lock(context.Background(), "report")
	if l != nil || !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, pglock.ErrUnavailable) || errors.Is(err, gocronlock.ErrBusy) {
		t.Errorf("Lock = (%v, %v), want an error matching pglock.ErrNotAcquired and ErrUnavailable, not ErrBusy", l, err)
	}
	if rec.Count("ERROR gocronlock: lock not acquired", "job=report") != 1 {
		t.Errorf("log:\n%s", rec.String())
	}
}

// TestLockLostDuringRun: when the lock's connection dies during a run
// (here pg_terminate_backend of the session that holds it), Unlock reports
// pglock.ErrLockLost and logs it (gocron ignores Unlock's error); a second
// Unlock returns nil; the Locker takes the key again on a new connection.
func TestLockLostDuringRun(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 1)
	var rec recLog
	gl, err := gocronlock.NewLocker(newLockers(t, 1)[0], gocronlock.WithLogger(&rec))
	if err != nil {
		t.Fatal(err)
	}
	key, _ := gl.Key(name)
	ctx := context.Background()
	l, err := gl.Lock(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	hs := pgtest.Granted(t, obs, key)
	if len(hs) != 1 {
		t.Fatalf("pg_locks holders of %s: %+v, want one", key, hs)
	}
	pgtest.Terminate(t, obs, hs[0].PID)
	pgtest.WaitFree(t, obs, key)
	if err := l.Unlock(ctx); !errors.Is(err, pglock.ErrLockLost) {
		t.Errorf("Unlock after the connection died: %v, want pglock.ErrLockLost", err)
	}
	if err := l.Unlock(ctx); err != nil {
		t.Errorf("second Unlock: %v, want nil", err)
	}
	if rec.Count("WARN gocronlock: lock lost during run", "job="+name) != 1 {
		t.Errorf("log:\n%s", rec.String())
	}
	l, err = gl.Lock(ctx, name)
	if err != nil {
		t.Fatalf("Lock after the loss: %v", err)
	}
	if err := l.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, obs, key)
}
