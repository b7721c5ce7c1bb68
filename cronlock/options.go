package cronlock

import (
	"context"
	"fmt"
	"log/slog"
	"reflect"
	"time"

	"github.com/robfig/cron/v3"

	"github.com/pglockkit/kit/pglock"
)

// DefaultNamespace is put in front of a job's name to make its lock key, so
// that a cron job never collides with a key of another feature (HTTP routes,
// River jobs) on the same database: the job "billing" locks "cron:billing"
// (under the Locker's own namespace, if it has one). Change it with
// [WithNamespace].
const DefaultNamespace = "cron:"

// Option configures [Func], [Wrap] and [SkipIfLocked]. Every option states
// its default; an option with a bad value makes the constructor return an
// error matching [ErrInvalidOption].
type Option func(*config)

type config struct {
	namespace string
	scope     pglock.Scope
	scopeSet  bool
	minHold   time.Duration
	maxRun    time.Duration
	cronLog   cron.Logger
	slog      *slog.Logger
	logSet    bool // WithLogger or WithSlog given: no slog.Default()
	base      context.Context
	ticks     cron.Schedule    // WithTicks
	now       func() time.Time // WithClock
	errs      []error
}

func defaultConfig() config {
	return config{namespace: DefaultNamespace, base: context.Background(), now: time.Now}
}

func (c *config) invalid(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalidOption}, args...)...))
}

// WithNamespace sets the prefix of the job's lock key: the key is the
// Locker's key for namespace + name. The default is [DefaultNamespace]
// ("cron:"); an empty ns locks the bare name.
func WithNamespace(ns string) Option {
	return func(c *config) { c.namespace = ns }
}

// WithScope sets the lock's scope. The default (without this option) is the
// Locker's scope, which is pglock.Session unless the Locker was made with
// pglock.WithScope.
//
// pglock.Session holds the lock on a connection of its own for the run;
// its loss (the connection dies) cancels a [Func] job's context.
//
// pglock.Transaction runs the job inside the lock's transaction: a Func job
// reaches it with pglock.TxFromContext (pglock.SQLTxFromContext on
// database/sql), and it commits when the job returns nil and rolls back when
// it returns an error or panics, whatever the Locker's RollbackOnError says.
// A cron.Job given to [Wrap] cannot see the transaction; it only gets the
// lock. Any other value is an error.
func WithScope(s pglock.Scope) Option {
	return func(c *config) {
		if s != pglock.Session && s != pglock.Transaction {
			c.invalid("WithScope(%v): want pglock.Session or pglock.Transaction", s)
			return
		}
		c.scope, c.scopeSet = s, true
	}
}

// WithMinHold keeps the lock for at least d after the run starts, even when
// the job finishes sooner (ShedLock's lockAtLeastFor): a replica whose clock
// is behind by less than d finds the lock held when its scheduler fires the
// same tick, and skips it. Pick d above the clock skew and the scheduling
// jitter between replicas, and below the interval between ticks. The run
// (and Run, and cron's Stop) returns only when the hold ends; in Transaction
// scope the transaction commits then. The hold ends early when the lock is
// lost or the base context (see [WithBaseContext]) ends.
//
// Zero (the default) releases the lock as soon as the job returns. A
// negative d is an error.
func WithMinHold(d time.Duration) Option {
	return func(c *config) {
		if d < 0 {
			c.invalid("WithMinHold(%v): negative", d)
			return
		}
		c.minHold = d
	}
}

// WithMaxRun bounds a run (ShedLock's lockAtMostFor, without the stale
// lock: an advisory lock ends with its session anyway). For a [Func] job,
// the job's context is cancelled after d, with cause [ErrMaxRunExceeded];
// the lock is released when the job returns, never under a running job. A
// cron.Job given to [Wrap] or [SkipIfLocked] cannot be cancelled: when it
// runs past d, that is logged, and the lock stays held until it returns.
//
// Zero (the default) sets no bound. A negative d is an error.
func WithMaxRun(d time.Duration) Option {
	return func(c *config) {
		if d < 0 {
			c.invalid("WithMaxRun(%v): negative", d)
			return
		}
		c.maxRun = d
	}
}

// WithLogger logs skips, failed runs and lost locks to a cron.Logger, so
// that users of cron.WithLogger see them next to cron's own messages: a skip
// and a finished run at Info level, a job error, a lost lock, an overrun, a
// lock error and a job that could not run at Error level. Every message
// names the job and key; a skip says why ("held elsewhere", "still running
// here", "context done", "tick already ran").
//
// Without WithLogger and [WithSlog], a job logs to slog.Default() (see
// WithSlog). Given WithLogger, it logs to l only, unless WithSlog is given
// too. A nil l logs nothing: WithLogger(nil), like WithSlog(nil), turns the
// default logging off.
func WithLogger(l cron.Logger) Option {
	return func(c *config) {
		if isNil(l) {
			l = nil // a typed nil, such as a nil pointer of a type of one's own
		}
		c.cronLog, c.logSet = l, true
	}
}

// isNil reports whether v is nil or a typed nil pointer.
func isNil(v any) bool {
	if v == nil {
		return true
	}
	rv := reflect.ValueOf(v)
	return rv.Kind() == reflect.Pointer && rv.IsNil()
}

// WithSlog logs the same messages as [WithLogger] to a *slog.Logger: a
// finished run at Debug level, a skip at Info, an overrun and a lost lock
// at Warn, a job error, a lock error and a job that could not run (the
// pglock schema missing with [WithTicks]) at Error.
//
// The default, without WithSlog and WithLogger, is slog.Default(), read at
// each message: a job's error and any reason it cannot run are never
// silent. A nil l logs nothing: WithSlog(nil) turns logging off (so does a
// logger on slog.DiscardHandler). It may be combined with WithLogger.
func WithSlog(l *slog.Logger) Option {
	return func(c *config) { c.slog, c.logSet = l, true }
}

// WithBaseContext sets the parent of every run's context (cron gives jobs
// none). Cancel it at shutdown, before or after cron's Stop: running [Func]
// jobs see their context cancelled, a [WithMinHold] wait ends at once, and
// later ticks are skipped ("context done"). The default is
// context.Background(). A nil ctx is an error.
func WithBaseContext(ctx context.Context) Option {
	return func(c *config) {
		if ctx == nil {
			c.invalid("WithBaseContext(nil)")
			return
		}
		c.base = ctx
	}
}

// WithTicks makes the job run once per scheduled time across the cluster:
// each run records its tick (the job's key name and the time schedule fired
// for, not the clock's time) with pglock.ClaimTick in the lock's transaction,
// and a run whose tick is already recorded, by any replica, is skipped ("tick
// already ran"). The record commits with the job's work, so a tick runs
// exactly once whatever the replicas' clocks say (no [WithMinHold] needed)
// and even after the replica that ran it first exited; a run that fails rolls
// its record back, and another replica's firing of the tick runs it (with
// ticks a run waits for a busy lock instead of skipping). schedule must be
// the one the job is scheduled with: give the same value to the Cron's
// Schedule method. [WithTicksSpec] takes the spec given to AddJob instead,
// which is what most callers have.
//
// It needs Transaction scope ([WithScope], or the Locker's) and the pglock
// schema (pglock.Migrate, or `pglock migrate`): a run without it does not
// run the job and logs why at Error, and RunContext returns an error
// matching pglock.ErrSchema. The schedule must name absolute times:
// "@every" (cron.ConstantDelaySchedule) counts from each replica's start, so
// its ticks are not the same on two replicas, and is an error. A cron.Job
// given to [Wrap] runs outside the transaction: its tick is recorded, but its
// work may not commit with it. Records older than a week are pruned. The
// default, without WithTicks or WithTicksSpec, records nothing.
func WithTicks(schedule cron.Schedule) Option {
	return func(c *config) { c.setTicks(schedule, "WithTicks") }
}

// WithTicksSpec is [WithTicks] for the spec that the job is added with
// (c.AddJob(spec, job)), parsed here by the same parser as the Cron's: by
// cron.ParseStandard (the parser of cron.New()) when no parser is given, or
// by parser, the one given to cron.WithParser (cron.WithSeconds() is
// cron.WithParser(cron.NewParser(cron.Second | cron.Minute | cron.Hour |
// cron.Dom | cron.Month | cron.Dow | cron.Descriptor))). Give AddJob the
// same spec:
//
//	const spec = "0 2 * * *"
//	job, err := cronlock.Func(locker, "invoices", send,
//		cronlock.WithScope(pglock.Transaction), cronlock.WithTicksSpec(spec))
//	_, err = c.AddJob(spec, job)
//
// A spec that does not parse, an "@every" spec (see WithTicks), a nil parser
// or more than one parser is an error.
func WithTicksSpec(spec string, parser ...cron.ScheduleParser) Option {
	return func(c *config) {
		parse := cron.ParseStandard
		switch {
		case len(parser) > 1:
			c.invalid("WithTicksSpec(%q): %d parsers, want at most one", spec, len(parser))
			return
		case len(parser) == 1 && isNil(parser[0]):
			c.invalid("WithTicksSpec(%q): nil parser", spec)
			return
		case len(parser) == 1:
			parse = parser[0].Parse
		}
		schedule, err := parse(spec)
		if err != nil {
			c.invalid("WithTicksSpec(%q): %w", spec, err)
			return
		}
		c.setTicks(schedule, fmt.Sprintf("WithTicksSpec(%q)", spec))
	}
}

// setTicks sets the schedule of WithTicks or WithTicksSpec (named by what).
func (c *config) setTicks(schedule cron.Schedule, what string) {
	switch schedule.(type) {
	case nil:
		c.invalid("%s: nil schedule", what)
		return
	case cron.ConstantDelaySchedule, *cron.ConstantDelaySchedule:
		c.invalid("%s: an @every schedule has no ticks common to the replicas (it counts from each one's start); use a cron spec", what)
		return
	}
	c.ticks = schedule
}

// WithClock sets the clock a job reads to name the tick it runs for (see
// [WithTicks]): for tests and simulations of replicas whose clocks differ.
// The default is time.Now; nil is an error.
func WithClock(now func() time.Time) Option {
	return func(c *config) {
		if now == nil {
			c.invalid("WithClock(nil)")
			return
		}
		c.now = now
	}
}
