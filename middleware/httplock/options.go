package httplock

import (
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/pglockkit/kit/pglock"
)

// DefaultNamespace prefixes every key this package locks, so that HTTP keys
// never collide with the keys of other features (cron jobs, queue workers)
// on the same database: the key "42" is locked as "http:42" (after the
// Locker's own namespace, if it has one). See [WithNamespace].
const DefaultNamespace = "http:"

// DefaultRetryAfter is the Retry-After of the default busy answer.
const DefaultRetryAfter = time.Second

// Option configures Middleware and Handler.
type Option func(*config)

// ErrorHandlerFunc answers a request that failed before or after its handler
// ran. err matches one of this package's sentinels with errors.Is.
type ErrorHandlerFunc func(w http.ResponseWriter, r *http.Request, err error)

// CommitRule decides, in Transaction scope, whether the lock's transaction
// commits after the handler returned without panicking: status is the
// response status the handler set (200 when it wrote nothing).
type CommitRule func(r *http.Request, status int) bool

type config struct {
	scope      pglock.Scope
	scopeSet   bool
	mode       pglock.Mode
	modeSet    bool
	modeFunc   func(*http.Request) pglock.Mode
	wait       time.Duration
	limit      int // 0: unset, as 1
	retryAfter time.Duration
	onBusy     http.Handler
	onError    ErrorHandlerFunc
	onKeyError ErrorHandlerFunc
	commit     CommitRule
	namespace  string
	logger     *slog.Logger
	errs       []error
}

func defaultConfig() config {
	return config{retryAfter: DefaultRetryAfter, namespace: DefaultNamespace}
}

func (c *config) invalid(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalidOption}, args...)...))
}

// WithWait sets the busy policy. With d > 0 a request whose key is held
// elsewhere waits up to d for it, and less if its context ends first (the
// client went away, or a server timeout): then it stops waiting at once,
// leaves no lock and no connection behind, and is answered 503 (see
// [ErrRequestEnded]). With d == 0 (the default) it does
// not wait: a busy key is answered at once (409 Conflict, see [WithOnBusy]).
// A request still waiting when d passes gets the busy answer too. A
// negative d is an error.
//
// In Session scope a waiting request costs no pool connection: a Locker on a
// pool waits on its own waiting connections (see pglock.WithWaitConns),
// one per key, and holds locks on its lock connections. In Transaction scope
// the wait, like the hold, is on the request's transaction, a pool
// connection: size the pool for the waiters.
func WithWait(d time.Duration) Option {
	return func(c *config) {
		if d < 0 {
			c.invalid("wait %v is negative", d)
			return
		}
		c.wait = d
	}
}

// WithLimit lets up to n requests for one key run at once, across every
// replica that shares the database: at most n concurrent exports per tenant,
// say. The key names a [pglock.Semaphore] of n slots ([pglock.Locker.Semaphore],
// the namespace and key as its name), and each request holds one slot while
// its handler runs. Every replica must give a key the same n.
//
// A request that finds every slot taken is busy, as a request for a held
// lock is: without [WithWait] it gets the busy answer at once (409 Conflict,
// see [WithOnBusy]); with WithWait it queues for a slot, first come first
// served across replicas, up to the wait limit, and gets the busy answer when
// that passes. The limit bounds the wait only, not the handler. A request
// whose context ends while it waits is answered 503 ([ErrRequestEnded]), as
// with a lock.
//
// n must be 1 or more (and at most 1024, pglock's largest Semaphore).
// WithLimit(1), the default, is one request per key: a plain lock, with every
// other option as documented. Above 1, a semaphore's slots are
// [pglock.Session] scope and exclusive, so Middleware refuses WithLimit(n)
// with Transaction scope (there is no transaction to give the handler: use
// [pglock.Locker.Do] inside the handler for work that must commit with a
// lock), with a Locker in Transaction scope even given
// WithScope(pglock.Session) (pglock makes Semaphores on Session Lockers
// only), with [WithModeFunc] or [WithMode](pglock.Shared), and with a Locker
// in Shared mode unless WithMode(pglock.Exclusive) is given; each is an
// [ErrInvalidOption]. The
// handler's context carries the slot's hold (a lost slot cancels it with
// cause [pglock.ErrLockLost]) but no fencing token: slots take none.
func WithLimit(n int) Option {
	return func(c *config) {
		if n < 1 {
			c.invalid("WithLimit(%d): want 1 or more", n)
			return
		}
		c.limit = n
	}
}

// WithScope sets the lock's scope. The default is the Locker's scope
// ([pglock.Locker.Scope]).
//
// In [pglock.Session] scope the lock is held around the handler. In
// [pglock.Transaction] scope the middleware opens a transaction, takes the
// lock in it, and gives it to the handler in the request's context
// ([pglock.TxFromContext], or [pglock.SQLTxFromContext] on database/sql):
// the handler's writes commit together with the lock when the handler
// returns without panicking and the commit rule agrees ([WithCommitRule]),
// and roll back otherwise.
func WithScope(s pglock.Scope) Option {
	return func(c *config) {
		if s != pglock.Session && s != pglock.Transaction {
			c.invalid("scope %d (want pglock.Session or pglock.Transaction)", int(s))
			return
		}
		c.scope, c.scopeSet = s, true
	}
}

// WithMode sets the lock's mode for every request: [pglock.Exclusive] or
// [pglock.Shared]. The default is the Locker's mode ([pglock.Locker.Mode]).
// [WithModeFunc] chooses per request instead.
func WithMode(m pglock.Mode) Option {
	return func(c *config) {
		if m != pglock.Exclusive && m != pglock.Shared {
			c.invalid("mode %d (want pglock.Exclusive or pglock.Shared)", int(m))
			return
		}
		c.mode, c.modeSet, c.modeFunc = m, true, nil
	}
}

// WithModeFunc chooses the lock's mode per request, for example
// [SharedForSafeMethods]: reads share the key, writes exclude everyone. A
// mode other than Exclusive or Shared is a programming error: it is logged
// (Error level, matching [ErrInvalidOption]) and answered 500 Internal
// Server Error, and the handler does not run. A nil f is an error.
func WithModeFunc(f func(*http.Request) pglock.Mode) Option {
	return func(c *config) {
		if f == nil {
			c.invalid("nil mode func")
			return
		}
		c.modeFunc, c.modeSet = f, false
	}
}

// SharedForSafeMethods is a mode func for [WithModeFunc]: GET, HEAD and
// OPTIONS requests take the key in [pglock.Shared] mode (they run together),
// every other method in [pglock.Exclusive] mode (it runs alone, and waits for
// the readers to finish).
func SharedForSafeMethods(r *http.Request) pglock.Mode {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return pglock.Shared
	default:
		return pglock.Exclusive
	}
}

// WithRetryAfter sets the Retry-After header of the default busy answer,
// rounded up to whole seconds. The default is [DefaultRetryAfter]; zero
// sends no Retry-After. A negative d is an error. It has no effect with
// [WithOnBusy].
func WithRetryAfter(d time.Duration) Option {
	return func(c *config) {
		if d < 0 {
			c.invalid("retry-after %v is negative", d)
			return
		}
		c.retryAfter = d
	}
}

// WithOnBusy replaces the busy answer: h answers a request whose key is
// held elsewhere (at once, or after the wait limit of [WithWait]); the
// middleware sets no Retry-After for it. The default answers 409 Conflict
// with Retry-After (see [WithRetryAfter]) and a short text body. A nil h
// keeps the default. Either way the busy answer is logged with an error
// matching [ErrBusy] (see [WithLogger]).
func WithOnBusy(h http.Handler) Option {
	return func(c *config) { c.onBusy = h }
}

// WithErrorHandler replaces the answer to a database error: the lock could
// not be taken (other than busy), or in Transaction scope the commit failed
// before any of the response was sent. err matches [ErrDatabase] and keeps
// the pglock error and the database's error. The default answers 503
// Service Unavailable. A nil f keeps the default.
func WithErrorHandler(f ErrorHandlerFunc) Option {
	return func(c *config) { c.onError = f }
}

// WithKeyErrorHandler replaces the answer to a KeyFunc error. err matches
// [ErrKey] and wraps the KeyFunc's error. The default answers 400 Bad
// Request. A nil f keeps the default.
func WithKeyErrorHandler(f ErrorHandlerFunc) Option {
	return func(c *config) { c.onKeyError = f }
}

// WithCommitRule sets when, in Transaction scope, the lock's transaction
// commits after a handler that did not panic. The default (nil, or
// [DefaultCommitRule]) commits when the status is below 500. A panic always
// rolls back.
func WithCommitRule(rule CommitRule) Option {
	return func(c *config) { c.commit = rule }
}

// DefaultCommitRule commits when the status is below 500.
func DefaultCommitRule(_ *http.Request, status int) bool { return status < 500 }

// WithNamespace sets the prefix of every key this middleware locks (the
// default is [DefaultNamespace]); the empty string locks the keys as the
// KeyFunc returns them. Give each protected resource its own namespace when
// their keys can be equal: with PathValue("id") on /orders/{id} and on
// /users/{id}, "orders:" and "users:" keep order 42 and user 42 apart.
func WithNamespace(ns string) Option {
	return func(c *config) { c.namespace = ns }
}

// WithLogger sets the logger of the middleware's own events: busy answers
// and client cancellations at Debug level, database errors and failed
// releases at Warn level. A nil logger (the default) logs nothing. The
// Locker's logger (pglock.WithLogger) logs the lock's own events.
func WithLogger(l *slog.Logger) Option {
	return func(c *config) { c.logger = l }
}
