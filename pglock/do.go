package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
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
//
// Do owns its hold: only Do ends it, when fn returns. While fn runs,
// [Lock.Release] and [Lock.HandleError] on the same Lock, from fn or from
// another goroutine, change nothing and return an error matching [ErrInDo],
// and Acquire and TryAcquire return [ErrAlreadyHeld]. To stop early, fn
// returns (with an error to roll back); another goroutine cancels ctx.
//
// Do is re-entrant through its context: fn's context carries the hold, and a
// Do or TryDo of the same key on the same database inside it (the same
// Locker, another Locker or NewLock on the same pool, *sql.DB or
// connection) runs its function at once in the enclosing hold, which it
// neither takes again nor ends; in Transaction scope that function runs in
// a savepoint of the enclosing transaction, rolled back when it fails (with
// RollbackOnError) or panics. The nested Do fails (ErrLockLost) if the
// enclosing hold ends or is lost while its function runs, and a context
// kept past its hold is never taken for a later one. fn's context ends when
// the hold does, before the unlock (cause matching ErrLockLost), so that a
// goroutine fn left running knows. A nesting the enclosing hold cannot cover
// (Shared held and Exclusive asked, or Session scope held and Transaction
// scope asked) fails at once with [ErrSelfDeadlock] instead of waiting for
// itself. Acquire and TryAcquire are not re-entrant (see [Lock]), nor are
// holds of another database or of a caller's transaction (whose locks
// PostgreSQL stacks on its one session). The adapters' request, job and call
// contexts carry their holds (see [ContextWithHold]), so a handler's Do of its
// own key just runs.
//
// In Transaction scope on a pool or connection the transaction is the lock's:
// if fn commits or rolls it back itself (Commit or Rollback on it, or a COMMIT
// or ROLLBACK statement), the lock ends with it at that moment, and Do returns
// an error matching [ErrTxEnded] (joined with fn's error, if any) that says
// whether the work was committed, as far as can be known; it never reports a
// plain failure for work that fn committed, nor success for work that fn
// rolled back.
func (l *Lock) Do(ctx context.Context, fn func(ctx context.Context) error) (err error) {
	if err := l.unmade(); err != nil {
		return fmt.Errorf("%w: %w", ErrNotAcquired, err)
	}
	if fn == nil {
		return fmt.Errorf("%w: Do on key %s", ErrNilFunc, l.key)
	}
	if ctx != nil {
		if h := l.enclosing(ctx); h != nil {
			_, err := l.nested(ctx, h, fn)
			return err
		}
	}
	ctx, end := l.trace(ctx, "do")
	held := false
	if end != nil {
		defer endTraced(end, &held, &err)
	}
	actx, aend := l.trace(ctx, "acquire")
	_, err = l.acquire(actx, true, true)
	if aend != nil {
		aend(err == nil, err)
	}
	if err != nil {
		return err
	}
	held = true
	return l.run(ctx, fn)
}

// TryDo is the non-blocking Do: it runs fn only if the lock is free now, and
// reports whether fn ran. (false, nil) means another session holds the lock.
// While fn runs, the hold is TryDo's, as it is Do's: Release and HandleError
// on the Lock return [ErrInDo] and change nothing, and a transaction that fn
// ends itself is reported with [ErrTxEnded] (see [Lock.Do]).
func (l *Lock) TryDo(ctx context.Context, fn func(ctx context.Context) error) (ok bool, err error) {
	if err := l.unmade(); err != nil {
		return false, fmt.Errorf("%w: %w", ErrNotAcquired, err)
	}
	if fn == nil {
		return false, fmt.Errorf("%w: TryDo on key %s", ErrNilFunc, l.key)
	}
	if ctx != nil {
		if h := l.enclosing(ctx); h != nil {
			return l.nested(ctx, h, fn)
		}
	}
	ctx, end := l.trace(ctx, "trydo")
	if end != nil {
		defer endTraced(end, &ok, &err)
	}
	ok, err = l.acquire(ctx, false, true)
	if err != nil || !ok {
		return false, err
	}
	return true, l.run(ctx, fn)
}

// run runs fn on a held lock and ends the hold.
func (l *Lock) run(ctx context.Context, fn func(ctx context.Context) error) (err error) {
	cctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var fctx context.Context = newHoldCtx(cctx, l)
	l.mu.Lock()
	b, given := l.b, l.tx
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
	if token := l.Token(); token != 0 {
		fctx = ContextWithToken(fctx, token)
	}
	if b != nil {
		if given != nil {
			fctx = ContextWithTx(fctx, given)
		} else if tx := b.pgxTx(); tx != nil {
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
		cancel(errHoldEnded)
		if l.cfg.rollbackOnError || (l.cfg.scope == Transaction && !l.src.callerTx()) {
			_ = l.end(ctx, false, true)
		} else {
			_ = l.end(ctx, true, true)
		}
		if v != nil {
			panic(v)
		}
	}()
	err = fn(fctx)
	panicked = false
	if h := l.handled.Swap(nil); h != nil && err == nil {
		err = *h // HandleError during fn: roll back, and say why
	}

	// fn's context ends before the unlock: a goroutine it left running
	// with it sees that before another session can take the key.
	cancel(errHoldEnded)
	if err != nil {
		commit := !(l.cfg.rollbackOnError && l.cfg.scope == Transaction)
		if rerr := l.end(ctx, commit, true); rerr != nil {
			return join(err, rerr)
		}
		return err
	}
	if rerr := l.end(ctx, true, true); rerr != nil {
		return rerr
	}
	return nil
}

// givenTx is the lock's own pgx transaction as the Lock hands it out
// ([Lock.Tx], [TxFromContext]). It remembers how its user ended it, if they
// did, with Commit or Rollback, so that the end of the hold can say whether
// the work was committed (see [ErrTxEnded]). Everything else is the
// transaction's own.
type givenTx struct {
	pgx.Tx
	mu    sync.Mutex
	ended error // nil while the user has not ended it
}

func (t *givenTx) Commit(ctx context.Context) error {
	// A COMMIT or ROLLBACK statement ended it already: Commit sends a COMMIT
	// that changes nothing, so its outcome says nothing of the work.
	open := t.open()
	err := t.Tx.Commit(ctx)
	if !open || errors.Is(err, pgx.ErrTxClosed) {
		return err
	}
	var pgErr *pgconn.PgError
	switch {
	case err == nil:
		t.record("Commit on its pgx.Tx: the work is committed", nil)
	case errors.Is(err, pgx.ErrTxCommitRollback):
		t.record("Commit on its pgx.Tx found it failed and rolled it back: the work is not committed", nil)
	case errors.As(err, &pgErr) || pgconn.SafeToRetry(err):
		// The server refused the COMMIT, or it was never sent (and pgx
		// closed the connection): rolled back either way.
		t.record("Commit on its pgx.Tx failed: the work is not committed", err)
	default:
		t.record("Commit on its pgx.Tx failed on the way: whether the work is committed is unknown", err)
	}
	return err
}

func (t *givenTx) Rollback(ctx context.Context) error {
	open := t.open()
	err := t.Tx.Rollback(ctx)
	if open && !errors.Is(err, pgx.ErrTxClosed) {
		// A failed rollback closes the connection: rolled back either way.
		t.record("Rollback on its pgx.Tx: the work is not committed", nil)
	}
	return err
}

// open reports whether the connection is in a transaction, as far as the
// client knows.
func (t *givenTx) open() bool {
	c := t.Tx.Conn()
	return c != nil && !c.IsClosed() && c.PgConn().TxStatus() != 'I'
}

func (t *givenTx) record(what string, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.ended != nil:
	case err != nil:
		t.ended = fmt.Errorf("%w: %s: %w", ErrTxEnded, what, err)
	default:
		t.ended = fmt.Errorf("%w: %s", ErrTxEnded, what)
	}
}

// endedErr returns how the user ended the transaction, or nil.
func (t *givenTx) endedErr() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.ended
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
