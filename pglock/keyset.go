package pglock

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/pglock/internal/lockconn"
)

// Key sets: several keys held at once, all or nothing (issue 24).
//
// Keys are taken in one canonical order (by Key: pairs after bigints, then
// by value), and a wait only ever waits for the lowest key not yet held,
// while holding lower keys only: two callers whose sets overlap take their
// common keys in the same order, so they cannot each hold what the other
// waits for. A try holds nothing when it fails.
//
// In Session scope on a multiplexing Locker the tries of a set run at once,
// so that the lock connection sends them in one statement (one round trip
// per lock connection, side by side); a key found busy is waited for alone,
// in the server's queue, and the keys above it are tried again once it is
// held. Elsewhere (one pool connection per hold, one connection) they run one
// after the other. In Transaction scope the keys are taken in one
// transaction, the first one's, one statement each.

// DoAll runs fn while holding the locks of every key in keys, as [Lock.Do]
// does for one: it waits (as Acquire does) until all are held, runs fn, and
// releases them all. The keys are taken in one canonical order, whatever
// their order in keys, so that callers whose sets overlap cannot deadlock
// each other; a key given twice is taken once. fn's context is cancelled
// with cause [ErrLockLost] when any of the holds is lost; in Transaction
// scope it carries the one transaction of them all (see [TxFromContext]).
// A Do or DoAll of any of the keys inside fn runs in these holds (see
// [Lock.Do]); keys already held by an enclosing Do of ctx are not taken
// again. An empty keys is an error ([ErrInvalidKey]); so is a nil fn.
//
// In Transaction scope the keys are taken in one transaction: the first
// key's own, or, in a transaction that exists already (a Locker on a
// caller's transaction, or inside an enclosing Do of one of the keys), a
// savepoint of it, rolled back when a key is busy (nothing of the set stays
// held, the transaction goes on) or fn fails; there the keys stay held until
// that transaction ends.
//
// Key sets take no fencing tokens ([WithToken]): lock a key alone for one.
// With one pool connection per hold ([WithMultiplexing] off), a set takes a
// pool connection per key, and one set of the Locker takes its keys at a
// time (two taking theirs at once could each wait for a connection the other
// keeps): keep sets smaller than the pool.
func (lk *Locker) DoAll(ctx context.Context, keys []any, fn func(ctx context.Context) error) error {
	_, err := lk.doAll(ctx, keys, fn, true)
	return err
}

// TryDoAll runs fn only if every key in keys is free now, holding them all
// (see [Locker.DoAll]), and reports whether fn ran. When one key is busy it
// holds none of them afterwards and returns false, nil.
func (lk *Locker) TryDoAll(ctx context.Context, keys []any, fn func(ctx context.Context) error) (bool, error) {
	return lk.doAll(ctx, keys, fn, false)
}

// multiplexes reports whether the Locker holds its session locks on lock
// connections (not one pool connection per hold). On a *sql.DB that is
// known once the Locker is ready (see mux.init, which decides it): call it
// after sharesConns, or after an acquire of the Locker succeeded.
func (lk *Locker) multiplexes() bool { return lk.mux != nil && lk.mux.perHold == nil }

// sharesConns is multiplexes, made ready first (within ctx).
func (lk *Locker) sharesConns(ctx context.Context) (bool, error) {
	if lk.mux == nil {
		return false, nil
	}
	if err := lk.mux.init(ctx); err != nil {
		return false, fmt.Errorf("%w: key set: %w", ErrNotAcquired, lk.mux.closedErr(ctx, err))
	}
	return lk.multiplexes(), nil
}

// noToken turns WithToken off: the Locks of a key set take no tokens.
func noToken(c *config) { c.token = false }

// setKey is one key of a set: its Key and what it was given as (so that the
// Lock's name, in events and logs, is the caller's).
type setKey struct {
	key Key
	arg any
}

// compareKeys is the canonical order of keys in a set.
func compareKeys(a, b Key) int {
	if a.pair != b.pair {
		if a.pair {
			return 1
		}
		return -1
	}
	return cmp.Compare(a.v, b.v)
}

// keySet returns keys in canonical order, each once.
func (lk *Locker) keySet(keys []any) ([]setKey, error) {
	if len(keys) == 0 {
		return nil, fmt.Errorf("%w: a key set needs at least one key", ErrInvalidKey)
	}
	set := make([]setKey, 0, len(keys))
	for i, arg := range keys {
		k, err := lk.cfg.keyOf(arg)
		if err != nil {
			return nil, fmt.Errorf("key %d of the set: %w", i, err)
		}
		set = append(set, setKey{key: k, arg: arg})
	}
	slices.SortStableFunc(set, func(a, b setKey) int { return compareKeys(a.key, b.key) })
	return slices.CompactFunc(set, func(a, b setKey) bool { return a.key == b.key }), nil
}

func (lk *Locker) doAll(ctx context.Context, keys []any, fn func(ctx context.Context) error, wait bool) (bool, error) {
	if err := lk.unmade(); err != nil {
		return false, fmt.Errorf("%w: %w", ErrNotAcquired, err)
	}
	if fn == nil {
		return false, fmt.Errorf("%w: key set", ErrNilFunc)
	}
	if ctx == nil {
		return false, fmt.Errorf("%w: key set: nil context", ErrNotAcquired)
	}
	set, err := lk.keySet(keys)
	if err != nil {
		return false, fmt.Errorf("%w: %w", ErrNotAcquired, err)
	}
	if lk.cfg.scope == Transaction {
		return lk.doAllTx(ctx, set, fn, wait)
	}
	// The keys an enclosing Do of ctx holds are its; the others are taken.
	var locks []*Lock
	for _, sk := range set {
		l, err := lk.NewLock(sk.arg, noToken)
		if err != nil {
			if errors.Is(err, ErrLockerClosed) {
				err = fmt.Errorf("%w: %w", ErrNotAcquired, err)
			}
			return false, err
		}
		if h := l.enclosing(ctx); h != nil {
			if err := l.nestErr(ctx, h); err != nil {
				return false, err
			}
			continue
		}
		locks = append(locks, l)
	}
	ok, err := lk.acquireSet(ctx, locks, wait)
	if err != nil || !ok {
		return false, err
	}
	return true, runSet(ctx, locks, lk.multiplexes(), fn)
}

// acquireSet takes every lock of locks (in canonical order): all held when
// it returns true, none when it returns false or an error.
func (lk *Locker) acquireSet(ctx context.Context, locks []*Lock, wait bool) (bool, error) {
	shared, err := lk.sharesConns(ctx)
	if err != nil {
		return false, err
	}
	if !shared && len(locks) > 1 {
		// Each hold takes a pool connection: two sets taking theirs at
		// once could each wait for a connection the other keeps. One set
		// of the Locker takes its keys at a time.
		select {
		case lk.setGate <- struct{}{}:
			defer func() { <-lk.setGate }()
		case <-ctx.Done():
			return false, fmt.Errorf("%w: key set: waiting for another set of the Locker to take its keys: %w", ErrNotAcquired, ctx.Err())
		}
	}
	n := len(locks)
	held := 0 // locks[:held] are held
	giveUp := func(err error) (bool, error) {
		return false, join(err, releaseAll(context.WithoutCancel(ctx), locks[:held], shared))
	}
	oks := make([]bool, n)
	errs := make([]error, n)
	for held < n {
		lk.trySet(ctx, locks[held:], oks[held:], errs[held:], shared)
		j := held
		for j < n && oks[j] && errs[j] == nil {
			j++
		}
		// Keys above the first busy one are let go: a wait holds lower
		// keys only.
		var above []*Lock
		var firstErr error
		for i := j; i < n; i++ {
			switch {
			case errs[i] != nil && firstErr == nil:
				firstErr = errs[i]
			case oks[i] && errs[i] == nil:
				above = append(above, locks[i])
			}
		}
		held = j
		if rerr := releaseAll(context.WithoutCancel(ctx), above, shared); rerr != nil && firstErr == nil {
			firstErr = rerr
		}
		switch {
		case firstErr != nil:
			return giveUp(firstErr)
		case held == n:
			return true, nil
		case !wait:
			return giveUp(nil)
		}
		// The wait is a wait of the holder of the keys below it (see
		// deadlock.go): a holder elsewhere that waits for one of them
		// closes a cycle that ends.
		wctx := ctx
		for _, l := range locks[:held] {
			wctx = ContextWithHold(wctx, l)
		}
		if err := locks[held].Acquire(wctx); err != nil {
			return giveUp(err)
		}
		held++
	}
	return true, nil
}

// trySet tries every lock of locks, at once on a multiplexing Locker (the
// lock connections send concurrent tries in one statement), else one after
// the other until one is busy or fails (shared: see sharesConns).
func (lk *Locker) trySet(ctx context.Context, locks []*Lock, oks []bool, errs []error, shared bool) {
	clear(oks)
	clear(errs)
	if !shared || len(locks) == 1 {
		for i, l := range locks {
			oks[i], errs[i] = l.TryAcquire(ctx)
			if !oks[i] || errs[i] != nil {
				return
			}
		}
		return
	}
	var wg sync.WaitGroup
	batch := lockconn.NewSetBatch(len(locks))
	for i, l := range locks {
		m := batch.Member()
		mctx := lockconn.WithSetMember(ctx, m)
		wg.Go(func() {
			oks[i], errs[i] = l.TryAcquire(mctx)
			m.Arrive() // a try that never reached a lock connection
		})
	}
	wg.Wait()
}

// releaseAll releases locks and joins their errors: at once on a
// multiplexing Locker (mux: the unlocks share statements, as the tries do),
// else the last first.
func releaseAll(ctx context.Context, locks []*Lock, mux bool) error {
	errs := make([]error, len(locks))
	if mux && len(locks) > 1 {
		var wg sync.WaitGroup
		batch := lockconn.NewSetBatch(len(locks))
		for i, l := range locks {
			m := batch.Member()
			mctx := lockconn.WithSetMember(ctx, m)
			wg.Go(func() {
				errs[i] = l.Release(mctx)
				m.Arrive() // a release that sent no unlock
			})
		}
		wg.Wait()
	} else {
		for i := len(locks) - 1; i >= 0; i-- {
			errs[i] = locks[i].Release(ctx)
		}
	}
	return join(errs...)
}

// runSet runs fn while locks are held, then releases them: fn's context
// carries every hold and is cancelled with ErrLockLost when one is lost.
// A panic in fn releases them and panics again.
func runSet(ctx context.Context, locks []*Lock, mux bool, fn func(ctx context.Context) error) (err error) {
	cctx, cancel := context.WithCancelCause(ctx)
	var fctx context.Context = cctx
	for _, l := range locks {
		fctx = newHoldCtx(fctx, l)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	for _, l := range locks {
		lost := l.Lost()
		wg.Go(func() {
			select {
			case <-lost:
				cancel(fmt.Errorf("%w: key %s of the set", ErrLockLost, l.key))
			case <-done:
			}
		})
	}
	defer func() {
		close(done)
		wg.Wait()
		cancel(errHoldEnded) // before the unlocks, as Do's
		rerr := releaseAll(context.WithoutCancel(ctx), locks, mux)
		if v := recover(); v != nil {
			panic(v)
		}
		err = join(err, rerr)
	}()
	return fn(fctx)
}

// doAllTx is DoAll in Transaction scope. On a Locker of a pool the first
// key's Lock opens the transaction (as Do does), the others are taken in
// it, in order, one statement each, and fn runs in it: its end (commit, or
// rollback on an error) releases them all. In a transaction that exists
// already (a Locker on a caller's transaction, or the first key held by an
// enclosing Do of ctx) the keys are taken, and fn runs, in a savepoint of
// it: rolled back when a key is busy or fails (which lets the keys taken
// since go), or fn fails (with RollbackOnError) or panics; else released,
// and the keys stay held until that transaction ends.
func (lk *Locker) doAllTx(ctx context.Context, set []setKey, fn func(ctx context.Context) error, wait bool) (bool, error) {
	first, err := lk.NewLock(set[0].arg, noToken)
	if err != nil {
		if errors.Is(err, ErrLockerClosed) {
			err = fmt.Errorf("%w: %w", ErrNotAcquired, err)
		}
		return false, err
	}
	domain := domainOf(lk.conn)
	var tx any
	switch c := lk.conn.(type) {
	case pgx.Tx, *sql.Tx:
		tx = c
	default:
		if h := first.enclosing(ctx); h != nil {
			if err := first.nestErr(ctx, h); err != nil {
				return false, err
			}
			if t, ok := TxFromContext(ctx); ok {
				tx = t
			} else if t, ok := SQLTxFromContext(ctx); ok {
				tx = t
			}
		}
	}
	// take takes the keys of keys in tx, in order; busy: a try found one
	// taken.
	take := func(ctx context.Context, tx any, keys []setKey) (context.Context, error) {
		for _, sk := range keys {
			l, err := NewLock(tx, sk.key, WithMode(lk.cfg.mode), WithReleaseTimeout(lk.cfg.releaseTimeout))
			if err != nil {
				return ctx, err
			}
			l.domain = domain // the Locker's database: a nested Do of the key runs in it
			if h := l.enclosing(ctx); h != nil {
				if err := l.nestErr(ctx, h); err != nil {
					return ctx, err
				}
				continue
			}
			if wait {
				err = l.Acquire(ctx)
			} else {
				var ok bool
				if ok, err = l.TryAcquire(ctx); err == nil && !ok {
					return ctx, errSetBusy
				}
			}
			if err != nil {
				return ctx, err
			}
			ctx = newHoldCtx(ctx, l)
		}
		return ctx, nil
	}
	if tx != nil {
		if tx, ok := tx.(pgx.Tx); ok {
			ctx = ContextWithTx(ctx, tx)
		}
		if tx, ok := tx.(*sql.Tx); ok {
			ctx = ContextWithSQLTx(ctx, tx)
		}
		ran := false
		rollback := func(err error) bool {
			var te setTakeErr
			return errors.As(err, &te) || lk.cfg.rollbackOnError
		}
		err := inSavepoint(ctx, "pglock_set", rollback, func(ctx context.Context) error {
			ctx, err := take(ctx, tx, set)
			if err != nil {
				return setTakeErr{err}
			}
			ran = true
			return fn(ctx)
		})
		var te setTakeErr
		switch {
		case errors.As(err, &te) && errors.Is(te.err, errSetBusy):
			return false, nil
		case errors.As(err, &te):
			return false, te.err
		}
		return ran, err
	}
	rest := func(ctx context.Context) error {
		var tx any
		if t, ok := TxFromContext(ctx); ok {
			tx = t
		} else if t, ok := SQLTxFromContext(ctx); ok {
			tx = t
		} else {
			return fmt.Errorf("%w: key set: no transaction to take the other keys in", ErrNotAcquired)
		}
		ctx, err := take(ctx, tx, set[1:])
		if err != nil {
			return err
		}
		return fn(ctx)
	}
	if wait {
		return true, first.Do(ctx, rest)
	}
	ok, err := first.TryDo(ctx, rest)
	if errors.Is(err, errSetBusy) {
		return false, nil
	}
	return ok, err
}

// setTakeErr is the failure to take the keys of a set in a savepoint (see
// doAllTx), told apart from fn's errors.
type setTakeErr struct{ err error }

func (e setTakeErr) Error() string { return e.err.Error() }
func (e setTakeErr) Unwrap() error { return e.err }

// errSetBusy: a key of a set tried in Transaction scope was busy; the
// transaction is rolled back, which lets the others go.
var errSetBusy = errors.New("pglock: a key of the set is busy")
