package pglock

import (
	"context"
	"database/sql"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// Do is the with statement: it acquires the lock (waiting as Acquire does),
// runs fn, and releases the lock.
//
// fn's context is ctx, cancelled with cause [ErrLockLost] if the hold is lost
// while fn runs (see [Lock.Lost]); in Transaction scope it carries the lock's
// transaction (see [TxFromContext] and [SQLTxFromContext]).
//
// When fn returns nil, Do releases the lock (in Transaction scope, commits)
// and returns the release error. When fn returns an error, Do rolls back
// first if RollbackOnError is on (the default), then releases, and returns
// fn's error joined with any release error. When fn panics, Do rolls back
// when RollbackOnError is on (always, for the lock's own transaction: work
// cut short by a panic is never committed), releases, and panics again with
// the same value. A nil fn is an error ([ErrNilFunc]) and takes no lock.
func (l *Lock) Do(ctx context.Context, fn func(ctx context.Context) error) error {
	if fn == nil {
		return fmt.Errorf("%w: Do on key %s", ErrNilFunc, l.key)
	}
	if err := l.Acquire(ctx); err != nil {
		return err
	}
	return l.run(ctx, fn)
}

// TryDo is the non-blocking Do: it runs fn only if the lock is free now, and
// reports whether fn ran. (false, nil) means another session holds the lock.
func (l *Lock) TryDo(ctx context.Context, fn func(ctx context.Context) error) (bool, error) {
	if fn == nil {
		return false, fmt.Errorf("%w: TryDo on key %s", ErrNilFunc, l.key)
	}
	ok, err := l.TryAcquire(ctx)
	if err != nil || !ok {
		return false, err
	}
	return true, l.run(ctx, fn)
}

// run runs fn on a held lock and ends the hold.
func (l *Lock) run(ctx context.Context, fn func(ctx context.Context) error) (err error) {
	fctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	l.mu.Lock()
	b := l.b
	l.mu.Unlock()
	// A loss while fn runs cancels fn's context (markLost calls onLost).
	l.lostMu.Lock()
	if l.lostDone {
		cancel(ErrLockLost)
	} else {
		l.onLost = cancel
	}
	l.lostMu.Unlock()
	defer func() {
		l.lostMu.Lock()
		l.onLost = nil
		l.lostMu.Unlock()
	}()
	if b != nil {
		if tx := b.pgxTx(); tx != nil {
			fctx = ContextWithTx(fctx, tx)
		}
		if tx := b.sqlTx(); tx != nil {
			fctx = ContextWithSQLTx(fctx, tx)
		}
	}

	panicked := true
	defer func() {
		if !panicked {
			return
		}
		v := recover() // nil: fn called runtime.Goexit (t.FailNow)
		if l.cfg.rollbackOnError || (l.cfg.scope == Transaction && !l.src.callerTx()) {
			_ = l.end(ctx, false)
		} else {
			_ = l.end(ctx, true)
		}
		if v != nil {
			panic(v)
		}
	}()
	err = fn(fctx)
	panicked = false

	if err != nil {
		commit := !(l.cfg.rollbackOnError && l.cfg.scope == Transaction)
		if rerr := l.end(ctx, commit); rerr != nil {
			return join(err, rerr)
		}
		return err
	}
	if rerr := l.end(ctx, true); rerr != nil {
		return rerr
	}
	return nil
}

type pgxTxKey struct{}
type sqlTxKey struct{}

// TxFromContext returns the pgx transaction of a lock held in Transaction
// scope, inside the function given to Do or TryDo (of a Lock or Locker) on
// a pgx pool, connection or transaction. Work done in it commits or rolls
// back together with the lock.
func TxFromContext(ctx context.Context) (pgx.Tx, bool) {
	tx, ok := ctx.Value(pgxTxKey{}).(pgx.Tx)
	return tx, ok
}

// SQLTxFromContext is TxFromContext for database/sql: the *sql.Tx of a lock
// held in Transaction scope on a *sql.DB, *sql.Conn or *sql.Tx.
func SQLTxFromContext(ctx context.Context) (*sql.Tx, bool) {
	tx, ok := ctx.Value(sqlTxKey{}).(*sql.Tx)
	return tx, ok
}

// ContextWithTx returns a copy of ctx that carries tx, for adapters and
// tests that run work in a transaction they got from a Lock: TxFromContext
// returns it.
func ContextWithTx(ctx context.Context, tx pgx.Tx) context.Context {
	return context.WithValue(ctx, pgxTxKey{}, tx)
}

// ContextWithSQLTx is ContextWithTx for database/sql.
func ContextWithSQLTx(ctx context.Context, tx *sql.Tx) context.Context {
	return context.WithValue(ctx, sqlTxKey{}, tx)
}
