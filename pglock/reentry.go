package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock/internal/memlock"
)

// Re-entrant Do. The context that Do and TryDo give their function carries
// the hold (holdCtx), so that a Do or TryDo of the same key inside it, on the
// same database, runs at once in the enclosing hold instead of waiting for
// it: with lock connections, or a pool connection per hold, a second lock
// of a key goes to another session, which would wait for the first, held by
// the very goroutine that waits, until its context ended.

// ErrSelfDeadlock means a Do or TryDo was asked, inside the function of an
// enclosing Do (through its context), for a key that the enclosing hold
// already holds in a way the nested lock cannot share: Shared held and
// Exclusive asked, or Session scope held and Transaction scope asked (which
// needs a transaction of its own). Taking it would wait for the enclosing
// hold, which waits for the nested one to return: it fails at once instead.
// It matches [ErrDeadlock] and [ErrNotAcquired] too.
var ErrSelfDeadlock = errors.New("pglock: the lock would wait for its own enclosing hold")

// ErrDeadlock means a wait was ended because it was part of a cycle of waits
// that could never end: PostgreSQL's deadlock detector ended it (SQLSTATE
// 40P01, reachable with errors.As as a *pgconn.PgError), the library found
// a cycle of holders' waits that the server cannot see (see "Deadlocks
// between holders" in the package documentation; the message names the
// cycle's keys), or a nested lock would have waited for its own enclosing
// hold ([ErrSelfDeadlock]). The lock is not held (it matches
// [ErrNotAcquired]); the others in the cycle go on.
var ErrDeadlock = errors.New("pglock: deadlock")

// deadlockDetected is PostgreSQL's SQLSTATE for a wait its deadlock detector
// ended.
const deadlockDetected = "40P01"

// isDeadlock reports whether err is PostgreSQL's deadlock error.
func isDeadlock(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == deadlockDetected
}

// holdsKey is the context key of the innermost holdCtx.
type holdsKey struct{}

// holdCtx is the context of a Do's function: its parent, and the hold it
// runs in: l's hold number gen (see Lock.hold), so that a context kept past
// its hold never passes for a later hold of the same Lock, and what that
// hold was (key, database, mode and scope), kept here because a Lock of
// Locker.Do is used again for another key once its Do returns (see
// Locker.putLock): only l's hold number is read from l.
type holdCtx struct {
	context.Context
	l      *Lock
	gen    uint64
	key    Key
	domain any
	mode   Mode
	scope  Scope
}

// newHoldCtx returns the context of a function run in l's current hold (or,
// when l is not held, in no hold: see noHold), whose parent is ctx.
func newHoldCtx(ctx context.Context, l *Lock) *holdCtx {
	return &holdCtx{Context: ctx, l: l, gen: l.holdGen(), key: l.key, domain: l.domain, mode: l.cfg.mode, scope: l.cfg.scope}
}

// noHold is the gen of a holdCtx made for a Lock that was not held: no
// hold has it.
const noHold = ^uint64(0)

// holdGen returns the number of l's current hold, or noHold when l is not
// held or its hold was lost.
func (l *Lock) holdGen() uint64 {
	l.lostMu.Lock()
	defer l.lostMu.Unlock()
	if !l.held.Load() || l.lostDone {
		return noHold
	}
	return l.hold
}

// errHoldEnded is the cause with which the context of a Do's function ends
// when its hold ends (before the unlock): a goroutine that the function
// left running sees it before another session can take the key. For such a
// goroutine the lock is lost: it matches ErrLockLost.
var errHoldEnded = fmt.Errorf("%w: the hold of this context has ended", ErrLockLost)

func (c *holdCtx) Value(key any) any {
	if key == (holdsKey{}) {
		return c
	}
	return c.Context.Value(key)
}

// ContextWithHold returns a copy of ctx that carries l's current hold, for
// adapters that hold a lock without Do (a stream held from its first
// message): a Do or TryDo of l's key inside it runs in that hold, as it does
// inside Do's function (see [Lock.Do]). The hold must outlive the use of
// the context; once it ends, a nested Do in that context fails.
func ContextWithHold(ctx context.Context, l *Lock) context.Context {
	if ctx == nil || l == nil || l.src == nil {
		return ctx // a nil ctx stays nil: a lock in it fails with its error
	}
	return newHoldCtx(ctx, l)
}

// domainOf is the database conn stands for, as far as nesting goes: the
// pool, connection or database/sql handle itself (a pointer, so that
// comparing two is safe). Locks of the same key on the same domain take the
// same server's lock. A transaction (pgx.Tx, *sql.Tx) is nil: its locks are
// its session's, which PostgreSQL itself stacks.
func domainOf(conn any) any {
	switch c := conn.(type) {
	case *pgxpool.Pool, *pgxpool.Conn, *pgx.Conn, *sql.DB, *sql.Conn:
		return c
	case *memlock.Session: // the in-memory double: one replica's Locker
		return c
	}
	return nil
}

// enclosing returns the hold of ctx's enclosing Do that holds l's key on
// l's database, if any.
func (l *Lock) enclosing(ctx context.Context) *holdCtx {
	h, _ := ctx.Value(holdsKey{}).(*holdCtx)
	for h != nil {
		if h.key == l.key && (h.l == l || (l.domain != nil && h.domain == l.domain)) {
			return h
		}
		h, _ = h.Context.Value(holdsKey{}).(*holdCtx)
	}
	return nil
}

// nested runs fn in the enclosing hold h (see Do): at once when h holds the
// key in a mode and scope that cover l's, else it fails (see nestErr). ran
// reports whether fn ran.
//
// In Transaction scope inside a Transaction-scope hold, fn runs in a
// savepoint of the enclosing transaction, rolled back when fn fails (with
// RollbackOnError, the default) or panics, as the lock's own transaction
// would be. A hold that ends, or is lost, while fn runs fails the nested
// Do, whatever fn returned.
func (l *Lock) nested(ctx context.Context, h *holdCtx, fn func(ctx context.Context) error) (ran bool, err error) {
	if err := l.nestErr(ctx, h); err != nil {
		l.emit(EventNotAcquired, 0, err)
		return false, err
	}
	if l.cfg.scope == Transaction && h.scope == Transaction {
		rollback := l.cfg.rollbackOnError
		err = inSavepoint(ctx, "pglock_nested", func(error) bool { return rollback }, fn)
	} else {
		err = fn(ctx)
	}
	if h.l.holdGen() != h.gen {
		why := fmt.Errorf("%w: key %s: the enclosing hold ended while the nested function ran", ErrLockLost, l.key)
		if c := context.Cause(ctx); c != nil && errors.Is(c, ErrLockLost) {
			why = fmt.Errorf("key %s: the enclosing hold: %w", l.key, c)
		}
		return true, join(err, why)
	}
	return true, err
}

// inSavepoint runs fn in a savepoint of the transaction that ctx carries
// (TxFromContext or SQLTxFromContext): released when fn returns nil, rolled
// back when it panics, or fails and rollback says so; the panic goes on.
func inSavepoint(ctx context.Context, name string, rollback func(error) bool, fn func(ctx context.Context) error) (err error) {
	var tx any
	if t, ok := TxFromContext(ctx); ok {
		tx = t
	} else if t, ok := SQLTxFromContext(ctx); ok {
		tx = t
	}
	q, err := txOf("nested lock", tx)
	if err != nil {
		return err
	}
	bg := context.WithoutCancel(ctx)
	if _, err := q.exec(bg, "SAVEPOINT "+name); err != nil {
		return fmt.Errorf("pglock: savepoint for a nested lock: %w", err)
	}
	done := false
	defer func() {
		if done {
			return
		}
		_, _ = q.exec(bg, "ROLLBACK TO SAVEPOINT "+name+"; RELEASE SAVEPOINT "+name)
	}()
	err = fn(ctx)
	done = true
	end := "RELEASE SAVEPOINT " + name
	if err != nil && rollback(err) {
		end = "ROLLBACK TO SAVEPOINT " + name + "; " + end
	}
	if _, serr := q.exec(bg, end); serr != nil {
		return join(err, fmt.Errorf("pglock: end the savepoint of a nested lock: %w", serr))
	}
	return err
}

// nestErr returns nil when the enclosing hold h covers a hold of l: it
// holds the key in a mode and scope that cover l's. Else ErrSelfDeadlock; a
// hold that ended, or was lost, fails as a lock not acquired.
func (l *Lock) nestErr(ctx context.Context, h *holdCtx) error {
	switch {
	case ctx.Err() != nil || h.l.holdGen() != h.gen || h.gen == noHold:
		cause := context.Cause(ctx)
		if cause == nil {
			cause = ErrLockLost
		}
		return fmt.Errorf("%w: key %s: the enclosing hold of this key has ended: %w", ErrNotAcquired, l.key, cause)
	case h.mode == Shared && l.cfg.mode == Exclusive:
		return fmt.Errorf("%w: %w: %w: key %s is held in Shared mode by an enclosing Do of this context;"+
			" an Exclusive lock inside it would wait for it (take the outer lock in Exclusive mode)",
			ErrNotAcquired, ErrDeadlock, ErrSelfDeadlock, l.key)
	case h.scope == Session && l.cfg.scope == Transaction:
		return fmt.Errorf("%w: %w: %w: key %s is held in Session scope by an enclosing Do of this context;"+
			" a Transaction-scope lock inside it needs a transaction of its own and would wait for it"+
			" (take the outer lock in Transaction scope, or the inner one in Session scope)",
			ErrNotAcquired, ErrDeadlock, ErrSelfDeadlock, l.key)
	}
	return nil
}
