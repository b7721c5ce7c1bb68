package pglock

import (
	"context"
	"database/sql"
	"errors"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock/internal/lockconn"
	"github.com/pglockkit/kit/pglock/internal/pooler"
)

// pgxSource is a *pgxpool.Pool, a caller's *pgx.Conn (or *pgxpool.Conn), or a
// caller's pgx.Tx.
type pgxSource struct {
	pool *pgxpool.Pool
	conn *pgx.Conn
	tx   pgx.Tx
	// guard is the lock-table guard of the source's server, found at its
	// first acquire (see pgxBackend.admit).
	guard atomic.Pointer[callerGuard]
}

func (s *pgxSource) owned() bool    { return s.pool != nil }
func (s *pgxSource) callerTx() bool { return s.tx != nil }
func (s *pgxSource) kind() string {
	switch {
	case s.pool != nil:
		return "pgxpool.Pool"
	case s.tx != nil:
		return "pgx.Tx"
	default:
		return "pgx.Conn"
	}
}

func (s *pgxSource) open(ctx context.Context, l *Lock) (backend, error) {
	b := &pgxBackend{l: l, st: &l.st, src: s}
	switch {
	case s.pool != nil:
		pc, err := s.pool.Acquire(ctx)
		if err != nil {
			return nil, err
		}
		b.pooled, b.conn = pc, pc.Conn()
		// The hold's server-side bound (see buildBounded): in Session scope
		// it needs idle_session_timeout (PostgreSQL 14 and later).
		l.bindPool(l.cfg.scope == Transaction || serverMajor(b.conn) >= 14)
	case s.tx != nil:
		b.callerTx, b.conn = s.tx, s.tx.Conn()
	default:
		b.conn = s.conn
	}
	return b, nil
}

// pgxBackend runs one hold on a pgx connection.
type pgxBackend struct {
	l        *Lock
	st       *statements
	src      *pgxSource
	conn     *pgx.Conn
	pooled   *pgxpool.Conn // the pool's connection, pinned for the hold
	callerTx pgx.Tx        // the caller's transaction
	ownTx    pgx.Tx        // the lock's own transaction (Transaction scope)
	g        *callerGuard  // the lock-table guard of the server (see admit)
	// prevApp is the application_name the pooled connection had before a
	// Leader's campaign named it (named; see nameHold), given back by close.
	prevApp string
	named   bool
}

func (b *pgxBackend) guarded() *callerGuard { return b.g }

// admit is the lock-table guard's check (see tableGuard), counting on the
// hold's session when a count is due.
func (b *pgxBackend) admit(ctx context.Context) error {
	if b.g = b.src.guard.Load(); b.g == nil {
		b.g = connGuard(b.conn)
		b.src.guard.Store(b.g)
	}
	return b.l.admitCaller(ctx, b.g, func(ctx context.Context, sql string) rowScanner {
		if b.callerTx != nil {
			return b.callerTx.QueryRow(ctx, sql)
		}
		return b.conn.QueryRow(ctx, sql)
	})
}

// guardDataKey is the key of a connection's callerGuard in its CustomData.
const guardDataKey = "pglock.guard"

// connGuard returns the callerGuard of conn's server, found once per
// connection: a source made per Lock (NewLock) would otherwise look it up, by
// the server's address as text, at every hold.
func connGuard(conn *pgx.Conn) *callerGuard {
	data := conn.PgConn().CustomData()
	if g, ok := data[guardDataKey].(*callerGuard); ok {
		return g
	}
	g := guardFor(serverAddr(conn))
	data[guardDataKey] = g
	return g
}

func (b *pgxBackend) pgxTx() pgx.Tx {
	if b.callerTx != nil {
		return b.callerTx
	}
	return b.ownTx
}

func (b *pgxBackend) sqlTx() *sql.Tx { return nil }

func (b *pgxBackend) bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	return bounded(ctx, b.l.cfg.releaseTimeout)
}

// detach returns a context for statements that never wait for a lock and
// must not be interrupted by ctx (unlock, commit, the first try), bounded
// instead by a deadline on the connection's socket, set here and cleared by
// reattach: a statement the deadline cuts off makes pgx close the
// connection, as a cancelled context would, and close then destroys it. On
// the hot path this costs no context, timer or context watch per statement.
func (b *pgxBackend) detach(ctx context.Context) context.Context {
	_ = b.conn.PgConn().Conn().SetDeadline(time.Now().Add(b.l.cfg.releaseTimeout))
	if ctx.Done() == nil {
		return ctx
	}
	return context.WithoutCancel(ctx)
}

// reattach clears detach's deadline.
func (b *pgxBackend) reattach() {
	if !b.conn.IsClosed() {
		_ = b.conn.PgConn().Conn().SetDeadline(time.Time{})
	}
}

// close gives the pinned connection back to the pool, or destroys it when
// its state is in doubt (healthy false). A caller's connection is left alone.
func (b *pgxBackend) close(healthy bool) {
	if b.pooled == nil {
		return
	}
	pc := b.pooled
	b.pooled = nil
	if b.named && healthy && !b.conn.IsClosed() {
		// A Leader's identity does not go back to the pool (see nameHold).
		err := unnameHold(b.detach(context.Background()), b.conn, b.prevApp)
		b.reattach()
		healthy = err == nil
	}
	b.named = false
	if healthy && !b.conn.IsClosed() {
		pc.Release() // destroys it anyway if it is busy or inside a transaction
		return
	}
	conn := pc.Hijack()
	ctx, cancel := context.WithTimeout(context.Background(), b.l.cfg.releaseTimeout)
	defer cancel()
	_ = conn.Close(ctx)
}

func (b *pgxBackend) acquire(ctx context.Context, wait bool) (bool, error) {
	if err := b.admit(ctx); err != nil {
		b.close(true)
		return false, err
	}
	if b.l.cfg.scope == Transaction {
		// Primaries only (see checkPrimary; in Session scope the pooler
		// check's claim asks, in acquireSession). close does nothing to a
		// caller's connection or transaction.
		if err := checkPrimary(ctx, b.conn, b.l.cfg.releaseTimeout); err != nil {
			b.close(false) // a pool connects again, perhaps to another host
			return false, err
		}
	}
	switch {
	case b.l.cfg.scope == Session:
		return b.acquireSession(ctx, wait)
	case b.callerTx != nil:
		return b.acquireInCallerTx(ctx, wait)
	default:
		return b.acquireOwnTx(ctx, wait)
	}
}

// try runs the non-blocking lock function on q (the connection or a
// transaction). It is never interrupted by ctx, only bounded (see detach):
// pgx would close the connection mid-statement, and the server would keep a
// granted lock until it noticed, after Acquire had reported failure.
func (b *pgxBackend) try(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) (bool, error) {
	ctx = b.detach(ctx)
	defer b.reattach()
	var ok bool
	err := q.QueryRow(ctx, b.st.try, b.st.args...).Scan(&ok)
	return ok, err
}

// acquireSession takes the session lock. A blocking acquire goes straight to
// the server's queue (pg_advisory_lock): one round trip whether the key is
// free or held, and no try before it that a busy key would pay for.
func (b *pgxBackend) acquireSession(ctx context.Context, wait bool) (bool, error) {
	if err := pooler.Check(ctx, b.conn, b.l.cfg.releaseTimeout, notePrimary); err != nil {
		b.close(errors.Is(err, ErrTransactionPooler) && !b.conn.IsClosed())
		return false, err
	}
	if err := checkPrimary(ctx, b.conn, b.l.cfg.releaseTimeout); err != nil {
		b.close(false) // a pool connects again, perhaps to another host
		return false, err
	}
	if b.pooled != nil && b.l.cfg.campaign {
		// A Leader's campaign: the session carries its identity from
		// before it waits until the connection goes back (see nameHold).
		var err error
		b.prevApp, b.named, err = nameHold(b.detach(ctx), b.conn, b.l)
		b.reattach()
		if err != nil {
			b.close(false)
			return false, err
		}
	}
	if wait {
		held, healthy, err := waitSession(ctx, b.l, b.conn)
		if held {
			return true, nil
		}
		b.close(healthy) // a pooled connection in doubt is destroyed
		return false, err
	}
	var ok bool
	var err error
	if proof := pooler.ProofOf(b.conn); proof != nil {
		// Through a pooler: the try proves it runs on the session the
		// connection claimed (see pooler.Proof).
		dctx := b.detach(ctx)
		ok, err = pooler.ProvenTry(dctx, b.conn, proof, b.st.try, b.st.args)
		b.reattach()
	} else {
		ok, err = b.try(ctx, b.conn)
	}
	if err != nil {
		b.close(false)
		return false, err
	}
	if !ok {
		b.close(true)
	}
	return ok, nil
}

// acquireOwnTx opens the lock's transaction. The blocking form sends BEGIN
// and the lock in one round trip.
func (b *pgxBackend) acquireOwnTx(ctx context.Context, wait bool) (bool, error) {
	if !wait {
		tx, err := b.conn.Begin(b.detach(ctx))
		b.reattach()
		if err != nil {
			b.close(false)
			return false, err
		}
		ok, err := b.try(ctx, tx)
		if err != nil || !ok {
			b.endFailedTx(ctx)
			return false, err
		}
		b.ownTx = tx
		return true, nil
	}
	var tx pgx.Tx
	interrupted, err := interruptible(ctx, b.l, b.conn, func(qctx context.Context) error {
		var err error
		tx, err = b.conn.BeginTx(qctx, pgx.TxOptions{BeginQuery: b.l.ownTxBegin(b.txBoundKnown())})
		return err
	})
	if err == nil && !interrupted {
		b.ownTx = tx
		return true, nil
	}
	b.endFailedTx(ctx) // destroys a closed connection, rolls back on a live one
	return false, err
}

// txBoundKnown is what the primary check found of the session's own
// idle_in_transaction_session_timeout (see primaryTxSQL).
func (b *pgxBackend) txBoundKnown() txBoundKnown {
	switch own, known := sessionTxBound(b.conn); {
	case !known:
		return txBoundUnknown
	case own:
		return txBoundOwn
	}
	return txBoundNone
}

// endFailedTx rolls back the transaction that did not get the lock, if one
// is open, and closes the backend. It sends ROLLBACK itself rather than
// calling tx.Rollback: pgx's Rollback closes the connection on any error,
// even a late cancel that a retry would cure.
func (b *pgxBackend) endFailedTx(ctx context.Context) {
	if b.conn.IsClosed() {
		b.close(false)
		return
	}
	rctx, cancel := b.bounded(ctx)
	defer cancel()
	err := lockconn.RetryCanceled(func() error {
		if b.conn.PgConn().TxStatus() == 'I' {
			return nil
		}
		_, err := b.conn.Exec(rctx, "ROLLBACK")
		return err
	})
	b.close(err == nil)
}

// acquireInCallerTx takes the xact lock in the caller's transaction. A wait
// runs under a savepoint, so that a cancelled wait leaves the caller's
// transaction usable and without the lock.
func (b *pgxBackend) acquireInCallerTx(ctx context.Context, wait bool) (bool, error) {
	ok, err := b.try(ctx, b.callerTx)
	if err != nil || ok || !wait {
		return ok, err
	}
	held, _, err := waitInTx(ctx, b.l, b.conn)
	return held, err
}

func (b *pgxBackend) release(ctx context.Context, commit bool) error {
	switch {
	case b.l.cfg.scope == Session:
		return b.unlockSession(ctx)
	case b.callerTx != nil:
		if commit {
			return nil
		}
		rctx, cancel := b.bounded(ctx)
		defer cancel()
		if err := b.callerTx.Rollback(rctx); err != nil && !errors.Is(err, pgx.ErrTxClosed) {
			return err
		}
		return nil
	default:
		tx := b.ownTx
		b.ownTx = nil
		if !b.conn.IsClosed() && b.conn.PgConn().TxStatus() == 'I' {
			// The user ended the transaction (Commit or Rollback on it, or a
			// statement), and the lock with it: a COMMIT now would say
			// nothing of the work, and end nothing. The pgx.Tx is ended
			// still (its ROLLBACK on an idle session changes nothing), so
			// that a stale Rollback or Commit of it, later, cannot end
			// another user's transaction on this pooled connection.
			rerr := tx.Rollback(b.detach(ctx))
			b.reattach()
			b.close(rerr == nil || errors.Is(rerr, pgx.ErrTxClosed))
			return errTxEndedByStatement
		}
		rctx := b.detach(ctx)
		var err error
		if commit {
			err = tx.Commit(rctx)
		} else {
			err = tx.Rollback(rctx)
		}
		b.reattach() // before close: then the connection is no longer ours
		closed := b.conn.IsClosed()
		b.close(err == nil || (!closed && b.conn.PgConn().TxStatus() == 'I'))
		if errors.Is(err, pgx.ErrTxClosed) {
			// Ended by the user's Commit or Rollback, which then closed the
			// connection (or it left it in another transaction).
			return errTxEndedByStatement
		}
		if err != nil && closed {
			return join(ErrLockLost, err)
		}
		return err
	}
}

func (b *pgxBackend) discard() { b.close(false) }

func (b *pgxBackend) unlockSession(ctx context.Context) error {
	if b.conn.IsClosed() {
		b.close(false)
		return ErrLockLost
	}
	rctx := b.detach(ctx)
	var ok bool
	err := lockconn.RetryCanceled(func() error {
		return b.conn.QueryRow(rctx, b.st.unlock, b.st.args...).Scan(&ok)
	})
	b.reattach()
	closed := b.conn.IsClosed()
	b.close(err == nil)
	switch {
	case err != nil && closed:
		return join(ErrLockLost, err)
	case err != nil:
		return join(errUnlockFailed, err)
	case !ok:
		return errServerNotHeld
	}
	return nil
}

func (b *pgxBackend) token(ctx context.Context) (int64, error) {
	if tx := b.pgxTx(); tx != nil {
		// In the transaction: a NOWAIT failure would abort it, so the
		// statement waits (bounded by the release timeout).
		return b.l.takeToken(ctx, func() (int64, error) { return b.l.tokenOnce(ctx, tx, false, true) })
	}
	return b.l.takeToken(ctx, func() (int64, error) { return b.l.tokenOnce(ctx, b.conn, true, true) })
}
