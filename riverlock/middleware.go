package riverlock

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	"github.com/pglockkit/kit/pglock"
)

// Middleware is River worker middleware that runs each job holding a
// PostgreSQL advisory lock on the job's key, so that two jobs with the same
// key never run at once on any node. Register it in river.Config.Middleware
// (for every job) or return it from a Worker's Middleware method (for one
// worker). Make it with [NewMiddleware]; it is safe for concurrent use.
type Middleware struct {
	river.MiddlewareDefaults

	locker *pglock.Locker
	global kindSettings
	kinds  map[string]kindSettings
	log    *slog.Logger
}

var _ rivertype.WorkerMiddleware = (*Middleware)(nil)

// NewMiddleware returns the middleware for locker, which must be on a
// *pgxpool.Pool (or *sql.DB) of the database River's jobs live in. The
// Locker holds the jobs' session locks on a few lock connections of its own
// (see pglock's "Lock connections"), so a running job's lock costs no
// connection of the pool, and River's own pool can serve. (On a single
// connection, jobs running at once would take turns on it: NewMiddleware
// rejects a Locker on one connection or on a transaction, see
// pglock.Locker.Pooled.)
//
// The middleware takes exclusive session locks, whatever the Locker's
// default scope and mode; it keeps the Locker's namespace (applied before
// its own), logger, lost-check interval and release timeout. A Limit above
// 1 ([Config.Limit]) takes a slot of a pglock Semaphore, a session lock too.
//
// A nil locker (also matching [ErrNilLocker]), a Locker on one connection
// or a transaction, an invalid Policy, and a Limit that is negative, above
// 1024, or not the same for kinds that share a Namespace are errors
// matching [ErrInvalidConfig].
// A nil cfg is the zero Config.
func NewMiddleware(locker *pglock.Locker, cfg *Config) (*Middleware, error) {
	if locker == nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidConfig, ErrNilLocker)
	}
	// Jobs run concurrently: each needs a connection of its own. On one
	// connection session locks would stack instead of excluding.
	if !locker.Pooled() {
		return nil, fmt.Errorf("%w: the Locker is on one connection or transaction; give it a pool (*pgxpool.Pool or *sql.DB)", ErrInvalidConfig)
	}
	if cfg == nil {
		cfg = &Config{}
	}
	m := &Middleware{
		locker: locker,
		global: kindSettings{key: cfg.Key, busy: cfg.Busy, namespace: cfg.Namespace, limit: cfg.Limit},
		kinds:  make(map[string]kindSettings, len(cfg.Kinds)),
		log:    cfg.Logger,
	}
	var errs []error
	if m.global.busy.err != nil {
		errs = append(errs, fmt.Errorf("Config.Busy: %w", m.global.busy.err))
	}
	for kind, kc := range cfg.Kinds {
		s := m.global
		if kc.Key != nil {
			s.key = kc.Key
		}
		if !kc.Busy.isZero() {
			s.busy = kc.Busy
		}
		if kc.Namespace != "" {
			s.namespace = kc.Namespace
		}
		if kc.Limit != 0 {
			s.limit = kc.Limit
		}
		if kc.Busy.err != nil {
			errs = append(errs, fmt.Errorf("Kinds[%q].Busy: %w", kind, kc.Busy.err))
		}
		if kc.Limit < 0 {
			errs = append(errs, fmt.Errorf("%w: Kinds[%q].Limit %d is negative", ErrInvalidConfig, kind, kc.Limit))
		}
		m.kinds[kind] = s
	}
	if cfg.Limit < 0 {
		errs = append(errs, fmt.Errorf("%w: Config.Limit %d is negative", ErrInvalidConfig, cfg.Limit))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if err := m.checkLimits(); err != nil {
		return nil, err
	}
	return m, nil
}

// checkLimits refuses limits above 1 that pglock cannot make (a size out of
// range), and kinds that share a Namespace
// with different limits: their jobs would take one semaphore with two sizes.
func (m *Middleware) checkLimits() error {
	type user struct {
		who   string
		limit int
	}
	var errs []error
	shared := map[string]user{} // explicit namespace -> its first user
	check := func(who string, s kindSettings) {
		if s.key == nil {
			return // its jobs run untouched
		}
		n := max(s.limit, 1)
		if n > 1 {
			if _, err := m.locker.Semaphore("riverlock:check", n); err != nil {
				errs = append(errs, fmt.Errorf("%w: %s Limit %d: %w", ErrInvalidConfig, who, n, err))
			}
		}
		if s.namespace == "" {
			return
		}
		if u, ok := shared[s.namespace]; !ok {
			shared[s.namespace] = user{who, n}
		} else if u.limit != n {
			errs = append(errs, fmt.Errorf("%w: %s and %s share Namespace %q with Limits %d and %d: jobs of one key would"+
				" count against different limits; give them the same Limit", ErrInvalidConfig, u.who, who, s.namespace, u.limit, n))
		}
	}
	check("Config", m.global)
	kinds := make([]string, 0, len(m.kinds))
	for kind := range m.kinds {
		kinds = append(kinds, kind)
	}
	slices.Sort(kinds) // the same error every time
	for _, kind := range kinds {
		check(fmt.Sprintf("Kinds[%q]", kind), m.kinds[kind])
	}
	return errors.Join(errs...)
}

// sessionOpts are the options of the locks the middleware takes.
var sessionOpts = []pglock.Option{pglock.WithScope(pglock.Session), pglock.WithMode(pglock.Exclusive)}

func (m *Middleware) settings(kind string) kindSettings {
	if s, ok := m.kinds[kind]; ok {
		return s
	}
	return m.global
}

// Work implements rivertype.WorkerMiddleware. It computes the job's key; a
// job without one runs untouched. Otherwise it takes the key's lock, or a
// slot of the key's semaphore under a Limit above 1 (at once under Snooze
// and Cancel, waiting under Wait), runs the rest of the middleware stack and
// the worker with it, and releases it when they return or panic.
//
// The context given to the worker is cancelled, with cause
// pglock.ErrLockLost, if the lock is lost while the job runs (its connection
// died or its backend was terminated); the job's error then matches
// pglock.ErrLockLost, and River retries it as usual. A job that returns nil
// although its lock was lost (it did not watch its context) is done: it is
// not failed (it would run twice), and the loss is logged.
func (m *Middleware) Work(ctx context.Context, job *rivertype.JobRow, doInner func(context.Context) error) error {
	s := m.settings(job.Kind)
	if s.key == nil {
		return doInner(ctx)
	}
	key, ok, err := s.key(job)
	if err != nil {
		err = fmt.Errorf("%w: job %d (kind %q): %w", ErrKey, job.ID, job.Kind, err)
		m.logf(ctx, slog.LevelWarn, "riverlock: key failed", job, "", slog.Any("error", err))
		return err
	}
	if !ok {
		return doInner(ctx)
	}
	name := s.prefix(job.Kind) + key
	var (
		lock *pglock.Lock
		sem  *pglock.Semaphore
		held pglock.Key // what WorkTx inside finds held: the key's own
	)
	if s.limit > 1 {
		var opts []pglock.Option
		if s.busy.act == actWait {
			opts = append(opts, pglock.WithWait(s.busy.d))
		}
		sem, err = m.locker.Semaphore(name, s.limit, opts...)
		if err == nil {
			held, err = m.locker.Key(name)
		}
	} else {
		opts := sessionOpts
		if s.busy.act == actWait {
			opts = append(opts[:len(opts):len(opts)], pglock.WithWait(s.busy.d))
		}
		lock, err = m.locker.NewLock(name, opts...)
		if err == nil {
			held = lock.Key()
		}
	}
	if err != nil {
		return fmt.Errorf("riverlock: job %d (kind %q) key %q: %w", job.ID, job.Kind, name, err)
	}

	var (
		ran     bool
		workErr error
	)
	run := func(lctx context.Context) error {
		ran = true
		workErr = doInner(context.WithValue(lctx, heldKey{}, held))
		return workErr
	}
	switch {
	case sem != nil:
		var did bool
		did, err = doLimited(ctx, sem, s.busy, run)
		if err == nil && !did {
			return m.busy(ctx, s.busy, job, name, fmt.Sprintf("%d jobs hold every slot of the key's limit", s.limit))
		}
	case s.busy.act == actWait:
		err = lock.Do(ctx, run)
	default:
		var did bool
		did, err = lock.TryDo(ctx, run)
		if err == nil && !did {
			return m.busy(ctx, s.busy, job, name, "another job holds the lock")
		}
	}
	switch {
	case !ran && s.busy.act == actWait && errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil:
		m.logf(ctx, slog.LevelDebug, "riverlock: wait for busy key ran out", job, name)
		return fmt.Errorf("%w: job %d (kind %q) key %q: waited %v: %w", ErrBusy, job.ID, job.Kind, name, s.busy.d, err)
	case !ran:
		return fmt.Errorf("riverlock: job %d (kind %q) key %q: %w", job.ID, job.Kind, name, err)
	case workErr == nil && err != nil:
		// The job's work is done; failing it now would run it again.
		m.logf(ctx, slog.LevelWarn, "riverlock: lock lost or not released cleanly after the job succeeded", job, name, slog.Any("error", err))
		return nil
	}
	return err
}

// doLimited runs run in a slot of sem (a Limit above 1): under Snooze and
// Cancel only if one is free now (TryDo's (false, nil) when none is), under
// Wait waiting up to the policy's limit, which sem bounds (it was made
// WithWait): when it passes the error matches pglock.ErrNotAcquired and
// context.DeadlineExceeded, as a Lock's WithWait does.
func doLimited(ctx context.Context, sem *pglock.Semaphore, p Policy, run func(context.Context) error) (bool, error) {
	if p.act != actWait {
		return sem.TryDo(ctx, run)
	}
	return true, sem.Do(ctx, run)
}

// busy applies the busy policy to a job whose key other jobs hold (why
// says how).
func (m *Middleware) busy(ctx context.Context, p Policy, job *rivertype.JobRow, name, why string) error {
	if p.act == actCancel {
		m.logf(ctx, slog.LevelDebug, "riverlock: busy key, job cancelled as a duplicate", job, name)
		return river.JobCancel(fmt.Errorf("%w: job %d (kind %q) key %q: %s; cancelled as a duplicate",
			ErrBusy, job.ID, job.Kind, name, why))
	}
	d := p.d
	if d == 0 {
		d = DefaultSnooze
	}
	m.logf(ctx, slog.LevelDebug, "riverlock: busy key, job snoozed", job, name, slog.Duration("snooze", d))
	return fmt.Errorf("%w: job %d (kind %q) key %q: snoozed: %w", ErrBusy, job.ID, job.Kind, name, river.JobSnooze(d))
}

func (m *Middleware) logf(ctx context.Context, level slog.Level, msg string, job *rivertype.JobRow, name string, attrs ...slog.Attr) {
	if m.log == nil || !m.log.Enabled(ctx, level) {
		return
	}
	attrs = append(attrs, slog.Int64("job_id", job.ID), slog.String("kind", job.Kind))
	if name != "" {
		attrs = append(attrs, slog.String("key", name))
	}
	m.log.LogAttrs(ctx, level, msg, attrs...)
}

// heldKey is the context key under which Work records the key it holds, so
// that WorkTx inside the job does not wait for a lock its own job holds.
type heldKey struct{}

func heldFromContext(ctx context.Context) (pglock.Key, bool) {
	k, ok := ctx.Value(heldKey{}).(pglock.Key)
	return k, ok
}
