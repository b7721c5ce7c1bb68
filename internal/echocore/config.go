package echocore

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/pglockkit/kit/pglock"
)

// Config is an adapter's Config over its context type C, with the same
// fields and meanings, except that Scope and Mode are nil to follow the
// Locker (the adapter maps its own way of saying so onto nil).
type Config[C any] struct {
	Skipper      func(c C) bool
	Locker       *pglock.Locker
	KeyExtractor func(c C) (key string, ok bool, err error)
	Wait         time.Duration
	Scope        *pglock.Scope // nil: the Locker's
	Mode         *pglock.Mode  // nil: the Locker's
	ModeFunc     func(c C) pglock.Mode
	Commit       func(c C, err error) bool
	Namespace    string
	RetryAfter   time.Duration
	DenyHandler  func(c C, key string, err error) error
	ErrorHandler func(c C, err error) error
	Logger       *slog.Logger
}

// Middleware is a validated Config, ready to wrap handlers ([Middleware.Handle]).
type Middleware[C any] struct {
	fw          *Framework[C]
	cfg         Config[C]          // defaults filled in; Scope and Mode nil (see scope, mode)
	scope       pglock.Scope       // Config.Scope, else the Locker's
	mode        pglock.Mode        // Config.Mode, else the Locker's
	lockOpts    [2][]pglock.Option // by mode
	errRollback error              // what the locked function returns when Commit says roll back
}

// New checks cfg and returns its middleware. A nil Locker or KeyExtractor,
// a Locker not on a pool, or a field out of range is an error matching
// fw's sentinels (all of them joined), never a panic. Zero fields take the
// values of def, the adapter's DefaultConfig: Skipper, Commit, Namespace,
// RetryAfter, DenyHandler and ErrorHandler. Scope and Mode are copied out
// of cfg's pointers: changing them later changes nothing.
func New[C any](fw *Framework[C], cfg, def Config[C]) (*Middleware[C], error) {
	e := &fw.Errors
	var errs []error
	switch {
	case cfg.Locker == nil:
		errs = append(errs, e.NilLocker)
	case !cfg.Locker.Pooled():
		// Requests run concurrently: each hold needs a connection of its own.
		errs = append(errs, fmt.Errorf("%w: the Locker is on one connection or transaction; give it a pool (*pgxpool.Pool or *sql.DB)", e.InvalidConfig))
	}
	if cfg.KeyExtractor == nil {
		errs = append(errs, e.NilKeyExtractor)
	}
	if cfg.Wait < 0 {
		errs = append(errs, fmt.Errorf("%w: Wait %v is negative", e.InvalidConfig, cfg.Wait))
	}
	if s := cfg.Scope; s != nil && *s != pglock.Session && *s != pglock.Transaction {
		errs = append(errs, fmt.Errorf("%w: Scope %d", e.InvalidConfig, int(*s)))
	}
	if md := cfg.Mode; md != nil && *md != pglock.Exclusive && *md != pglock.Shared {
		errs = append(errs, fmt.Errorf("%w: Mode %d", e.InvalidConfig, int(*md)))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if cfg.Skipper == nil {
		cfg.Skipper = def.Skipper
	}
	if cfg.Commit == nil {
		cfg.Commit = def.Commit
	}
	if cfg.Namespace == "" {
		cfg.Namespace = def.Namespace
	}
	if cfg.RetryAfter == 0 {
		cfg.RetryAfter = def.RetryAfter
	}
	if cfg.DenyHandler == nil {
		cfg.DenyHandler = def.DenyHandler
	}
	if cfg.ErrorHandler == nil {
		cfg.ErrorHandler = def.ErrorHandler
	}
	m := &Middleware[C]{fw: fw, cfg: cfg, scope: cfg.Locker.Scope(), mode: cfg.Locker.Mode(),
		errRollback: errors.New(fw.Name + ": commit rule said roll back")}
	if cfg.Scope != nil {
		m.scope = *cfg.Scope
	}
	if cfg.Mode != nil {
		m.mode = *cfg.Mode
	}
	m.cfg.Scope, m.cfg.Mode = nil, nil
	for _, mode := range []pglock.Mode{pglock.Exclusive, pglock.Shared} {
		o := []pglock.Option{pglock.WithMode(mode), pglock.WithScope(m.scope)}
		if m.scope == pglock.Transaction {
			o = append(o, pglock.WithRollbackOnError(true)) // Commit decides
		}
		if cfg.Wait > 0 {
			o = append(o, pglock.WithWait(cfg.Wait))
		}
		m.lockOpts[mode] = o
	}
	if _, err := cfg.Locker.NewLock(fw.Name+":check", m.lockOpts[pglock.Exclusive]...); err != nil {
		return nil, fmt.Errorf("%w: %w", e.InvalidConfig, err)
	}
	return m, nil
}
