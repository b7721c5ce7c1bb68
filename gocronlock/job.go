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
// it runs the function, and the others skip the run. Make it with [Func] and
// give its Run method to gocron.NewTask:
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
// cancelled when the lock is lost, and a MaxRun deadline. A Job takes its own
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
	log     logger
	running atomic.Bool
}

// Func returns a Job that runs fn under the lock of the key
// [DefaultNamespace] + name (see [WithNamespace]): the key a [Locker] takes
// for a gocron job of that name, so that replicas that lock the job either
// way exclude each other. Options: [WithScope], [WithMinHold],
// [WithMaxRun], [WithNamespace], [WithLogger].
//
// fn's context is the one gocron gives Run, cancelled also when the lock is
// lost (its connection died: context.Cause is pglock.ErrLockLost) or when
// [WithMaxRun] passes (cause [ErrMaxRunExceeded]). In Transaction scope it
// carries the lock's transaction (pglock.TxFromContext): fn's writes commit
// with the lock when fn returns nil, and roll back when it returns an error
// or panics.
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
	lockOpts := append([]pglock.Option{pglock.WithRollbackOnError(true)}, cfg.lockOpts...)
	l, err := lockOf(locker, cfg.namespace+name, lockOpts...)
	if err != nil {
		return nil, fmt.Errorf("gocronlock: job %q: %w", name, err)
	}
	return &Job{
		name: name, lock: l, fn: fn, minHold: cfg.minHold, maxRun: cfg.maxRun,
		log: logger{l: cfg.log, kv: []any{"job", name, "key", l.Key().String()}},
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
// It returns nil when the run was skipped (the lock is held elsewhere, or an
// earlier run of this Job is still going here; logged, see [WithLogger]):
// a skip is not a failure of the job. It returns the function's error when
// the function ran (joined with a release error, matching
// pglock.ErrLockLost when the lock was lost during the run), and pglock's
// error (matching pglock.ErrNotAcquired) when the lock could not be tried.
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
// not be tried (err matches pglock.ErrNotAcquired), or that the job is
// locked twice ([ErrLockedTwice]); (true, err) that the function ran and
// err is its error, joined with any release error.
//
// The lock is released when the function returns and [WithMinHold] has
// passed.
func (j *Job) TryRun(ctx context.Context) (bool, error) {
	if j == nil {
		return false, fmt.Errorf("%w: Run called on a nil *gocronlock.Job", ErrNilFunc)
	}
	if ctx == nil {
		return false, fmt.Errorf("gocronlock: job %q: %w: nil context", j.name, pglock.ErrNotAcquired)
	}
	if !j.running.CompareAndSwap(false, true) {
		j.log.info("gocronlock: skip", "reason", "still running here")
		return false, nil
	}
	defer j.running.Store(false)
	ok, err := j.lock.TryDo(ctx, j.hold)
	switch {
	case ok:
		return true, err
	case err != nil:
		err = fmt.Errorf("gocronlock: job %q: %w", j.name, err)
		j.log.error(err, "gocronlock: lock not acquired")
		return false, err
	case outer.has(j.lock.Key()):
		err = fmt.Errorf("%w: job %q (key %s)", ErrLockedTwice, j.name, j.lock.Key())
		j.log.error(err, "gocronlock: job not run")
		return false, err
	default:
		j.log.info("gocronlock: skip", "reason", "held elsewhere")
		return false, nil
	}
}

// hold runs the function on the held lock, and keeps the lock until MinHold
// has passed since the start, even when the function fails or panics.
func (j *Job) hold(ctx context.Context) error {
	start := time.Now()
	if j.log.enabled() {
		// Log a loss when it happens, not when the function gets round to
		// returning; and before the run returns.
		logged := make(chan struct{})
		stop := context.AfterFunc(ctx, func() {
			defer close(logged)
			if cause := context.Cause(ctx); errors.Is(cause, pglock.ErrLockLost) {
				j.log.warn(cause, "gocronlock: lock lost during run")
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
