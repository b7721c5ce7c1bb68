package pglock

import (
	"context"
	"database/sql"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// pgxSource is a *pgxpool.Pool, a caller's *pgx.Conn (or *pgxpool.Conn), or a
// caller's pgx.Tx.
type pgxSource struct {
	pool *pgxpool.Pool
	conn *pgx.Conn
	tx   pgx.Tx
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
	b := &pgxBackend{l: l, st: l.st}
	switch {
	case s.pool != nil:
		pc, err := s.pool.Acquire(ctx)
		if err != nil {
			return nil, err
		}
		b.pooled, b.conn = pc, pc.Conn()
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
	conn     *pgx.Conn
	pooled   *pgxpool.Conn // the pool's connection, pinned for the hold
	callerTx pgx.Tx        // the caller's transaction
	ownTx    pgx.Tx        // the lock's own transaction (Transaction scope)
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

func (b *pgxBackend) acquireSession(ctx context.Context, wait bool) (bool, error) {
	ok, err := b.try(ctx, b.conn)
	if err != nil {
		b.close(false)
		return false, err
	}
	if ok || !wait {
		if !ok {
			b.close(true)
		}
		return ok, nil
	}
	held, healthy, err := waitSession(ctx, b.l, b.conn)
	if held {
		return true, nil
	}
	b.close(healthy) // a pooled connection in doubt is destroyed
	return false, err
}

// waitSession waits in the server's queue on conn until the session lock is
// granted or ctx ends. When it is not held afterwards, healthy reports
// whether conn is known to be usable and without the lock: the server may
// have granted the lock as the cancel arrived, so it is looked up and given
// back.
func waitSession(ctx context.Context, l *Lock, conn *pgx.Conn) (held, healthy bool, err error) {
	interrupted, err := interruptible(ctx, l, conn, func(qctx context.Context) error {
		_, err := conn.Exec(qctx, l.st.lock, l.st.args...)
		return err
	})
	if err == nil && !interrupted {
		return true, true, nil
	}
	if conn.IsClosed() {
		return false, false, err
	}
	cctx, cancel := bounded(ctx, l.cfg.releaseTimeout)
	defer cancel()
	cerr := retryCanceled(func() error {
		_, err := conn.Exec(cctx, l.st.cleanup, l.cleanupArgs()...)
		return err
	})
	if cerr != nil {
		return false, false, errors.Join(err, errUnlockFailed, cerr)
	}
	return false, true, err
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
		tx, err = b.conn.BeginTx(qctx, pgx.TxOptions{BeginQuery: "BEGIN; " + b.l.lockLiteral()})
		return err
	})
	if err == nil && !interrupted {
		b.ownTx = tx
		return true, nil
	}
	b.endFailedTx(ctx) // destroys a closed connection, rolls back on a live one
	return false, err
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
	err := retryCanceled(func() error {
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

// waitInTx waits for the xact lock inside the transaction open on conn. The
// wait runs under a savepoint, so that a failed or cancelled wait leaves the
// transaction usable and without the lock. When the lock is not held,
// healthy reports whether that is known to be so.
func waitInTx(ctx context.Context, l *Lock, conn *pgx.Conn) (held, healthy bool, err error) {
	const sp = "pglock_wait"
	interrupted, err := interruptible(ctx, l, conn, func(qctx context.Context) error {
		_, err := conn.Exec(qctx, "SAVEPOINT "+sp+"; "+l.lockLiteral())
		return err
	})
	rctx, cancel := bounded(ctx, l.cfg.releaseTimeout)
	defer cancel()
	if err == nil && !interrupted {
		if _, err = conn.Exec(rctx, "RELEASE SAVEPOINT "+sp); err != nil {
			return false, false, err
		}
		return true, true, nil
	}
	if conn.IsClosed() {
		return false, false, err
	}
	rerr := retryCanceled(func() error {
		_, err := conn.Exec(rctx, "ROLLBACK TO SAVEPOINT "+sp+"; RELEASE SAVEPOINT "+sp)
		return err
	})
	return false, rerr == nil, errors.Join(err, rerr)
}

// interruptible runs a statement that waits for a lock. Its context is not
// the caller's: pgx answers a cancelled context by closing the connection,
// which would lose every other lock on it and break a caller's connection.
// Instead, when ctx ends, a cancel request asks the server to stop the wait,
// and the connection stays usable.
//
// The cancel request and the statement's end share one bound, the release
// timeout: when the server cannot be reached in that time (a silent
// network), the statement's own context is cancelled and pgx closes the
// connection (conn.IsClosed tells; a stop that came after the statement
// ended leaves the connection usable). interrupted reports whether ctx ended while the statement ran: then the
// caller must treat a success as a lock granted as the cancel arrived, and
// give it back.
func interruptible(ctx context.Context, l *Lock, conn *pgx.Conn, run func(context.Context) error) (interrupted bool, err error) {
	if ctx.Done() == nil {
		return false, run(ctx)
	}
	qctx, hardStop := context.WithCancel(context.WithoutCancel(ctx))
	defer hardStop()
	var fired atomic.Bool
	finished := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		select {
		case <-finished:
			return
		case <-ctx.Done():
		}
		select {
		case <-finished:
			return
		default:
		}
		fired.Store(true)
		bound, cancel := context.WithTimeout(context.Background(), l.cfg.releaseTimeout)
		defer cancel()
		if conn.PgConn().CancelRequest(bound) == nil {
			select {
			case <-finished:
				return
			case <-bound.Done():
			}
		}
		hardStop()
	})
	err = run(qctx)
	close(finished)
	// Wait for the cancel request to complete before the connection is used
	// again, so that it cannot interrupt a later statement.
	wg.Wait()
	return fired.Load(), err
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
		if err != nil && closed {
			return errors.Join(ErrLockLost, err)
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
	err := retryCanceled(func() error {
		return b.conn.QueryRow(rctx, b.st.unlock, b.st.args...).Scan(&ok)
	})
	b.reattach()
	closed := b.conn.IsClosed()
	b.close(err == nil)
	switch {
	case err != nil && closed:
		return errors.Join(ErrLockLost, err)
	case err != nil:
		return errors.Join(errUnlockFailed, err)
	case !ok:
		return errServerNotHeld
	}
	return nil
}

func (b *pgxBackend) watch(interval time.Duration, lost func(error)) func() {
	if b.pooled == nil || b.l.cfg.scope != Session {
		return nil
	}
	w := &pgxWatcher{interval: interval, lost: lost}
	w.attach(b.conn)
	return watchAfter(min(watchDelay, interval), w.run, w.stop)
}

// watchDelay is how long a hold lasts before its connection is watched: most
// holds (a request, a job step) end sooner and never pay for a goroutine and
// a blocked read. A connection that dies during the delay is noticed when the
// watch starts.
const watchDelay = 50 * time.Millisecond

// watchAfter runs run in its own goroutine after delay. The returned function
// cancels it if it has not started, else interrupts it, and waits for it.
func watchAfter(delay time.Duration, run, interrupt func()) func() {
	var wg sync.WaitGroup
	wg.Add(1)
	t := time.AfterFunc(delay, func() {
		defer wg.Done()
		run()
	})
	return func() {
		if t.Stop() {
			wg.Done()
		} else {
			interrupt()
		}
		wg.Wait()
	}
}

// pgxWatcher watches an idle pinned connection. It blocks reading from it, so
// that a connection the server closes (pg_terminate_backend, shutdown) is
// noticed at once; after each quiet interval it pings, so that a connection
// that went silent is noticed within two intervals.
type pgxWatcher struct {
	interval time.Duration
	lost     func(error)

	mu       sync.Mutex
	conn     *pgx.Conn
	nc       net.Conn
	reading  bool
	stopping bool
}

func (w *pgxWatcher) attach(conn *pgx.Conn) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.conn, w.nc = conn, conn.PgConn().Conn()
}

// run watches until stop is called or the connection dies.
func (w *pgxWatcher) run() {
	for {
		w.mu.Lock()
		if w.stopping {
			w.mu.Unlock()
			return
		}
		w.reading = true
		_ = w.nc.SetReadDeadline(time.Now().Add(w.interval))
		w.mu.Unlock()

		// No context: the read deadline above bounds the wait, and a timeout
		// leaves the connection usable.
		err := w.conn.PgConn().WaitForNotification(context.Background())

		w.mu.Lock()
		w.reading = false
		_ = w.nc.SetReadDeadline(time.Time{})
		stopping := w.stopping
		w.mu.Unlock()

		var netErr net.Error
		timedOut := errors.As(err, &netErr) && netErr.Timeout()
		switch {
		case err != nil && !timedOut:
			w.lost(err)
			return
		case stopping:
			return
		case err == nil:
			continue // a notification: not ours to handle
		}
		ctx, cancel := context.WithTimeout(context.Background(), w.interval)
		err = w.conn.Ping(ctx)
		cancel()
		if err != nil {
			w.lost(err)
			return
		}
	}
}

// stop asks run to return soon: it interrupts a blocked read.
func (w *pgxWatcher) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stopping = true
	if w.reading {
		_ = w.nc.SetReadDeadline(time.Now())
	}
}
