package pglock

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// Scope says how long a held lock lives.
type Scope int

const (
	// Session (the zero value, the default) holds the lock until it is
	// released or until its connection ends (pg_advisory_lock).
	Session Scope = iota
	// Transaction holds the lock until its transaction ends, by commit or
	// rollback (pg_advisory_xact_lock); it cannot be released earlier. On a
	// pool or a connection the lock opens its own transaction and hands it to
	// the protected work; on a caller's transaction it joins that one.
	Transaction
)

// String returns "session" or "transaction".
func (s Scope) String() string {
	switch s {
	case Session:
		return "session"
	case Transaction:
		return "transaction"
	default:
		return fmt.Sprintf("Scope(%d)", int(s))
	}
}

// Mode says whether a lock excludes every other holder or only exclusive ones.
type Mode int

const (
	// Exclusive (the zero value, the default) excludes every other holder of
	// the key, exclusive or shared.
	Exclusive Mode = iota
	// Shared admits other shared holders and excludes exclusive ones: a
	// readers/writer lock (pg_advisory_lock_shared and friends).
	Shared
)

// String returns "exclusive" or "shared".
func (m Mode) String() string {
	switch m {
	case Exclusive:
		return "exclusive"
	case Shared:
		return "shared"
	default:
		return fmt.Sprintf("Mode(%d)", int(m))
	}
}

// DefaultLostCheckInterval is how often a held session lock on a pool checks
// its connection when nothing has happened on it. A connection that the
// server closes (pg_terminate_backend, a restart) is noticed at once (from
// 50 ms into the hold, when the watch starts); one
// that goes silent is noticed within twice this interval.
const DefaultLostCheckInterval = 500 * time.Millisecond

// DefaultReleaseTimeout bounds the statements that end a hold (unlock, commit,
// rollback), which run even when the caller's context has ended.
const DefaultReleaseTimeout = 5 * time.Second

// Option configures a Lock or a Locker. Options given to [NewLocker] are the
// defaults of its Locks; options given to [Locker.NewLock] override them for
// that lock.
//
// Four options configure a Locker's connections and apply to [NewLocker]
// only: [WithMultiplexing], [WithLockConns], [WithWaitConns] and
// [WithMaxLocks]. Given to [NewLock] or [Locker.NewLock] they are an error
// matching [ErrInvalidOption] that names them. (One Option type serves both
// constructors so that a slice of options can be passed to either; the
// check is at run time, when the Lock is made, never at the first acquire.)
// Every other option applies to both.
type Option func(*config)

type config struct {
	scope           Scope
	scopeSet        bool
	mode            Mode
	rollbackOnError bool
	logger          *slog.Logger
	lostCheck       time.Duration
	releaseTimeout  time.Duration
	// identity is a Leader's (LeaderConfig.Identity): its campaign
	// connection is named with it (see nameCampaign); "" for other Locks.
	identity    string
	waitTimeout time.Duration
	namespace   string
	observer    func(Event)
	tracer      Tracer
	token       bool // WithToken
	// campaign: a Leader's lock, whose wait may last as long as the
	// process: on a multiplexing Locker it waits on a connection of its
	// own, outside WithWaitConns, so that it never starves other waits.
	campaign bool
	errs     []error

	// The Locker's own settings (see lockOnly).
	multiplex  bool
	lockConns  int
	waitConns  int
	maxLocks   int
	lockerOpts []string // names of the Locker's own options given
}

func defaultConfig() config {
	return config{
		rollbackOnError: true,
		lostCheck:       DefaultLostCheckInterval,
		releaseTimeout:  DefaultReleaseTimeout,
		multiplex:       true,
		lockConns:       DefaultLockConns,
		waitConns:       DefaultWaitConns,
	}
}

// apply applies opts and returns their errors, joined.
func (c *config) apply(opts []Option) error {
	for _, o := range opts {
		if o == nil {
			c.invalid("nil Option")
			continue
		}
		o(c)
	}
	return errors.Join(c.errs...)
}

// lockOnly reports the Locker's own options given for a Lock.
func (c *config) lockOnly() error {
	if len(c.lockerOpts) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s %w", ErrInvalidOption, strings.Join(c.lockerOpts, ", "), errLockerOnly)
}

func (c *config) invalid(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalidOption}, args...)...))
}

// WithScope sets the scope: Session (the default) or Transaction. On a
// caller's transaction (pgx.Tx, *sql.Tx) the scope is Transaction, and asking
// for Session there is an error: a session lock would outlive the transaction.
func WithScope(s Scope) Option {
	return func(c *config) {
		if s != Session && s != Transaction {
			c.invalid("scope %d (want pglock.Session or pglock.Transaction)", int(s))
			return
		}
		c.scope, c.scopeSet = s, true
	}
}

// WithMode sets the mode: Exclusive (the default) or Shared.
func WithMode(m Mode) Option {
	return func(c *config) {
		if m != Exclusive && m != Shared {
			c.invalid("mode %d (want pglock.Exclusive or pglock.Shared)", int(m))
			return
		}
		c.mode = m
	}
}

// WithRollbackOnError sets whether a failing or panicking function given to
// Do, or an error given to HandleError, rolls back the lock's transaction
// (Transaction scope) before the lock is released. The default is true. In
// Session scope there is no transaction of the lock's to roll back.
func WithRollbackOnError(on bool) Option {
	return func(c *config) { c.rollbackOnError = on }
}

// WithLogger sets the logger. A nil logger (the default) logs nothing.
// Acquire, busy and release are logged at Debug level, a lost lock and a
// failed release at Warn level, each with the key, scope, mode and wait time.
func WithLogger(l *slog.Logger) Option {
	return func(c *config) { c.logger = l }
}

// The ranges of the options (see each option).
const (
	// maxConns bounds WithLockConns and WithWaitConns: each is a server
	// session, and the server refuses every client past max_connections
	// (100 by default).
	maxConns = 64
	// minBound and maxBound bound WithLostCheckInterval and
	// WithReleaseTimeout: below 10 ms a healthy server's answer does not
	// arrive in time, so every acquire would fail as unavailable and every
	// release as lost; past an hour a lost lock goes unnoticed for hours,
	// and the session settings derived from them overflow.
	minBound = 10 * time.Millisecond
	maxBound = time.Hour
)

// WithLostCheckInterval sets how often a held session lock on a pool checks
// its idle connection (see [DefaultLostCheckInterval], used when d is 0). A
// connection closed by the server is noticed at once; a silent one within 2*d.
// d is 0 or 10 ms to 1 h; another value is an error. (A multiplexing Locker
// bounds each statement on its lock connections by 2*d too.)
func WithLostCheckInterval(d time.Duration) Option {
	return func(c *config) {
		c.lostCheck = c.duration("WithLostCheckInterval", d, DefaultLostCheckInterval)
	}
}

// duration returns d, or def when d is 0, for the option name; d outside
// minBound..maxBound is an error.
func (c *config) duration(name string, d, def time.Duration) time.Duration {
	switch {
	case d == 0:
		return def
	case d < minBound || d > maxBound:
		c.invalid("%s(%v) is out of range: want 0 (the default, %v) or %v..%v", name, d, def, minBound, maxBound)
		return def
	}
	return d
}

// WithReleaseTimeout bounds the statements that end a hold (see
// [DefaultReleaseTimeout], used when d is 0). They run even when the caller's
// context has ended, so that a lock is never left held on a live connection;
// a pooled connection whose unlock does not finish in time is destroyed.
// d is 0 or 10 ms to 1 h; another value is an error.
func WithReleaseTimeout(d time.Duration) Option {
	return func(c *config) {
		c.releaseTimeout = c.duration("WithReleaseTimeout", d, DefaultReleaseTimeout)
	}
}

// WithWait bounds how long Acquire (and Do) wait for a busy lock, on
// top of the context's own deadline. Zero (the default) waits as long as the
// context allows. When the bound passes, the error matches ErrNotAcquired and
// context.DeadlineExceeded. d is 0 or more; a negative d is an error.
func WithWait(d time.Duration) Option {
	return func(c *config) {
		if d < 0 {
			c.invalid("WithWait(%v) is negative: want 0 or more (0: as long as the context allows)", d)
			return
		}
		c.waitTimeout = d
	}
}

// WithNamespace prefixes every string, []byte and integer key with ns before
// it is hashed, so that two features of one database never collide by
// accident: with namespace "cron:", the key "billing" is KeyOf("cron:billing").
// A Key value ([Int64Key], [Int32PairKey], [KeyOf]'s result) is used as it is.
// The default is no namespace. Given twice, the last one wins.
func WithNamespace(ns string) Option {
	return func(c *config) { c.namespace = ns }
}

// keyOf applies the namespace to v and hashes it.
func (c *config) keyOf(v any) (Key, error) {
	k, _, err := c.keyName(v)
	return k, err
}

// keyName is keyOf, and the name the key was hashed from (the namespace and
// the key's text form), or "" for a Key.
func (c *config) keyName(v any) (Key, string, error) {
	switch k := v.(type) {
	case Key:
		return k, "", nil
	case []byte:
		name := c.namespace + string(k)
		return hashKey([]byte(name)), name, nil
	case string:
		name := k
		if c.namespace != "" {
			name = c.namespace + k
		}
		key, err := KeyOf(name)
		return key, name, err
	}
	if _, err := KeyOf(v); err != nil {
		return Key{}, "", err
	}
	name := fmt.Sprintf("%s%d", c.namespace, v)
	key, err := KeyOf(name)
	return key, name, err
}

// DefaultLockConns is the number of lock connections of a multiplexing
// Locker (see [WithLockConns]).
const DefaultLockConns = 2

// DefaultWaitConns is the number of waiting connections a multiplexing
// Locker opens at most (see [WithWaitConns]).
const DefaultWaitConns = 4

// WithMultiplexing sets whether a Locker on a pool (*pgxpool.Pool, or
// *sql.DB with pgx's database/sql driver) holds its session locks on lock
// connections of its own (true, the default) or takes one pool connection
// per hold for its whole life (false, as [NewLock] does). With another
// database/sql driver the Locker always takes one connection per hold. An
// option of [NewLocker].
func WithMultiplexing(on bool) Option {
	return func(c *config) {
		c.multiplex = on
		c.lockerOpts = append(c.lockerOpts, "WithMultiplexing")
	}
}

// WithLockConns sets how many lock connections a multiplexing Locker opens
// (see [DefaultLockConns], used when n is 0): PostgreSQL sessions of its
// own, opened with the pool's connection settings but outside the pool, that
// hold the session locks of all its Locks (one session holds thousands).
// Each key is held on one of them, chosen by the key; the lock and unlock
// requests that goroutines send to one connection at the same time share
// one statement. A lock connection is opened on first use, in the
// background, bounded by the pool's ConnectTimeout or else the release
// timeout (not by the context of the request that needs it: a request whose
// context ends first fails with [ErrUnavailable], and the next one finds the
// connection open). n is 0 or 1 to 64 (each is a server session, and the
// server refuses every client past max_connections); another value is an
// error. An option of [NewLocker].
func WithLockConns(n int) Option {
	return func(c *config) { c.connCount("WithLockConns", n, DefaultLockConns, &c.lockConns) }
}

// connCount sets *dst to n, or def when n is 0, for the Locker's option
// name; n outside 1..maxConns is an error.
func (c *config) connCount(name string, n, def int, dst *int) {
	c.lockerOpts = append(c.lockerOpts, name)
	switch {
	case n == 0:
		*dst = def
	case n < 0 || n > maxConns:
		c.invalid("%s(%d) is out of range: want 0 (the default, %d) or 1..%d", name, n, def, maxConns)
	default:
		*dst = n
	}
}

// WithWaitConns bounds the waiting connections of a multiplexing Locker
// (see [DefaultWaitConns], used when n is 0). A key that another session
// holds is waited for in the server's queue, so that waiters of every
// process are served in order: by one goroutine of the process per key (the
// others queue behind it in the process), on a waiting connection. A waiting
// connection that got its lock keeps it until it is released (a session
// cannot hand an exclusive lock to another one without letting it go), so at
// most n waiting connections are open, waiting, holding what they waited for,
// or idle: with the lock connections, a Locker has at most WithLockConns + n
// server sessions, plus one per [Leader] campaigning or leading. A wait that
// finds all n taken tries its key on its lock connection instead, now and
// then (from 20 ms, doubling up to 1 s), until a waiting connection is free
// or the key is taken: it is not served in the server's order meanwhile. n
// is 0 or 1 to 64; another value is an error. An option of [NewLocker].
func WithWaitConns(n int) Option {
	return func(c *config) {
		c.connCount("WithWaitConns", n, DefaultWaitConns, &c.waitConns)
	}
}

// WithMaxLocks caps the session locks a multiplexing Locker holds at once;
// past it, acquires fail with [ErrTooManyLocks] until some are released.
// Waits do not count until they are granted (a wait granted at the cap is
// kept, so the cap can be passed by the waits under way: at most
// [WithWaitConns], plus the Leaders' campaigns).
// Advisory locks live in the server's lock table, which every session of the
// server shares; when it is full, every session fails ("out of shared
// memory"), new connections included. Zero (the default) derives the cap from
// the server: a quarter of max_locks_per_transaction * (max_connections +
// max_prepared_transactions), read when the first lock connection opens.
// Besides this cap per Locker, a Locker that holds a thirty-second of the
// table or more counts the advisory locks of every session of the server now
// and then, and refuses more once they reach three quarters of the table
// (see the package documentation, "Lock connections"), so that replicas
// together cannot fill it; an n above those three quarters is an error at
// the first acquire. n is 0 or more; a negative n is an error. An option of
// [NewLocker].
func WithMaxLocks(n int) Option {
	return func(c *config) {
		c.lockerOpts = append(c.lockerOpts, "WithMaxLocks")
		if n < 0 {
			c.invalid("WithMaxLocks(%d) is negative: want 0 or more (0: derived from the server)", n)
			return
		}
		c.maxLocks = n
	}
}
