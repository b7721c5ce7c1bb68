package gocronlock

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/pglockkit/kit/pglock"
)

// Job is a gocron task that runs its function on one replica at a time:
// at each run it tries the job's lock without waiting; the replica that gets
// it runs the function, and the others skip the run (with [WithTicks] each
// run waits for the lock, and the tick's record decides). Make it with
// [Func] and give its Run method to gocron.NewTask:
//
//	job, err := gocronlock.Func(locker, "billing", bill, gocronlock.WithScope(pglock.Transaction))
//	if err != nil {
//		return err
//	}
//	_, err = s.NewJob(gocron.CronJob("0 2 * * *", false), gocron.NewTask(job.Run),
//		gocron.WithName(job.Name()),
//		gocron.WithDisabledDistributedJobLocker(true)) // if the scheduler has a Locker
//
// gocron passes Run the job's context (a task function whose first parameter
// is a context.Context gets it), which gocron cancels at Shutdown, StopJobs
// and RemoveJob.
//
// Unlike a [Locker], which gocron asks for a lock around the job, a Job
// holds its lock itself, so it can give the function what gocron cannot:
// the lock's transaction (Transaction scope, see [WithScope]), a context
// cancelled when the lock is lost, a MaxRun deadline, and a record of the
// ticks run (exactly-once ticks, see [WithTicks]). A Job takes its own
// lock: do not also lock it with a scheduler's Locker under the same name
// (see [ErrLockedTwice]).
//
// A Job is safe for concurrent use. A run that starts while an earlier run of
// the same Job is still going on this replica is skipped ("still running
// here") without asking the database.
type Job struct {
	name    string
	lock    *pglock.Lock
	fn      func(ctx context.Context) error
	minHold time.Duration
	maxRun  time.Duration
	ticks   *Ticks // WithTicks
	tickJob string // the job's name in pglock's tick records: its lock's name, namespaces included
	log     logger
	running atomic.Bool
	// noTickLogged: a run found no tick (ErrNoTick) and said so at Error;
	// later ones say it at Debug.
	noTickLogged atomic.Bool
}

// Func returns a Job that runs fn under the lock of the key
// [DefaultNamespace] + name (see [WithNamespace]): the key a [Locker] takes
// for a gocron job of that name, so that replicas that lock the job either
// way exclude each other. Options: [WithScope], [WithTicks], [WithMinHold],
// [WithMaxRun], [WithNamespace], [WithLogger].
//
// fn's context is the one gocron gives Run, cancelled also when the lock is
// lost (its connection died: context.Cause is pglock.ErrLockLost) or when
// [WithMaxRun] passes (cause [ErrMaxRunExceeded]). In Transaction scope it
// carries the lock's transaction (pglock.TxFromContext): fn's writes commit
// with the lock when fn returns nil, and roll back when it returns an error
// or panics. With [WithTicks] it carries the run's tick too
// ([TickFromContext]), recorded in that transaction before fn runs. An
// error from fn is logged at Error (to slog.Default() unless [WithLogger]
// says otherwise) and returned by Run.
//
// A nil locker, an empty name, a nil fn, a bad option or a Locker that does
// not fit is an error ([ErrNilLocker], [ErrEmptyName], [ErrNilFunc],
// [ErrInvalidOption], or pglock's error when the options do not fit the
// Locker): nothing is checked later, at the first run. Func does not talk to
// the database.
func Func(locker *pglock.Locker, name string, fn func(ctx context.Context) error, opts ...Option) (*Job, error) {
	if locker == nil {
		return nil, ErrNilLocker
	}
	if name == "" {
		return nil, fmt.Errorf("%w: Func was given an empty job name", ErrEmptyName)
	}
	if fn == nil {
		return nil, fmt.Errorf("%w: Func(%q)", ErrNilFunc, name)
	}
	cfg, err := newConfig(forFunc, opts)
	if err != nil {
		return nil, fmt.Errorf("gocronlock: job %q: %w", name, err)
	}
	// The function's outcome decides the commit, whatever the Locker's
	// RollbackOnError says.
	lockOpts := []pglock.Option{pglock.WithRollbackOnError(true)}
	scope := locker.Scope()
	if cfg.scope != nil {
		scope = *cfg.scope
		lockOpts = append(lockOpts, pglock.WithScope(scope))
	}
	if cfg.ticks != nil && scope != pglock.Transaction {
		return nil, fmt.Errorf("gocronlock: job %q: %w: WithTicks records each tick in the lock's transaction:"+
			" it needs Transaction scope (gocronlock.WithScope(pglock.Transaction))", name, ErrInvalidOption)
	}
	l, err := lockOf(locker, cfg.namespace+name, lockOpts...)
	if err != nil {
		return nil, fmt.Errorf("gocronlock: job %q: %w", name, err)
	}
	return &Job{
		name: name, lock: l, fn: fn, minHold: cfg.minHold, maxRun: cfg.maxRun,
		ticks: cfg.ticks, tickJob: l.Name(),
		log: cfg.newLogger("job", name, "key", l.Key().String()),
	}, nil
}

// Name returns the job's name, as given to Func: give it to gocron.WithName.
func (j *Job) Name() string { return j.name }

// Key returns the job's lock key, for finding it in pg_locks: the Locker's
// key for the namespace + name.
func (j *Job) Key() pglock.Key { return j.lock.Key() }

// Run is the task function to give to gocron.NewTask: it runs one tick with
// ctx (gocron's job context) as the parent of the function's context.
//
// It returns nil when the run was skipped (the lock is held elsewhere, an
// earlier run of this Job is still going here, or, with [WithTicks], the
// tick already ran; logged, see [WithLogger]): a skip is not a failure of
// the job. It returns the function's error when the function ran (joined
// with a release error, matching pglock.ErrLockLost when the lock was lost
// during the run), pglock's error (matching pglock.ErrNotAcquired) when the
// lock could not be tried, and with WithTicks an error when the tick could
// not be recorded (matching pglock.ErrSchema without the pglock schema) or
// gocron reported none ([ErrNoTick]).
// gocron hands a returned error to the job's AfterJobRunsWithError
// listener. Use [Job.TryRun] to know whether the function ran.
//
// A panic in the function is re-raised after the lock is released (in
// Transaction scope, after the transaction is rolled back), for gocron's
// AfterJobRunsWithPanic listener, or the process, to see.
func (j *Job) Run(ctx context.Context) error {
	_, err := j.TryRun(ctx)
	return err
}

// TryRun is [Job.Run] that also reports whether the function ran, for
// callers that drive a Job themselves (a "run now" button, a test).
// (false, nil) means the run was skipped; (false, err) that the lock could
// not be tried (err matches pglock.ErrNotAcquired), that the job is
// locked twice ([ErrLockedTwice]), or, with [WithTicks], that the tick could
// not be recorded or gocron reported none ([ErrNoTick]: a Job with ticks run
// by hand needs [Job.TryRunTick]); (true, err) that the function ran and err
// is its error, joined with any release error.
//
// The lock is released when the function returns and [WithMinHold] has
// passed.
func (j *Job) TryRun(ctx context.Context) (bool, error) {
	if j == nil {
		return false, fmt.Errorf("%w: Run called on a nil *gocronlock.Job", ErrNilFunc)
	}
	var tick time.Time
	if j.ticks != nil {
		at, ok := j.ticks.take(j.name)
		if !ok {
			err := fmt.Errorf("%w: job %q: %s", ErrNoTick, j.name, j.ticks.why())
			if j.noTickLogged.CompareAndSwap(false, true) {
				j.log.error(err, "gocronlock: job not run", "note", "later runs that find no tick are logged at Debug")
			} else {
				j.log.debug(err, "gocronlock: job not run")
			}
			return false, err
		}
		tick = at
	}
	return j.run(ctx, tick)
}

// TryRunTick is [Job.TryRun] for the run scheduled at tick, for a Job made
// [WithTicks] that the caller drives itself: a catch-up of a tick that no
// replica ran, a simulation, a test. The tick is recorded as gocron's would
// be, so a tick that already ran, by any replica, is skipped ((false, nil)).
// A zero tick is an error matching [ErrNoTick]. Without WithTicks the tick
// is ignored and TryRunTick is TryRun.
func (j *Job) TryRunTick(ctx context.Context, tick time.Time) (bool, error) {
	if j == nil {
		return false, fmt.Errorf("%w: Run called on a nil *gocronlock.Job", ErrNilFunc)
	}
	if j.ticks == nil {
		tick = time.Time{}
	} else if tick.IsZero() {
		return false, fmt.Errorf("%w: job %q: TryRunTick was given a zero tick", ErrNoTick, j.name)
	}
	return j.run(ctx, tick)
}

// run is one run, for the scheduled time tick (zero without WithTicks).
func (j *Job) run(ctx context.Context, tick time.Time) (bool, error) {
	log := j.log
	if !tick.IsZero() {
		log = j.log.withKV("tick", tick)
	}
	if ctx == nil {
		return false, fmt.Errorf("gocronlock: job %q: %w: nil context", j.name, pglock.ErrNotAcquired)
	}
	if !j.running.CompareAndSwap(false, true) {
		log.info("gocronlock: skip", "reason", "still running here")
		return false, nil
	}
	defer j.running.Store(false)
	var (
		held     bool  // the lock was taken
		claimErr error // the tick was not recorded: the function did not run
	)
	fn := func(ctx context.Context) error {
		held = true
		if !tick.IsZero() {
			if claimErr = j.claim(ctx, tick); claimErr != nil {
				return claimErr // rolls the transaction back
			}
			ctx = context.WithValue(ctx, tickKey{}, tick)
		}
		return j.hold(ctx, log)
	}
	var err error
	if tick.IsZero() {
		held, err = j.lock.TryDo(ctx, fn)
	} else if !outer.has(j.lock.Key()) {
		// With ticks the record decides whether a tick runs, and the lock
		// only keeps runs apart: a run waits for it rather than skip its
		// tick because another run holds it (often a replica that is
		// behind, checking a tick that already ran).
		err = j.lock.Do(ctx, fn)
	}
	switch {
	case held && errors.Is(claimErr, errTickRan):
		log.info("gocronlock: skip", "reason", "tick already ran")
		if err != claimErr { // joined with a release error
			log.error(err, "gocronlock: release failed")
		}
		return false, nil
	case held && claimErr != nil:
		log.error(err, "gocronlock: tick not recorded")
		return false, err
	case held:
		if err != nil {
			log.error(err, "gocronlock: run failed")
		}
		return true, err
	case err != nil:
		err = fmt.Errorf("gocronlock: job %q: %w", j.name, err)
		log.error(err, "gocronlock: lock not acquired")
		return false, err
	case outer.has(j.lock.Key()):
		err = fmt.Errorf("%w: job %q (key %s)", ErrLockedTwice, j.name, j.lock.Key())
		log.error(err, "gocronlock: job not run")
		return false, err
	default:
		log.info("gocronlock: skip", "reason", "held elsewhere")
		return false, nil
	}
}

// hold runs the function on the held lock, and keeps the lock until MinHold
// has passed since the start, even when the function fails or panics.
func (j *Job) hold(ctx context.Context, log logger) error {
	start := time.Now()
	if log.enabled() {
		// Log a loss when it happens, not when the function gets round to
		// returning; and before the run returns.
		logged := make(chan struct{})
		stop := context.AfterFunc(ctx, func() {
			defer close(logged)
			if cause := context.Cause(ctx); errors.Is(cause, pglock.ErrLockLost) {
				log.warn(cause, "gocronlock: lock lost during run")
			}
		})
		defer func() {
			if !stop() {
				<-logged
			}
		}()
	}
	if j.minHold > 0 {
		defer holdUntil(ctx, nil, start.Add(j.minHold))
	}
	if j.maxRun <= 0 {
		return j.fn(ctx)
	}
	ctx, cancel := context.WithTimeoutCause(ctx, j.maxRun, ErrMaxRunExceeded)
	defer cancel()
	err := j.fn(ctx)
	if err != nil && !errors.Is(err, ErrMaxRunExceeded) && errors.Is(context.Cause(ctx), ErrMaxRunExceeded) {
		err = fmt.Errorf("%w (%v): %w", ErrMaxRunExceeded, j.maxRun, err)
	}
	return err
}
