package grpclock

import (
	"fmt"
	"log/slog"
	"strings"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/pglockkit/kit/pglock"
)

// DefaultNamespace is put in front of every key the interceptors lock, so
// that a gRPC key never collides with a key of another feature (cron jobs,
// HTTP routes) on the same database. Change it with [WithNamespace].
const DefaultNamespace = "grpc:"

// Option configures UnaryServerInterceptor and StreamServerInterceptor.
// Every option states its default; an option with a bad value makes the
// constructor return an error matching [ErrInvalidOption].
type Option func(*config)

type config struct {
	keyFunc       KeyFunc
	streamKeyFunc StreamKeyFunc
	methods       map[string]bool // exact full method names
	services      []string        // "/pkg.Service/" prefixes
	busyCode      codes.Code
	wait          time.Duration
	scope         pglock.Scope
	scopeSet      bool
	namespace     string
	logger        *slog.Logger
	errs          []error
}

func defaultConfig() config {
	return config{
		keyFunc:   messageKey,
		busyCode:  codes.Aborted,
		namespace: DefaultNamespace,
	}
}

func (c *config) invalid(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalidOption}, args...)...))
}

// selected reports whether the interceptor locks calls to fullMethod.
func (c *config) selected(fullMethod string) bool {
	if c.methods == nil && c.services == nil {
		return true
	}
	if c.methods[fullMethod] {
		return true
	}
	for _, p := range c.services {
		if strings.HasPrefix(fullMethod, p) {
			return true
		}
	}
	return false
}

// WithKeyFunc sets how a call's key is found. The default reads the request
// message's LockKey method (see [Keyer]). For a stream, f gets the first
// message the handler receives, unless [WithStreamKeyFunc] is set. A nil f
// is an error.
func WithKeyFunc(f KeyFunc) Option {
	return func(c *config) {
		if f == nil {
			c.invalid("WithKeyFunc(nil)")
			return
		}
		c.keyFunc = f
	}
}

// WithStreamKeyFunc makes StreamServerInterceptor take a stream's key before
// its handler runs, from the stream's context (its metadata: see
// [MetadataKey]), instead of from the first message received; the lock then
// covers the whole handler. The default is unset: the key comes from the
// first message (see the package documentation). UnaryServerInterceptor
// ignores this option. A nil f is an error.
func WithStreamKeyFunc(f StreamKeyFunc) Option {
	return func(c *config) {
		if f == nil {
			c.invalid("WithStreamKeyFunc(nil)")
			return
		}
		c.streamKeyFunc = f
	}
}

// WithMethods limits the interceptor to the listed methods; calls to other
// methods pass through untouched. A name is a full method name
// ("/bank.v1.Accounts/Transfer") or a whole service ending in a slash
// ("/bank.v1.Accounts/"). The default (no WithMethods) is every method.
// Given more than once, the lists add up. A name that does not start with
// "/" is an error, and so is an empty list.
//
// For richer rules, leave this option out and compose the interceptor with
// go-grpc-middleware's selector package (see the package documentation).
func WithMethods(fullMethods ...string) Option {
	return func(c *config) {
		if len(fullMethods) == 0 {
			c.invalid("WithMethods() with no methods")
			return
		}
		for _, m := range fullMethods {
			switch {
			case !strings.HasPrefix(m, "/") || len(m) < 3:
				c.invalid("WithMethods(%q): want \"/package.Service/Method\" or \"/package.Service/\"", m)
			case strings.HasSuffix(m, "/"):
				c.services = append(c.services, m)
			default:
				if c.methods == nil {
					c.methods = make(map[string]bool)
				}
				c.methods[m] = true
			}
		}
	}
}

// WithBusyCode sets the status code of a call whose key is locked by another
// call (at once, or when the wait of [WithWait] runs out). The default is
// codes.Aborted: a concurrency conflict that the client may retry (see the
// package documentation for a retry policy). codes.OK, or a code outside
// gRPC's list, is an error.
func WithBusyCode(code codes.Code) Option {
	return func(c *config) {
		if code == codes.OK || code > codes.Unauthenticated {
			c.invalid("WithBusyCode(%v): want a gRPC error code", code)
			return
		}
		c.busyCode = code
	}
}

// WithWait makes a call whose key is locked wait up to limit for the lock,
// and fail with the busy code (see [WithBusyCode]) when limit passes. The
// call's own deadline bounds the wait too: when it passes first, or the
// client cancels, the call fails with codes.DeadlineExceeded or
// codes.Canceled. Zero (the default) does not wait: a busy key fails the
// call at once. A negative limit is an error.
func WithWait(limit time.Duration) Option {
	return func(c *config) {
		if limit < 0 {
			c.invalid("WithWait(%v): negative limit", limit)
			return
		}
		c.wait = limit
	}
}

// WithScope sets the lock's scope, overriding the Locker's: pglock.Session
// holds the lock around the handler; pglock.Transaction runs the handler in
// the lock's transaction, found with pglock.TxFromContext, committed when
// the handler returns nil and rolled back when it fails or panics. The
// default is the Locker's scope. A value that is neither is an error.
func WithScope(s pglock.Scope) Option {
	return func(c *config) {
		if s != pglock.Session && s != pglock.Transaction {
			c.invalid("WithScope(%v)", s)
			return
		}
		c.scope, c.scopeSet = s, true
	}
}

// WithNamespace sets the prefix put in front of every key before it goes to
// the Locker (whose own namespace, if any, comes in front of that). The
// default is [DefaultNamespace], "grpc:"; the empty string locks the keys
// as they are, for instance to contend with other code on the same keys.
func WithNamespace(ns string) Option {
	return func(c *config) { c.namespace = ns }
}

// WithLogger sets the logger for what the interceptor decides and cannot
// tell the client: a busy key and a key function error at Debug level, a
// database error and a failed release at Warn level, each with the method
// and the key. The Locker logs the locks themselves with its own logger. A
// nil logger (the default) logs nothing.
func WithLogger(l *slog.Logger) Option {
	return func(c *config) { c.logger = l }
}
