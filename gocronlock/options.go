package gocronlock

import (
	"fmt"
	"reflect"
	"slices"
	"time"

	"github.com/go-co-op/gocron/v2"

	"github.com/pglockkit/kit/pglock"
)

// DefaultNamespace is put in front of a job's name to make its lock key, so
// that a gocron job never collides with a key of another feature (HTTP
// routes, River jobs, cronlock's "cron:" jobs) on the same database: the job
// named "billing" locks "gocron:billing" (under the Locker's own namespace,
// if it has one). [NewLocker] and [Func] use it, so that a job locked by
// either takes the same key. Change it with [WithNamespace].
const DefaultNamespace = "gocron:"

// DefaultElectorNamespace is put in front of an election's name to make the
// key of an [Elector]'s lock: the election "scheduler" locks
// "gocron-elector:scheduler". It differs from [DefaultNamespace] so that an
// election never shares a key with a job of the same name. Change it with
// [WithNamespace].
const DefaultElectorNamespace = "gocron-elector:"

// Option configures [NewLocker], [Func] and [NewElector]. Every option states
// its default and the constructors it applies to; an option given to another
// constructor, or with a bad value, makes the constructor return an error
// matching [ErrInvalidOption].
type Option func(*config)

// target is the constructor a config is for.
type target int

const (
	forLocker target = iota
	forFunc
	forElector
)

func (t target) String() string {
	switch t {
	case forLocker:
		return "NewLocker"
	case forFunc:
		return "Func"
	default:
		return "NewElector"
	}
}

type config struct {
	target    target
	namespace string
	minHold   time.Duration
	maxRun    time.Duration
	// scope is Func's scope (WithScope): nil means the Locker's own.
	scope  *pglock.Scope
	ticks  *Ticks
	leader pglock.LeaderConfig
	log    gocron.Logger
	logSet bool // WithLogger given: no slog.Default()
	errs   []error
}

// newConfig applies opts over the defaults of the constructor t.
func newConfig(t target, opts []Option) (config, error) {
	c := config{target: t, namespace: DefaultNamespace}
	if t == forElector {
		c.namespace = DefaultElectorNamespace
	}
	for _, o := range opts {
		if o == nil {
			c.invalid("nil Option")
			continue
		}
		o(&c)
	}
	return c, firstErr(c.errs)
}

// firstErr returns the first of errs, saying how many more there are, on one
// line (errors.Join would put each on a line of its own); nil for none.
func firstErr(errs []error) error {
	switch len(errs) {
	case 0:
		return nil
	case 1:
		return errs[0]
	}
	return fmt.Errorf("%w (and %d more)", errs[0], len(errs)-1)
}

func (c *config) invalid(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalidOption}, args...)...))
}

// appliesTo reports whether the option name applies to the constructor being
// configured, and records an error if not.
func (c *config) appliesTo(name string, ts ...target) bool {
	if slices.Contains(ts, c.target) {
		return true
	}
	c.invalid("%s does not apply to %v", name, c.target)
	return false
}

// WithNamespace sets the prefix of the lock key: the key is the Locker's key
// for ns + name. The default is [DefaultNamespace] ("gocron:") for
// [NewLocker] and [Func], and [DefaultElectorNamespace] ("gocron-elector:")
// for [NewElector]; an empty ns locks the bare name. Every replica must use
// the same. It applies to every constructor.
func WithNamespace(ns string) Option {
	return func(c *config) { c.namespace = ns }
}

// WithMinHold keeps a job's lock for at least d after it was taken, even
// when the job finishes sooner (ShedLock's lockAtLeastFor), so that a
// replica that fires the same tick a little later finds the lock held and
// skips the tick instead of running it again. gocron's schedulers do not
// agree on when a tick is: a DurationJob counts from each scheduler's start
// (unless gocron.WithStartAt aligns them), and even a CronJob fires at each
// replica's clock, give or take its skew and its scheduling jitter. Pick d
// above that difference and below the interval between ticks.
//
// With [NewLocker] the wait happens in Unlock, which gocron calls when the
// job returns: the job's goroutine (and its singleton or limit-mode slot)
// stays busy until the hold ends. With [Func] the wait happens before the
// lock's release (in Transaction scope, before the commit). Either way the
// wait ends early when gocron cancels the job's context (Shutdown,
// StopJobs, RemoveJob) or the lock is lost; the lock is then released at
// once. It lasts only while the holding replica lives: a hold ends with its
// connection.
//
// Zero (the default) releases the lock as soon as the job returns. A
// negative d is an error. It applies to NewLocker and Func.
func WithMinHold(d time.Duration) Option {
	return func(c *config) {
		if !c.appliesTo("WithMinHold", forLocker, forFunc) {
			return
		}
		if d < 0 {
			c.invalid("WithMinHold(%v): negative", d)
			return
		}
		c.minHold = d
	}
}

// WithMaxRun bounds a [Func] job's run: its context is cancelled after d,
// with cause [ErrMaxRunExceeded]; the lock is released when the job returns,
// never under a running job. (A gocron.Locker cannot do this: gocron gives
// the job a context the Locker does not see.) Zero (the default) sets no
// bound. A negative d is an error. It applies to Func.
func WithMaxRun(d time.Duration) Option {
	return func(c *config) {
		if !c.appliesTo("WithMaxRun", forFunc) {
			return
		}
		if d < 0 {
			c.invalid("WithMaxRun(%v): negative", d)
			return
		}
		c.maxRun = d
	}
}

// WithScope sets the scope of a [Func] job's lock. The default (without this
// option) is the Locker's scope, which is pglock.Session unless the Locker
// was made with pglock.WithScope.
//
// pglock.Session holds the lock on the Locker's lock connections for the
// run (it costs no pool connection); its loss cancels the job's context.
//
// pglock.Transaction runs the job inside the lock's transaction: the job
// reaches it with pglock.TxFromContext (pglock.SQLTxFromContext on
// database/sql), and it commits when the job returns nil and rolls back when
// it returns an error or panics, whatever the Locker's RollbackOnError says.
// The transaction takes a pool connection for the run.
//
// Any other value is an error. It applies to Func; a [Locker] always takes
// Session locks, since gocron gives its job no way to reach a transaction.
func WithScope(s pglock.Scope) Option {
	return func(c *config) {
		if !c.appliesTo("WithScope", forFunc) {
			return
		}
		if s != pglock.Session && s != pglock.Transaction {
			c.invalid("WithScope(%v): want pglock.Session or pglock.Transaction", s)
			return
		}
		c.scope = &s
	}
}

// WithTicks makes a [Func] job run once per scheduled time across the
// cluster ("exactly-once ticks"): each run first records the time gocron
// scheduled it for (the tick; the schedule's time, not the clock's) with
// pglock.ClaimTick in the lock's transaction, and a tick recorded already,
// by any replica, is skipped (logged: "tick already ran"; Run returns nil).
// The record commits or rolls back with the job's work, so a tick counts as
// run only when its work committed. ticks is the [Ticks] given to the job's
// scheduler (gocron.WithSchedulerMonitor), from which the run learns its
// scheduled time; a run without one fails with [ErrNoTick]. See
// "Exactly-once ticks" in the package documentation for what it guarantees,
// and for the schedules whose ticks the replicas share.
//
// Since the record decides whether a tick runs, a run waits for the job's
// lock instead of skipping when it is held elsewhere: the lock only keeps
// the replicas' runs apart, and a run must not lose its tick to a replica
// that holds the lock for another one (typically a replica whose clock is
// behind, checking a tick that already ran). The wait ends with gocron's job
// context (Shutdown, StopJobs, RemoveJob) or the Locker's
// pglock.WithWait; the ticks that this replica fires meanwhile are
// skipped ("still running here"). [WithMinHold] is not needed.
//
// It needs Transaction scope ([WithScope], or a Locker made with
// pglock.WithScope(pglock.Transaction)) and the pglock schema
// (pglock.Migrate, or `pglock migrate`): a run without it fails with an
// error matching pglock.ErrSchema. The ticks are recorded under the name the
// job's key is made from (the namespace + name, "gocron:billing"). The
// default, without this option, records nothing. A nil ticks, or Session
// scope, is an error. It applies to Func.
func WithTicks(ticks *Ticks) Option {
	return func(c *config) {
		if !c.appliesTo("WithTicks", forFunc) {
			return
		}
		if ticks == nil {
			c.invalid("WithTicks(nil)")
			return
		}
		c.ticks = ticks
	}
}

// WithLogger logs what gocron does not to a gocron.Logger, such as the one
// given to gocron.WithLogger, or a *slog.Logger (which is one): a skipped
// tick at Info ("gocronlock: skip", with the reason: "held elsewhere",
// "still running here", "tick already ran"), a lock lost during a run at
// Warn, a [Func] job's error ("gocronlock: run failed"), a job that could
// not run ("gocronlock: job not run": its ticks not wired, see [ErrNoTick];
// "gocronlock: tick not recorded": the pglock schema missing) and a lock or
// unlock error at Error (gocron logs none of these, and ignores the error of
// Unlock), an election won or lost at Info. Every message names the job (or
// election) and its key, and the tick with WithTicks.
//
// The default, without WithLogger, is slog.Default(), read at each message:
// a job's error and any reason it cannot run are never silent. A nil l logs
// nothing: WithLogger(nil) turns logging off (so does a logger on
// slog.DiscardHandler). It applies to every constructor.
func WithLogger(l gocron.Logger) Option {
	return func(c *config) {
		if v := reflect.ValueOf(l); v.Kind() == reflect.Pointer && v.IsNil() {
			l = nil // a typed nil, such as a nil *slog.Logger
		}
		c.log, c.logSet = l, true
	}
}

// WithLeaderConfig sets the configuration of an [Elector]'s pglock.Leader:
// its OnElected and OnDeposed callbacks (called besides the Elector's own
// logging) and its backoffs after a lost term or a failed campaign (the
// database down). The zero value (the default) is pglock's defaults. A
// negative backoff is an error, reported by pglock as
// pglock.ErrInvalidOption. It applies to NewElector.
func WithLeaderConfig(cfg pglock.LeaderConfig) Option {
	return func(c *config) {
		if !c.appliesTo("WithLeaderConfig", forElector) {
			return
		}
		c.leader = cfg
	}
}
