package pglock

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/pglock/internal/lockconn"
	"github.com/pglockkit/kit/pglock/internal/pooler"
)

// sqlSource is a *sql.DB, a caller's *sql.Conn, or a caller's *sql.Tx, with
// any PostgreSQL driver (pgx's stdlib, lib/pq).
//
// With pgx's stdlib driver, the lock reaches the *pgx.Conn under a *sql.Conn
// (sql.Conn.Raw) and waits and watches as it does on pgx. database/sql itself
// gives no portable way to interrupt a statement without risking the
// connection, so with other drivers, and on a caller's *sql.Tx (which has no
// Raw), waits poll the non-blocking lock function with a growing pause (from
// 5 ms up to maxPollInterval) instead: every connection stays usable when a
// wait is cancelled, at the price of FIFO order among waiters.
type sqlSource struct {
	db   *sql.DB
	conn *sql.Conn
	tx   *sql.Tx
	// guard is the lock-table guard of the source's server, found at its
	// first acquire (see sqlBackend.admit).
	guard atomic.Pointer[callerGuard]
}

const (
	minPollInterval = 5 * time.Millisecond
	maxPollInterval = 100 * time.Millisecond
)

func (s *sqlSource) owned() bool    { return s.db != nil }
func (s *sqlSource) callerTx() bool { return s.tx != nil }
func (s *sqlSource) kind() string {
	switch {
	case s.db != nil:
		return "sql.DB"
	case s.tx != nil:
		return "sql.Tx"
	default:
		return "sql.Conn"
	}
}

func (s *sqlSource) open(ctx context.Context, l *Lock) (backend, error) {
	b := &sqlBackend{l: l, st: &l.st, src: s}
	switch {
	case s.db != nil:
		c, err := s.db.Conn(ctx)
		if err != nil {
			return nil, err
		}
		b.conn, b.pinned = c, true
		// The hold's server-side bound (see buildBounded), with pgx's
		// driver, which tells the server's version (in Session scope it
		// needs idle_session_timeout, PostgreSQL 14 and later).
		bound := false
		b.withPgx(func(pc *pgx.Conn) { bound = l.cfg.scope == Transaction || serverMajor(pc) >= 14 })
		l.bindPool(bound)
	case s.tx != nil:
		b.callerTx = s.tx
	default:
		b.conn = s.conn
	}
	return b, nil
}

// sqlBackend is one hold of a Lock on a sqlSource. Its methods are in two
// files: backend_sql.go, the hold (try, wait, poll, acquire, release,
// close); backend_sql_conn.go, the connection under it (pgx's connection
// beneath database/sql, the watch and its pings, a lost connection's
// discard, a Leader's name, the fencing token, the primary check).
type sqlBackend struct {
	l        *Lock
	st       *statements
	src      *sqlSource
	conn     *sql.Conn // nil on a caller's transaction
	pinned   bool      // conn was taken from the *sql.DB for this hold
	callerTx *sql.Tx
	ownTx    *sql.Tx
	// txCancel ends ownTx's context: database/sql runs Commit and Rollback
	// under the context given to BeginTx, so this is how they are bounded.
	txCancel context.CancelFunc
	g        *callerGuard // the lock-table guard of the server (see admit)
	// prevApp is the application_name the pinned connection had before a
	// Leader's campaign named it (named; see nameHold), given back by close.
	prevApp string
	named   bool
}

func (b *sqlBackend) guarded() *callerGuard { return b.g }

// admit is the lock-table guard's check (see tableGuard), counting on the
// hold's session when a count is due. Only pgx's driver tells the server's
// address: the Locks on other drivers share one guard.
func (b *sqlBackend) admit(ctx context.Context) error {
	if b.g = b.src.guard.Load(); b.g == nil {
		addr := ""
		if b.conn != nil {
			b.withPgx(func(pc *pgx.Conn) { addr = serverAddr(pc) })
		}
		b.g = guardFor(addr)
		b.src.guard.Store(b.g)
	}
	return b.l.admitCaller(ctx, b.g, func(ctx context.Context, sql string) rowScanner {
		return b.target().QueryRowContext(ctx, sql)
	})
}

// boundTx cancels the own transaction's context if the returned stop is not
// called within the release timeout.
func (b *sqlBackend) boundTx() (stop func() bool) {
	return time.AfterFunc(b.l.cfg.releaseTimeout, b.txCancel).Stop
}

type sqlQuerier interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

func (b *sqlBackend) pgxTx() pgx.Tx { return nil }
func (b *sqlBackend) sqlTx() *sql.Tx {
	if b.callerTx != nil {
		return b.callerTx
	}
	return b.ownTx
}

// close returns a pinned connection to the pool, or destroys it when its
// state is in doubt. A caller's connection is left alone.
func (b *sqlBackend) close(healthy bool) {
	if !b.pinned {
		return
	}
	b.pinned = false
	if b.named && healthy {
		// A Leader's identity does not go back to the pool (see nameHold).
		healthy = b.unname() == nil
	}
	b.named = false
	if !healthy {
		_ = b.conn.Raw(func(any) error { return driver.ErrBadConn })
	}
	_ = b.conn.Close()
}

// target is where the lock's statements run: the transaction in Transaction
// scope, else the connection.
func (b *sqlBackend) target() sqlQuerier {
	if b.callerTx != nil {
		return b.callerTx
	}
	if b.ownTx != nil {
		return b.ownTx
	}
	return b.conn
}

func (b *sqlBackend) try(ctx context.Context) (bool, error) {
	var ok bool
	if b.ownTx == nil && b.callerTx == nil {
		if ran, err := b.onPgx(ctx, func(ctx context.Context, pc *pgx.Conn) error {
			if proof := pooler.ProofOf(pc); proof != nil && b.l.cfg.scope == Session {
				// Through a pooler: see pooler.Proof.
				var err error
				ok, err = pooler.ProvenTry(ctx, pc, proof, b.st.try, b.st.args)
				return err
			}
			return pc.QueryRow(ctx, b.st.try, b.st.args...).Scan(&ok)
		}); ran {
			return ok, err
		}
	}
	qctx, cancel := bounded(ctx, b.l.cfg.releaseTimeout)
	defer cancel()
	err := b.target().QueryRowContext(qctx, b.st.try, b.st.args...).Scan(&ok)
	return ok, err
}

// wait blocks until the lock is held or ctx ends. With pgx's driver it waits
// in the server's queue as the pgx backend does: in Session scope at once
// (one round trip whether the key is free or not); in the lock's own
// transaction after a try (a wait there needs a savepoint, which an
// uncontended lock should not pay for). With other drivers, and on a caller's
// *sql.Tx, it tries, then polls. When the lock is not held, healthy reports
// whether the connection is known to be usable and without the lock.
func (b *sqlBackend) wait(ctx context.Context) (held, healthy bool, err error) {
	if b.ownTx == nil && b.callerTx == nil {
		if b.withPgx(func(pc *pgx.Conn) { held, healthy, err = waitSession(ctx, b.l, pc) }) {
			return held, healthy, err
		}
	}
	if held, err = b.try(ctx); err != nil || held {
		return held, err == nil, err
	}
	if b.ownTx != nil && b.withPgx(func(pc *pgx.Conn) { held, healthy, err = waitInTx(ctx, b.l, pc) }) {
		return held, healthy, err
	}
	held, err = b.poll(ctx)
	return held, err == nil, err
}

// poll tries until the lock is held or ctx ends, with a growing pause.
func (b *sqlBackend) poll(ctx context.Context) (bool, error) {
	pause := minPollInterval
	t := time.NewTimer(0)
	defer t.Stop()
	<-t.C
	for {
		// Full jitter keeps pollers of one key from marching in step.
		t.Reset(pause/2 + rand.N(pause/2+1))
		select {
		case <-ctx.Done():
			return false, nil
		case <-t.C:
		}
		ok, err := b.try(ctx)
		if err != nil || ok {
			return ok, err
		}
		pause = min(2*pause, maxPollInterval)
	}
}

func (b *sqlBackend) acquire(ctx context.Context, wait bool) (bool, error) {
	if err := b.admit(ctx); err != nil {
		b.close(true)
		return false, err
	}
	if b.l.cfg.scope == Session {
		// Only pgx's driver shows the connection's cancel key, which the
		// check needs: with other drivers a transaction pooler goes unseen.
		var err error
		b.withPgx(func(pc *pgx.Conn) { err = pooler.Check(ctx, pc, b.l.cfg.releaseTimeout, notePrimary) })
		if err != nil {
			b.close(errors.Is(err, ErrTransactionPooler) && !b.connGone())
			return false, err
		}
	}
	// Primaries only (see checkPrimary): with pgx's driver, once per
	// connection (in Session scope, the claim above asked already); on a
	// caller's *sql.Tx, or with another driver, where the connection cannot
	// be reached to remember the answer, once per hold.
	var perr error
	if !b.withPgx(func(pc *pgx.Conn) { perr = checkPrimary(ctx, pc, b.l.cfg.releaseTimeout) }) {
		perr = b.checkPrimaryEachHold(ctx)
	}
	if perr != nil {
		b.close(false)
		return false, perr
	}
	if b.pinned && b.l.cfg.campaign && b.l.cfg.scope == Session {
		// A Leader's campaign: the session carries its identity from
		// before it waits until the connection goes back (see nameHold).
		if err := b.name(ctx); err != nil {
			b.close(false)
			return false, err
		}
	}
	if b.l.cfg.scope == Transaction && b.callerTx == nil {
		// The transaction must outlive ctx: database/sql rolls back a
		// transaction whose context ends.
		txCtx, txCancel := context.WithCancel(context.WithoutCancel(ctx))
		b.txCancel = txCancel
		stop := b.boundTx()
		tx, err := b.conn.BeginTx(txCtx, nil)
		stop()
		if err != nil {
			txCancel()
			b.close(false)
			return false, err
		}
		b.ownTx = tx
	}
	healthy := true
	var ok bool
	var err error
	if wait {
		ok, healthy, err = b.wait(ctx)
	} else {
		ok, err = b.try(ctx)
	}
	if ok {
		return true, nil
	}
	if err != nil && healthy {
		healthy = !errors.Is(err, driver.ErrBadConn)
	}
	if b.callerTx != nil {
		return false, err
	}
	if b.ownTx != nil {
		stop := b.boundTx()
		rerr := b.ownTx.Rollback()
		stop()
		b.txCancel()
		b.ownTx = nil
		healthy = healthy && rerr == nil
	}
	b.close(healthy)
	return false, err
}

func (b *sqlBackend) release(ctx context.Context, commit bool) error {
	switch {
	case b.l.cfg.scope == Session:
		var ok bool
		ran, err := b.onPgx(ctx, func(ctx context.Context, pc *pgx.Conn) error {
			return lockconn.RetryCanceled(func() error { return pc.QueryRow(ctx, b.st.unlock, b.st.args...).Scan(&ok) })
		})
		if !ran {
			rctx, cancel := bounded(ctx, b.l.cfg.releaseTimeout)
			defer cancel()
			err = b.conn.QueryRowContext(rctx, b.st.unlock, b.st.args...).Scan(&ok)
		}
		gone := err != nil && b.connGone()
		b.close(err == nil)
		switch {
		case gone || errors.Is(err, driver.ErrBadConn) || errors.Is(err, sql.ErrConnDone):
			return join(ErrLockLost, err)
		case err != nil:
			return join(errUnlockFailed, err)
		case !ok:
			return errServerNotHeld
		}
		return nil
	case b.callerTx != nil:
		if commit {
			return nil
		}
		if err := b.callerTx.Rollback(); err != nil && !errors.Is(err, sql.ErrTxDone) {
			return err
		}
		return nil
	default:
		tx := b.ownTx
		b.ownTx = nil
		// With pgx's driver the connection tells whether the transaction is
		// still open: a COMMIT or ROLLBACK statement of the user's ended it
		// without database/sql knowing. (Other drivers do not tell.)
		idle := false
		pgxDriver := b.withPgx(func(pc *pgx.Conn) { idle = !pc.IsClosed() && pc.PgConn().TxStatus() == 'I' })
		var err error
		stop := b.boundTx()
		if commit && !idle {
			err = tx.Commit()
		} else {
			// When idle, this only ends the *sql.Tx: the ROLLBACK it sends
			// changes nothing.
			err = tx.Rollback()
		}
		stop()
		b.txCancel()
		switch {
		case errors.Is(err, sql.ErrTxDone):
			// The user's Commit or Rollback on the *sql.Tx ended it.
			b.close(idle || (!pgxDriver && !b.connGone()))
			return errTxEndedSQL
		case idle:
			b.close(err == nil)
			return errTxEndedByStatement
		}
		// A connection that died took the transaction, and the lock, with it
		// (as on pgx: see pgxBackend.release).
		lost := err != nil && (errors.Is(err, driver.ErrBadConn) || b.connGone())
		b.close(err == nil)
		if lost {
			return join(ErrLockLost, err)
		}
		return err
	}
}
