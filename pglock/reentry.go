package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
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
// 40P01, reachable with errors.As as a *pgconn.PgError), or the library saw
// it first ([ErrSelfDeadlock]). The lock is not held (it matches
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
// runs in.
type holdCtx struct {
	context.Context
	l *Lock
}

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
	if l == nil || l.src == nil {
		return ctx
	}
	return &holdCtx{Context: ctx, l: l}
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
	}
	return nil
}

// enclosing returns the hold of ctx's enclosing Do that holds l's key on
// l's database, if any.
func (l *Lock) enclosing(ctx context.Context) *holdCtx {
	h, _ := ctx.Value(holdsKey{}).(*holdCtx)
	for h != nil {
		if h.l == l || (h.l.key == l.key && l.domain != nil && h.l.domain == l.domain) {
			return h
		}
		h, _ = h.Context.Value(holdsKey{}).(*holdCtx)
	}
	return nil
}

// nested runs fn in the enclosing hold h (see Do): at once when h holds the
// key in a mode and scope that cover l's, else it fails (see nestErr). ran
// reports whether fn ran.
func (l *Lock) nested(ctx context.Context, h *holdCtx, fn func(ctx context.Context) error) (ran bool, err error) {
	if err := l.nestErr(ctx, h); err != nil {
		l.emit(EventNotAcquired, 0, err)
		return false, err
	}
	return true, fn(ctx)
}

// nestErr returns nil when the enclosing hold h covers a hold of l: it
// holds the key in a mode and scope that cover l's. Else ErrSelfDeadlock; a
// hold that ended, or was lost, fails as a lock not acquired.
func (l *Lock) nestErr(ctx context.Context, h *holdCtx) error {
	outer := h.l
	switch {
	case ctx.Err() != nil || !outer.Held() || outer.isLost():
		cause := context.Cause(ctx)
		if cause == nil {
			cause = ErrLockLost
		}
		return fmt.Errorf("%w: key %s: the enclosing hold of this key has ended: %w", ErrNotAcquired, l.key, cause)
	case outer.cfg.mode == Shared && l.cfg.mode == Exclusive:
		return fmt.Errorf("%w: %w: %w: key %s is held in Shared mode by an enclosing Do of this context;"+
			" an Exclusive lock inside it would wait for it (take the outer lock in Exclusive mode)",
			ErrNotAcquired, ErrDeadlock, ErrSelfDeadlock, l.key)
	case outer.cfg.scope == Session && l.cfg.scope == Transaction:
		return fmt.Errorf("%w: %w: %w: key %s is held in Session scope by an enclosing Do of this context;"+
			" a Transaction-scope lock inside it needs a transaction of its own and would wait for it"+
			" (take the outer lock in Transaction scope, or the inner one in Session scope)",
			ErrNotAcquired, ErrDeadlock, ErrSelfDeadlock, l.key)
	}
	return nil
}
