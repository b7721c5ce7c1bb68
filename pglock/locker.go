package pglock

import (
	"context"
	"errors"
	"fmt"
)

// Locker makes Locks on one database with shared defaults (scope, mode,
// logger, namespace, wait and check settings). It is what adapters take.
// A Locker is safe for concurrent use; the Locks it makes are not shared.
type Locker struct {
	conn   any
	cfg    config
	pooled bool
}

// NewLocker returns a Locker for conn, which is one of the types [New]
// takes; usually a *pgxpool.Pool or *sql.DB. opts are the defaults of every
// Lock it makes. An unsupported conn or an invalid option is an error.
func NewLocker(conn any, opts ...Option) (*Locker, error) {
	cfg := defaultConfig()
	for _, o := range opts {
		if o == nil {
			cfg.invalid("nil Option")
			continue
		}
		o(&cfg)
	}
	if err := errors.Join(cfg.errs...); err != nil {
		return nil, err
	}
	// newSource settles the scope (Transaction on a caller's transaction).
	src, err := newSource(conn, &cfg)
	if err != nil {
		return nil, err
	}
	return &Locker{conn: conn, cfg: cfg, pooled: src.owned()}, nil
}

// Lock returns a new Lock on key with the Locker's options, then opts.
func (lk *Locker) Lock(key any, opts ...Option) (*Lock, error) {
	if lk == nil {
		return nil, fmt.Errorf("%w: nil *pglock.Locker", ErrUnsupportedConn)
	}
	cfg := lk.cfg
	cfg.errs = nil
	return newLock(lk.conn, key, &cfg, opts)
}

// Do runs fn while holding the lock on key, as [Lock.Do] does.
func (lk *Locker) Do(ctx context.Context, key any, fn func(ctx context.Context) error) error {
	l, err := lk.Lock(key)
	if err != nil {
		return err
	}
	return l.Do(ctx, fn)
}

// TryDo runs fn only if the lock on key is free now, as [Lock.TryDo] does.
func (lk *Locker) TryDo(ctx context.Context, key any, fn func(ctx context.Context) error) (bool, error) {
	l, err := lk.Lock(key)
	if err != nil {
		return false, err
	}
	return l.TryDo(ctx, fn)
}

// Key returns the Key that key maps to under the Locker's namespace: the key
// its Locks take, for looking it up in pg_locks.
func (lk *Locker) Key(key any) (Key, error) {
	return lk.cfg.keyOf(key)
}

// Scope returns the scope of the Locks it makes by default.
func (lk *Locker) Scope() Scope { return lk.cfg.scope }

// Mode returns the mode of the Locks it makes by default.
func (lk *Locker) Mode() Mode { return lk.cfg.mode }

// Pooled reports whether the Locker is on a pool (*pgxpool.Pool, *sql.DB):
// then each hold takes a connection of its own, so Locks used concurrently
// exclude each other. On one connection (or transaction) concurrent use is a
// data race, and PostgreSQL stacks a session's locks instead of excluding:
// adapters that lock concurrent requests or jobs require a pooled Locker.
func (lk *Locker) Pooled() bool { return lk != nil && lk.pooled }
