package pglock

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// waitSession waits in the server's queue on conn until the session lock is
// granted or ctx ends. When it is not held afterwards, healthy reports
// whether conn is known to be usable and without the lock: the server may
// have granted the lock as the cancel arrived, so it is looked up and given
// back.
func waitSession(ctx context.Context, l *Lock, conn *pgx.Conn) (held, healthy bool, err error) {
	if err := ctx.Err(); err != nil {
		return false, true, err // nothing sent
	}
	// Through a pooler, the wait proves it runs on the session the
	// connection claimed, and takes nothing elsewhere (see sessionProof).
	proof := proofOf(conn)
	interrupted, err := interruptible(ctx, l, conn, func(qctx context.Context) error {
		if proof == nil {
			_, err := conn.Exec(qctx, l.st.lock, l.st.args...)
			return err
		}
		var ok *bool
		err := conn.QueryRow(qctx, provenSQL(l.st.lock, len(l.st.args), true), proof.with(l.st.args)...).Scan(&ok)
		if err == nil && ok == nil {
			err = errSessionMoved
		}
		return err
	})
	if err == nil && !interrupted {
		return true, true, nil
	}
	if errors.Is(err, errSessionMoved) {
		return false, false, err // nothing taken; the connection is refused
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
		return false, false, join(err, errUnlockFailed, cerr)
	}
	return false, true, err
}

// waitInTx waits for the xact lock inside the transaction open on conn. The
// wait runs under a savepoint, so that a failed or cancelled wait leaves the
// transaction usable and without the lock. When the lock is not held,
// healthy reports whether that is known to be so.
func waitInTx(ctx context.Context, l *Lock, conn *pgx.Conn) (held, healthy bool, err error) {
	const sp = "pglock_wait"
	if err := ctx.Err(); err != nil {
		return false, true, err // nothing sent
	}
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
	return false, rerr == nil, join(err, rerr)
}

// interruptible runs a statement that waits for a lock. Its context is not
// the caller's: pgx answers a cancelled context by closing the connection,
// which would lose every other lock on it and break a caller's connection.
// Instead, when ctx ends, a cancel request asks the server to stop the wait,
// and the connection stays usable.
//
// The cancel request and the statement's end share one bound, the release
// timeout: when the server cannot be reached in that time (a silent
// network), a deadline on the socket stops the statement and pgx closes the
// connection (conn.IsClosed tells). interrupted reports whether ctx ended
// while the statement ran: then the caller must treat a success as a lock
// granted as the cancel arrived, and give it back.
//
// No goroutine runs unless ctx ends during the statement (context.AfterFunc).
func interruptible(ctx context.Context, l *Lock, conn *pgx.Conn, run func(context.Context) error) (interrupted bool, err error) {
	if ctx.Done() == nil {
		return false, run(ctx)
	}
	if err := ctx.Err(); err != nil {
		return true, err // ended before the statement was sent: none is
	}
	w := &waitStop{conn: conn, bound: l.cfg.releaseTimeout}
	w.wg.Add(1)
	stop := context.AfterFunc(ctx, w.fire)
	err = run(context.WithoutCancel(ctx))
	return w.finish(stop), err
}

// waitStop stops a waiting statement when its context ends (see
// interruptible).
type waitStop struct {
	conn  *pgx.Conn
	bound time.Duration
	wg    sync.WaitGroup // fire has run, or will not

	mu       sync.Mutex
	finished bool          // the statement returned
	fired    bool          // ctx ended while it ran
	ended    chan struct{} // closed when it returns, once fired
}

// fire runs (in its own goroutine) when the context ends: it sends a cancel
// request and, if the statement does not end within the bound, cuts it off.
//
// A cancel request travels on a connection of its own, so it can reach the
// server before the statement it is meant for (the context ended just as
// the statement was sent): the server ignores a cancel request for a
// backend that runs nothing. So while the statement has not ended, fire
// sends another one after a short pause, doubling, until the bound.
func (w *waitStop) fire() {
	defer w.wg.Done()
	w.mu.Lock()
	if w.finished {
		w.mu.Unlock()
		return
	}
	w.fired, w.ended = true, make(chan struct{})
	w.mu.Unlock()
	deadline := time.Now().Add(w.bound)
	pause := cancelResend
	for {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		err := w.conn.PgConn().CancelRequest(ctx)
		cancel()
		wait := min(pause, time.Until(deadline))
		if err != nil || wait <= 0 {
			break
		}
		t := time.NewTimer(wait)
		select {
		case <-w.ended:
			t.Stop()
			return
		case <-t.C:
		}
		pause = min(2*pause, maxCancelResend)
	}
	// The server did not answer in time: a deadline in the past makes the
	// blocked read fail, and pgx close the connection.
	_ = w.conn.PgConn().Conn().SetDeadline(time.Now())
}

// cancelResend is the first pause before a cancel request is sent again for
// a statement that has not ended; the pause doubles up to maxCancelResend.
const (
	cancelResend    = 50 * time.Millisecond
	maxCancelResend = 500 * time.Millisecond
)

// finish records that the statement returned and waits for a cancel under
// way, so that it cannot interrupt a later statement; it reports whether
// the context ended while the statement ran.
func (w *waitStop) finish(stop func() bool) bool {
	w.mu.Lock()
	w.finished = true
	if w.ended != nil {
		close(w.ended)
	}
	fired := w.fired
	w.mu.Unlock()
	if stop() {
		w.wg.Done() // fire will not run
	}
	w.wg.Wait()
	if fired && !w.conn.IsClosed() {
		_ = w.conn.PgConn().Conn().SetDeadline(time.Time{})
	}
	return fired
}
