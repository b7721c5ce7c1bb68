package cronlock

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/robfig/cron/v3"

	"github.com/pglockkit/kit/pglock"
)

// Job is a cron.Job that runs its work on one replica at a time: at each
// tick it tries the job's lock without waiting; the replica that gets it
// runs the work and the others skip the tick. Make it with [Func] or [Wrap]
// and give it to cron's AddJob or Schedule.
//
// A Job is safe for concurrent use. A tick that comes while an earlier run
// of the same Job is still going on this replica is skipped ("still running
// here") without asking the database, as cron.SkipIfStillRunning does.
type Job struct {
	name    string
	lock    *pglock.Lock
	cfg     config
	fn      func(ctx context.Context) error // Func's work, or
	job     cron.Job                        // Wrap's
	log     logger
	running atomic.Bool
}

// Func returns a Job that runs fn under the lock named name (the key is the
// Locker's key for [DefaultNamespace] + name unless [WithNamespace] says
// otherwise).
//
// fn's context is cancelled when the lock is lost (the lock's connection
// died: context.Cause is pglock.ErrLockLost), when [WithMaxRun] passes
// (cause [ErrMaxRunExceeded]) or when the base context ends (see
// [WithBaseContext]). In Transaction scope it carries the lock's
// transaction (pglock.TxFromContext), and with [WithTicks] the run's tick
// ([TickFromContext]). An error from fn is logged at Error (to
// slog.Default() unless [WithLogger] or [WithSlog] says otherwise) and
// returned by [Job.RunContext].
//
// A nil locker, an empty name, a nil fn or a bad option is an error
// ([ErrNilLocker], [ErrEmptyName], [ErrNilJob], [ErrInvalidOption], or
// pglock's error when the options do not fit the Locker); nothing is
// checked later, at the first tick. Func does not talk to the database.
func Func(locker *pglock.Locker, name string, fn func(ctx context.Context) error, opts ...Option) (*Job, error) {
	cfg, err := newConfig(locker, name, opts)
	if err != nil {
		return nil, err
	}
	if fn == nil {
		return nil, fmt.Errorf("%w: Func(%q) given a nil function", ErrNilJob, name)
	}
	return newJob(locker, name, cfg, fn, nil)
}

// Wrap returns a Job that runs job under the lock named name, as [Func]
// does. A cron.Job has no context: it cannot be cancelled when the lock is
// lost or [WithMaxRun] passes (both are logged), and in Transaction scope
// it cannot reach the lock's transaction. Prefer Func for new code.
//
// A nil locker, an empty name, a nil job or a bad option is an error, as
// for Func.
func Wrap(locker *pglock.Locker, name string, job cron.Job, opts ...Option) (*Job, error) {
	cfg, err := newConfig(locker, name, opts)
	if err != nil {
		return nil, err
	}
	if isNilJob(job) {
		return nil, fmt.Errorf("%w: Wrap(%q) given a nil cron.Job", ErrNilJob, name)
	}
	return newJob(locker, name, cfg, nil, job)
}

// newConfig checks the constructors' common arguments and applies opts.
func newConfig(locker *pglock.Locker, name string, opts []Option) (config, error) {
	cfg := defaultConfig()
	if locker == nil {
		return cfg, ErrNilLocker
	}
	if name == "" {
		return cfg, ErrEmptyName
	}
	for _, o := range opts {
		if o == nil {
			cfg.invalid("nil Option")
			continue
		}
		o(&cfg)
	}
	if len(cfg.errs) > 0 {
		// The first on one line (errors.Join would write each on its own).
		err := cfg.errs[0]
		if n := len(cfg.errs) - 1; n > 0 {
			err = fmt.Errorf("%w (and %d more)", err, n)
		}
		return cfg, fmt.Errorf("cronlock: job %q: %w", name, err)
	}
	cfg.errs = nil
	return cfg, nil
}

// newLock makes the lock of the job name: pglock checks the Locker, the key
// and the scope against each other here.
func (c *config) newLock(locker *pglock.Locker, name string) (*pglock.Lock, error) {
	// The job's success decides the commit, whatever the Locker's
	// RollbackOnError says.
	opts := []pglock.Option{pglock.WithRollbackOnError(true)}
	if c.scopeSet {
		opts = append(opts, pglock.WithScope(c.scope))
	}
	l, err := locker.NewLock(c.namespace+name, opts...)
	if err != nil {
		return nil, fmt.Errorf("cronlock: job %q: %w", name, err)
	}
	if !locker.Pooled() {
		// Ticks run on goroutines of their own: each hold needs a connection
		// of its own, or the session's locks stack instead of excluding.
		return nil, fmt.Errorf("cronlock: job %q: %w: %w: the Locker is on one connection or transaction; give it a pool (*pgxpool.Pool or *sql.DB)",
			name, ErrInvalidOption, pglock.ErrInvalidOption)
	}
	return l, nil
}

// logger returns the logger of the job name (its key, when known, named
// too): the options' loggers, or slog.Default() when none was given.
func (c *config) logger(name string, key *pglock.Key) logger {
	kv := []any{"job", name}
	if key != nil {
		kv = append(kv, "key", key.String())
	}
	return logger{cron: c.cronLog, slog: c.slog, def: !c.logSet, kv: kv}
}

// newJob makes a Job that runs fn, or else job.
func newJob(locker *pglock.Locker, name string, cfg config, fn func(context.Context) error, job cron.Job) (*Job, error) {
	l, err := cfg.newLock(locker, name)
	if err != nil {
		return nil, err
	}
	if cfg.ticks != nil && (cfg.scopeSet && cfg.scope != pglock.Transaction || !cfg.scopeSet && locker.Scope() != pglock.Transaction) {
		return nil, fmt.Errorf("cronlock: job %q: %w: WithTicks records each tick in the lock's transaction: it needs Transaction scope (cronlock.WithScope(pglock.Transaction))", name, ErrInvalidOption)
	}
	return &Job{name: name, lock: l, cfg: cfg, fn: fn, job: job, log: cfg.logger(name, new(l.Key()))}, nil
}

func isNilJob(job cron.Job) bool {
	if job == nil {
		return true
	}
	f, ok := job.(cron.FuncJob)
	return ok && f == nil
}

// Name returns the job's name, as given to the constructor.
func (j *Job) Name() string { return j.name }

// Key returns the job's lock key, for finding it in pg_locks: the Locker's
// key for the namespace + name.
func (j *Job) Key() pglock.Key { return j.lock.Key() }

// Run is cron's entry point: it runs one tick with the base context (see
// [WithBaseContext]) and logs the outcome, to slog.Default() unless
// [WithLogger] or [WithSlog] says otherwise: a skip and why at Info; a job
// error, a lock error and a job that could not run (with [WithTicks], the
// pglock schema missing) at Error; a lost lock at Warn. A panic in the job
// is re-raised after the lock is released, for cron.Recover to log.
func (j *Job) Run() {
	ctx := j.cfg.base
	if ctx.Err() != nil {
		j.log.info(slog.LevelInfo, "cronlock: skip", "reason", "context done")
		return
	}
	start := time.Now()
	res, err := j.tick(ctx)
	switch res {
	case heldElsewhere:
		j.log.info(slog.LevelInfo, "cronlock: skip", "reason", "held elsewhere")
	case runningHere:
		j.log.info(slog.LevelInfo, "cronlock: skip", "reason", "still running here")
	case tickRan:
		j.log.info(slog.LevelInfo, "cronlock: skip", "reason", "tick already ran")
	case notAcquired:
		j.log.error(slog.LevelError, err, "cronlock: lock not acquired")
	case notRun:
		j.log.error(slog.LevelError, err, "cronlock: job not run")
	case ran:
		if err != nil {
			j.log.error(slog.LevelError, err, "cronlock: run failed", "duration", time.Since(start))
			return
		}
		j.log.info(slog.LevelDebug, "cronlock: ran", "duration", time.Since(start))
	}
}

// RunContext runs one tick now, with ctx as the parent of the run's
// context, and reports whether the work ran. It is Run without the logging
// of the outcome, for callers that drive a Job themselves (a "run now"
// button, a test).
//
// It tries the lock without waiting (with [WithTicks], it waits for it).
// (false, nil) means the tick was skipped: the lock is held elsewhere, an
// earlier run of this Job is still going on this replica, or (with
// WithTicks) the tick already ran. (false, err) means the lock could not be
// tried (err matches pglock.ErrNotAcquired; a cancelled ctx is one case),
// or, with WithTicks, that the tick could not be recorded, so the work did
// not run (err matches pglock.ErrSchema without the pglock schema).
// (true, err) means the work ran: err is its error (matching
// [ErrMaxRunExceeded] when it ran past MaxRun), joined with a release
// error (matching pglock.ErrLockLost when the lock was lost during the run).
//
// The lock is released when the work returns and [WithMinHold] has passed.
// A panic in the work is re-raised after the lock is released (in
// Transaction scope, after the transaction is rolled back).
func (j *Job) RunContext(ctx context.Context) (bool, error) {
	res, err := j.tick(ctx)
	return res == ran, err
}

type result int

const (
	ran result = iota
	heldElsewhere
	runningHere
	notAcquired
	tickRan // WithTicks: the tick was run already, by this replica or another
	notRun  // WithTicks: the tick could not be named or recorded; the work did not run
)

// errTickRan ends a run whose tick was already recorded: it rolls back.
var errTickRan = errors.New("cronlock: tick already ran")

func (j *Job) tick(ctx context.Context) (result, error) {
	if !j.running.CompareAndSwap(false, true) {
		return runningHere, nil
	}
	defer j.running.Store(false)
	var ok bool
	var err error
	if j.cfg.ticks != nil {
		// The tick this run is for is the one cron started it at, fixed
		// now: a run that then waits for the lock (another replica's run
		// holds it) or starts late on a busy host must not take the next
		// tick's name, which would leave this tick unrun.
		now := j.cfg.now()
		tick := lastTick(j.cfg.ticks, now)
		if tick.IsZero() {
			return notRun, fmt.Errorf("cronlock: job %q: no tick of its schedule in the year before %s", j.name, now.Format(time.RFC3339))
		}
		// With ticks the record decides whether a tick runs; the lock only
		// keeps runs apart: wait for it, so that a tick whose run failed
		// elsewhere (its record rolled back) is run here, not skipped.
		var claimErr error
		err = j.lock.Do(ctx, func(ctx context.Context) error {
			return j.hold(context.WithValue(ctx, tickKey{}, tick), &claimErr)
		})
		switch {
		case errors.Is(claimErr, errTickRan):
			return tickRan, nil
		case claimErr != nil:
			return notRun, err // claimErr, with any release error
		}
		ok = err == nil || !errors.Is(err, pglock.ErrNotAcquired)
	} else {
		ok, err = j.lock.TryDo(ctx, func(ctx context.Context) error { return j.hold(ctx, nil) })
	}
	switch {
	case ok:
		return ran, err
	case err != nil:
		return notAcquired, err
	default:
		return heldElsewhere, nil
	}
}

// hold runs the work on the held lock and keeps the lock until MinHold has
// passed since the start, even when the work fails or panics. With ticks it
// first records the tick; claimErr gets the error when it could not (the
// work does not run then).
func (j *Job) hold(ctx context.Context, claimErr *error) error {
	start := time.Now()
	if j.log.enabled() {
		stop := context.AfterFunc(ctx, func() {
			if cause := context.Cause(ctx); errors.Is(cause, pglock.ErrLockLost) {
				j.log.error(slog.LevelWarn, cause, "cronlock: lock lost during run")
			}
		})
		defer stop()
	}
	if j.cfg.minHold > 0 {
		defer holdUntil(ctx, start.Add(j.cfg.minHold))
	}
	if j.cfg.ticks != nil {
		if err := j.claimTick(ctx); err != nil {
			*claimErr = err
			return err // rolls the transaction back
		}
	}
	if j.job != nil {
		return j.runJob()
	}
	return j.runFunc(ctx)
}

// runFunc runs Func's work with MaxRun as its context's deadline.
func (j *Job) runFunc(ctx context.Context) error {
	maxRun := j.cfg.maxRun
	if maxRun <= 0 {
		return j.fn(ctx)
	}
	ctx, cancel := context.WithTimeoutCause(ctx, maxRun, ErrMaxRunExceeded)
	defer cancel()
	err := j.fn(ctx)
	if err != nil && !errors.Is(err, ErrMaxRunExceeded) && errors.Is(context.Cause(ctx), ErrMaxRunExceeded) {
		err = fmt.Errorf("%w (%v): %w", ErrMaxRunExceeded, maxRun, err)
	}
	return err
}

// runJob runs Wrap's cron.Job. It has no context to cancel, so an overrun
// of MaxRun is only logged.
func (j *Job) runJob() error {
	if maxRun := j.cfg.maxRun; maxRun > 0 && j.log.enabled() {
		t := time.AfterFunc(maxRun, func() {
			j.log.error(slog.LevelWarn,
				fmt.Errorf("%w (%v): a cron.Job cannot be cancelled; the lock stays held until it returns", ErrMaxRunExceeded, maxRun),
				"cronlock: job overran")
		})
		defer t.Stop()
	}
	j.job.Run()
	return nil
}

// holdUntil waits until t, or until ctx ends (the lock was lost or the base
// context ended).
func holdUntil(ctx context.Context, t time.Time) {
	d := time.Until(t)
	if d <= 0 {
		return
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-ctx.Done():
	}
}

// claimTick records the tick this run is for (see WithTicks) in the lock's
// transaction; errTickRan when it was recorded already.
func (j *Job) claimTick(ctx context.Context) error {
	tick, _ := TickFromContext(ctx)
	var tx any
	if t, ok := pglock.TxFromContext(ctx); ok {
		tx = t
	} else if t, ok := pglock.SQLTxFromContext(ctx); ok {
		tx = t
	}
	// The lock's name: the Locker's namespace and the job's, as its key.
	claimed, err := pglock.ClaimTick(ctx, tx, j.lock.Name(), tick)
	switch {
	case err != nil:
		return fmt.Errorf("cronlock: job %q: %w", j.name, err)
	case !claimed:
		return errTickRan
	}
	return nil
}

type tickKey struct{}

// TickFromContext returns the tick (the schedule's time, on the replica's
// clock: see WithClock) that the run of a job made WithTicks is for, from
// the context its function gets (Func). The tick is fixed when cron starts
// the run, before it waits for the lock, so that a run that starts or waits
// late still records its own tick. It returns false outside such a run.
func TickFromContext(ctx context.Context) (time.Time, bool) {
	if ctx == nil {
		return time.Time{}, false
	}
	t, ok := ctx.Value(tickKey{}).(time.Time)
	return t, ok
}

// lastTick returns the last time at or before now that s fires at (the tick
// a run that starts now is for), or the zero time if there is none in the
// year before now. It looks back a second first, then further, so that a
// frequent schedule costs a few calls of Next.
func lastTick(s cron.Schedule, now time.Time) time.Time {
	for _, back := range []time.Duration{time.Second, time.Minute, time.Hour, 24 * time.Hour, 32 * 24 * time.Hour, 366 * 24 * time.Hour} {
		t := s.Next(now.Add(-back))
		if t.IsZero() || t.After(now) {
			continue
		}
		for {
			n := s.Next(t)
			if n.IsZero() || n.After(now) {
				return t
			}
			t = n
		}
	}
	return time.Time{}
}
