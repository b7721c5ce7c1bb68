package cronlock_test

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/robfig/cron/v3"

	"github.com/pglockkit/kit/cronlock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// tickLog records which replica ran which tick, and any overlap.
type tickLog struct {
	mu       sync.Mutex
	runs     map[time.Time][]int // tick -> replicas that ran it
	problems []string
	inFlight atomic.Int32
}

func (l *tickLog) ran(tick time.Time, replica int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.runs == nil {
		l.runs = map[time.Time][]int{}
	}
	l.runs[tick] = append(l.runs[tick], replica)
}

func (l *tickLog) problem(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.problems = append(l.problems, fmt.Sprintf(format, args...))
}

// enter marks a run in progress and reports an overlap; call the result when
// the run ends.
func (l *tickLog) enter(replica int) func() {
	if n := l.inFlight.Add(1); n > 1 {
		l.problem("replica %d started while %d other run(s) were in progress", replica, n-1)
	}
	return func() { l.inFlight.Add(-1) }
}

// summary returns the ticks in order, the number of ticks run more than
// once, and a readable listing.
func (l *tickLog) summary() (ticks int, dup int, listing string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	keys := make([]time.Time, 0, len(l.runs))
	for k := range l.runs {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i].Before(keys[j]) })
	for _, k := range keys {
		if len(l.runs[k]) > 1 {
			dup++
		}
		listing += fmt.Sprintf("  tick %s: replicas %v\n", k.Format("15:04:05.000"), l.runs[k])
	}
	return len(keys), dup, listing
}

// TestThreeReplicasEachTickOnce: three schedulers, each with its own Locker
// on its own pool, schedule the same "@every 1s" job for 5 s. The job never
// runs on two replicas at once (an in-process counter and pg_locks, read
// from a fourth pool, agree), and each tick runs at most once.
//
// The job takes 300 ms, and MinHold is 700 ms: cron fires "@every 1s" on
// whole seconds on every replica, but a replica that this busy machine
// schedules more than 300 ms late would otherwise find the lock free and run
// the tick again. TestSkewNeedsMinHold shows that case on purpose.
func TestThreeReplicasEachTickOnce(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 2)
	var log tickLog
	var key pglock.Key
	crons := make([]*cron.Cron, 3)
	for i, lk := range newLockers(t, 3) {
		job, err := cronlock.Func(lk, name, func(ctx context.Context) error {
			start := time.Now()
			defer log.enter(i)()
			pids, err := grantedPIDs(ctx, obs, key)
			if err != nil || len(pids) != 1 {
				log.problem("replica %d: pg_locks holders %v, err %v; want exactly one", i, pids, err)
			}
			select {
			case <-time.After(300 * time.Millisecond):
			case <-ctx.Done():
				log.problem("replica %d: ctx ended: %v", i, context.Cause(ctx))
			}
			log.ran(start.Truncate(time.Second), i)
			return nil
		}, cronlock.WithMinHold(700*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		key = job.Key()
		crons[i] = cron.New()
		if _, err := crons[i].AddJob("@every 1s", job); err != nil {
			t.Fatal(err)
		}
	}
	runCrons(crons, 5*time.Second)

	ticks, dup, listing := log.summary()
	t.Logf("runs:\n%s", listing)
	for _, p := range log.problems {
		t.Error(p)
	}
	if dup > 0 {
		t.Errorf("%d tick(s) ran more than once", dup)
	}
	if ticks < 3 {
		t.Errorf("%d ticks ran in 5 s, want at least 3", ticks)
	}
	pgtest.WaitFree(t, obs, key)
}

// skewed fires every whole second + offset: the schedule of a replica whose
// clock is offset behind. (Starting schedulers 300 ms apart would not do:
// cron's "@every 1s" rounds to whole seconds of each replica's clock.)
type skewed struct{ offset time.Duration }

func (s skewed) Next(t time.Time) time.Time {
	return t.Add(-s.offset).Truncate(time.Second).Add(time.Second + s.offset)
}

// TestSkewNeedsMinHold: three replicas whose clocks are 0, 150 and 300 ms
// behind run a 20 ms "@every 1s" job for about 4 s. With MinHold (800 ms)
// covering the skew, no tick runs twice. Without it (the control, which
// shows the test can fail), the lagging replicas find the lock free and run
// the same tick again.
func TestSkewNeedsMinHold(t *testing.T) {
	t.Parallel()
	run := func(t *testing.T, opts ...cronlock.Option) (ticks, dup int, problems []string) {
		name := pgtest.UniqueKey(t)
		obs := pgtest.Pool(t, 1)
		var log tickLog
		var key pglock.Key
		crons := make([]*cron.Cron, 3)
		for i, lk := range newLockers(t, 3) {
			offset := time.Duration(i) * 150 * time.Millisecond
			job, err := cronlock.Func(lk, name, func(ctx context.Context) error {
				start := time.Now()
				defer log.enter(i)()
				time.Sleep(20 * time.Millisecond)
				log.ran(start.Add(-offset).Truncate(time.Second), i)
				return nil
			}, opts...)
			if err != nil {
				t.Fatal(err)
			}
			key = job.Key()
			crons[i] = cron.New()
			crons[i].Schedule(skewed{offset}, job)
		}
		runCrons(crons, 4200*time.Millisecond)
		ticks, dup, listing := log.summary()
		t.Logf("runs:\n%s", listing)
		pgtest.WaitFree(t, obs, key)
		return ticks, dup, log.problems
	}

	t.Run("MinHold", func(t *testing.T) {
		t.Parallel()
		ticks, dup, problems := run(t, cronlock.WithMinHold(800*time.Millisecond))
		for _, p := range problems {
			t.Error(p)
		}
		if dup > 0 {
			t.Errorf("%d tick(s) ran more than once with MinHold covering the skew", dup)
		}
		if ticks < 3 {
			t.Errorf("%d ticks ran in 4.2 s, want at least 3", ticks)
		}
	})
	t.Run("control without MinHold", func(t *testing.T) {
		t.Parallel()
		// Runs never overlap here either (the 20 ms job ends long before
		// the next replica fires), but ticks repeat.
		ticks, dup, problems := run(t)
		for _, p := range problems {
			t.Error(p)
		}
		if dup == 0 {
			t.Errorf("no tick of %d ran twice without MinHold: the skew test cannot fail", ticks)
		}
	})
}

// TestLostBackendCancelsJob: three replicas run a Func job. The first run
// blocks on its context; the test kills the backend that holds the lock
// (found in pg_locks). The job's context is cancelled with cause
// pglock.ErrLockLost, the loss is logged, and the next tick runs on another
// replica, while the killed replica's job is still winding down (it lingers
// 1.5 s after the cancel, so its own next tick is skipped).
func TestLostBackendCancelsJob(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 2)
	var (
		victim   atomic.Int32
		started  = make(chan int, 1)
		cause    = make(chan error, 1)
		later    = make(chan laterRun, 16)
		rec      recLog
		key      pglock.Key
		released atomic.Int64 // unix nanos when the victim's job returned
	)
	victim.Store(-1)
	crons := make([]*cron.Cron, 3)
	for i, lk := range newLockers(t, 3) {
		job, err := cronlock.Func(lk, name, func(ctx context.Context) error {
			if !victim.CompareAndSwap(-1, int32(i)) {
				select {
				case later <- laterRun{i, time.Now()}:
				default:
				}
				return nil
			}
			started <- i
			select {
			case <-ctx.Done():
				cause <- context.Cause(ctx)
			case <-time.After(10 * time.Second):
				cause <- errors.New("job context not cancelled within 10 s")
			}
			time.Sleep(1500 * time.Millisecond)
			released.Store(time.Now().UnixNano())
			return ctx.Err()
		}, cronlock.WithLogger(&rec))
		if err != nil {
			t.Fatal(err)
		}
		key = job.Key()
		crons[i] = cron.New()
		if _, err := crons[i].AddJob("@every 1s", job); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range crons {
		c.Start()
	}
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		var wg sync.WaitGroup
		for _, c := range crons {
			wg.Go(func() { <-c.Stop().Done() })
		}
		wg.Wait()
	}
	defer stop()

	var v int
	select {
	case v = <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("no replica ran the job within 5 s")
	}
	pids := pgtest.Granted(t, obs, key)
	if len(pids) != 1 {
		t.Fatalf("pg_locks holders of %s: %+v, want one", key, pids)
	}
	killed := time.Now()
	pgtest.Terminate(t, obs, pids[0].PID)

	select {
	case err := <-cause:
		if !errors.Is(err, pglock.ErrLockLost) {
			t.Fatalf("job context cause = %v, want pglock.ErrLockLost", err)
		}
		t.Logf("replica %d: job context cancelled %v after the kill", v, time.Since(killed).Round(time.Millisecond))
	case <-time.After(5 * time.Second):
		t.Fatal("job context not cancelled within 5 s of the kill")
	}
	select {
	case lr := <-later:
		r := lr.replica
		if r == v {
			t.Errorf("the next tick ran on the killed replica %d, want another", r)
		}
		if lr.at.Before(killed) {
			t.Errorf("replica %d ran while replica %d held the lock", r, v)
		}
		if n := released.Load(); n != 0 {
			t.Errorf("the next tick ran after the killed replica's job returned; want it to run while that job still winds down")
		}
		t.Logf("replica %d ran the next tick, %v after the kill", r, time.Since(killed).Round(time.Millisecond))
	case <-time.After(3 * time.Second):
		t.Fatal("no other replica ran a tick within 3 s of the kill")
	}
	stop()
	if rec.Count("cronlock: lock lost during run", "job="+name) != 1 {
		t.Errorf("want one \"lock lost during run\" log line; log:\n%s", rec.String())
	}
	if rec.Count("cronlock: run failed", "lock lost") != 1 {
		t.Errorf("want one \"run failed\" line naming the lost lock; log:\n%s", rec.String())
	}
	pgtest.WaitFree(t, obs, key)
}

type laterRun struct {
	replica int
	at      time.Time
}

// TestPanicReleasesLockAndCronGoesOn: a job that panics at every tick, in a
// scheduler with cron.Recover in its chain. Each panic releases the lock
// (the next tick of the same replica, on whichever pooled connection, finds
// it free and runs) and cron keeps scheduling.
func TestPanicReleasesLockAndCronGoesOn(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 1)
	lk := newLockers(t, 1)[0]
	var runs atomic.Int32
	var rec recLog
	job, err := cronlock.Func(lk, name, func(ctx context.Context) error {
		runs.Add(1)
		panic("job panics")
	}, cronlock.WithLogger(&rec))
	if err != nil {
		t.Fatal(err)
	}
	c := cron.New(cron.WithChain(cron.Recover(&rec)))
	if _, err := c.AddJob("@every 1s", job); err != nil {
		t.Fatal(err)
	}
	runCrons([]*cron.Cron{c}, 3200*time.Millisecond)
	if n := runs.Load(); n < 2 {
		t.Errorf("the job ran %d time(s) in 3.2 s, want at least 2 (cron went on after a panic, and the lock was free again)", n)
	}
	if got, want := rec.Count("ERROR panic", "job panics"), int(runs.Load()); got != want {
		t.Errorf("cron.Recover logged %d panics, want %d; log:\n%s", got, want, rec.String())
	}
	if n := rec.Count("skip"); n != 0 {
		t.Errorf("%d tick(s) skipped: the lock was not released after a panic; log:\n%s", n, rec.String())
	}
	pgtest.WaitFree(t, obs, job.Key())
}
