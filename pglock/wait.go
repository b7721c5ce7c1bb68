package pglock

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pglockkit/kit/pglock/internal/lockconn"
	"github.com/pglockkit/kit/pglock/internal/pooler"
)

// waitSession waits in the server's queue on conn until the session lock is
// granted or ctx ends. When it is not held afterwards, healthy reports
// whether conn is known to be usable and without the lock: the server may
// have granted the lock as the cancel arrived, so it is looked up and given
// back.
func waitSession(ctx context.Context, l *Lock, conn *pgx.Conn) (held, healthy bool, err error) {
	held, healthy, _, err = waitSessionAs(ctx, l, conn, false)
	return held, healthy, err
}

// tryOrWaitSQL takes a key exclusively, waiting in the server's queue when
// it must: 1 when the key was taken at once, 2 when it was waited for (the
// try fails while another session holds the key or waits for it), of a
// bigint and of a pair key.
var tryOrWaitSQL = [2]string{
	`SELECT CASE WHEN pg_try_advisory_lock($1::bigint) THEN 1 ELSE (SELECT 2 FROM pg_advisory_lock($1::bigint)) END`,
	`SELECT CASE WHEN pg_try_advisory_lock($1::integer, $2::integer) THEN 1 ELSE (SELECT 2 FROM pg_advisory_lock($1::integer, $2::integer)) END`,
}

// waitSessionAs is waitSession; hot (an exclusive key that a session of
// another process contends for, see keytable.HotFor), with tryOrWaitSQL, and
// contended reports that the wait had to wait: another session held the key
// or waited for it when it began. Through a pooler hot changes nothing, and
// contended is false.
func waitSessionAs(ctx context.Context, l *Lock, conn *pgx.Conn, hot bool) (held, healthy, contended bool, err error) {
	if err := ctx.Err(); err != nil {
		return false, true, false, err // nothing sent
	}
	// Through a pooler, the wait proves it runs on the session the
	// connection claimed, and takes nothing elsewhere (see pooler.Proof).
	proof := pooler.ProofOf(conn)
	// A wait inside a hold names the hold in its text (see deadlock.go).
	rec := cycleRecOf(ctx)
	rec.waitsOn(conn)
	interrupted, err := interruptible(ctx, l, conn, func(qctx context.Context) error {
		if proof == nil && hot {
			var r int32
			sql, args := rec.tagged(tryOrWaitSQL[pairIndex(l.key)], l.st.args)
			err := conn.QueryRow(qctx, sql, args...).Scan(&r)
			contended = r == 2
			return err
		}
		if proof == nil {
			sql, args := rec.tagged(l.st.lock, l.st.args)
			_, err := conn.Exec(qctx, sql, args...)
			return err
		}
		var ok *bool
		sql, args := rec.tagged(pooler.ProvenSQL(l.st.lock, len(l.st.args), true), proof.With(l.st.args))
		err := conn.QueryRow(qctx, sql, args...).Scan(&ok)
		if err == nil && ok == nil {
			err = pooler.ErrSessionMoved
		}
		return err
	})
	if err == nil && !interrupted {
		return true, true, contended, nil
	}
	if errors.Is(err, pooler.ErrSessionMoved) {
		return false, false, false, err // nothing taken; the connection is refused
	}
	if conn.IsClosed() {
		return false, false, false, err
	}
	cctx, cancel := bounded(ctx, l.cfg.releaseTimeout)
	defer cancel()
	cerr := lockconn.RetryCanceled(func() error {
		_, err := conn.Exec(cctx, l.st.cleanup, l.cleanupArgs()...)
		return err
	})
	if cerr != nil {
		return false, false, false, join(err, errUnlockFailed, cerr)
	}
	return false, true, false, err
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
	rec := cycleRecOf(ctx)
	rec.waitsOn(conn)
	interrupted, err := interruptible(ctx, l, conn, func(qctx context.Context) error {
		q := "SAVEPOINT " + sp + "; " + l.lockLiteral()
		if rec != nil {
			q += rec.comment
		}
		_, err := conn.Exec(qctx, q)
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
	rerr := lockconn.RetryCanceled(func() error {
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
	stop := context.AfterFunc(ctx, func() {
		if errors.Is(context.Cause(ctx), ErrLockerClosed) {
			// The Locker's Close (see mux.waitContext): the connection
			// is closed next, whatever the cancel does, and Close is
			// bounded as its other session ends are.
			w.bound = min(w.bound, lockconn.MaxSessionEnd)
		}
		w.fire()
	})
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

// relayWait is a wait for a key in the server's queue that the owner of a
// hold sent on its waiting connection, right after the hold's unlock and in
// the same write, for the next goroutine of the process that waits for the
// key (see mux.relay): the unlock's result has been read, the wait's is
// still to come.
type relayWait struct {
	conn *lockConn        // the waiting connection, with its place
	pc   *pgconn.PgConn   // the session the wait was sent on
	p    *pgconn.Pipeline // the wait's result, and the sync after it, are pending
	sent time.Time
}

// relayStatements names the prepared unlock and wait of a relay, of a bigint
// and of a pair key.
var relayStatements = [2][2]string{
	{"pglock_relay_unlock", "pglock_relay_wait"},
	{"pglock_relay_unlock_pair", "pglock_relay_wait_pair"},
}

// sendRelay unlocks k (held exclusively once on conn) and queues a wait for
// it in the server on the same session, in one pipeline sent in one write,
// so that no other statement of the session comes between them: a session
// of another process already waiting is granted the key by the unlock, and
// the wait queues behind it. The wait is tryOrWaitSQL's, which tells
// whether it had to wait. sendRelay reads the unlock's result (held: the key
// was held) and returns the pipeline, whose wait is pending. On an error the
// connection is closed, which ends the wait too (and frees the key); gone
// reports that the error itself ended the session (the hold was lost), not
// a statement that failed on a live one.
func sendRelay(conn *pgx.Conn, k Key) (p *pgconn.Pipeline, held, gone bool, err error) {
	ctx := context.Background()
	st := &fixed[Session][Exclusive][pairIndex(k)]
	names := relayStatements[pairIndex(k)]
	unlock, err := conn.Prepare(ctx, names[0], st.unlock)
	if err == nil {
		var lock *pgconn.StatementDescription
		if lock, err = conn.Prepare(ctx, names[1], tryOrWaitSQL[pairIndex(k)]); err == nil {
			return sendRelayed(conn, k, unlock, lock)
		}
	}
	gone = conn.IsClosed()
	if !gone {
		_ = conn.PgConn().Conn().Close()
		_ = conn.Close(ctx)
	}
	return nil, false, gone, err
}

// sendRelayed is sendRelay once its statements are prepared.
func sendRelayed(conn *pgx.Conn, k Key, unlock, lock *pgconn.StatementDescription) (p *pgconn.Pipeline, held, gone bool, err error) {
	params := textArgs(k)
	p = conn.PgConn().StartPipeline(context.Background())
	p.SendQueryStatement(unlock, params, nil, nil)
	p.SendPipelineSync()
	p.SendQueryStatement(lock, params, nil, nil)
	p.SendPipelineSync()
	err = p.Flush()
	if err == nil {
		held, err = relayUnlocked(p)
	}
	if err != nil {
		// A pipeline that failed on the way has closed the connection; one
		// that is still open waits for the key: end the session.
		gone = conn.IsClosed()
		_ = conn.PgConn().Conn().Close()
		_ = p.Close()
		return nil, false, gone, err
	}
	return p, held, false, nil
}

// relayUnlocked reads the result of a relay's unlock, and the sync after it.
func relayUnlocked(p *pgconn.Pipeline) (bool, error) {
	res, err := p.GetResults()
	if err != nil {
		return false, err
	}
	rr, ok := res.(*pgconn.ResultReader)
	if !ok {
		return false, fmt.Errorf("pglock: relay: unexpected %T for the unlock", res)
	}
	held, err := oneRowIs(rr, "t")
	if err != nil {
		return false, err
	}
	res, err = p.GetResults()
	if err != nil {
		return false, err
	}
	if _, ok := res.(*pgconn.PipelineSync); !ok {
		return false, fmt.Errorf("pglock: relay: unexpected %T after the unlock", res)
	}
	return held, nil
}

// waitRelayed finishes a relayed wait (see sendRelay) on conn, as
// waitSession does a wait of its own: until the key is granted or ctx ends
// (at once, for a ctx that has ended), then a cancel request stops it and a
// grant that came as it arrived is given back; bound bounds the cancel and
// the cleanup. contended: the wait was waited (see tryOrWaitSQL). A conn
// that is not the session the wait was sent on (the connection was replaced
// since) holds nothing.
func waitRelayed(ctx context.Context, conn *pgx.Conn, rw *relayWait, k Key, bound time.Duration) (held, healthy, contended bool, err error) {
	if conn == nil || conn.PgConn() != rw.pc {
		return false, false, false, fmt.Errorf("%w: the session of a relayed wait is gone", errConnGone)
	}
	w := &waitStop{conn: conn, bound: bound}
	w.wg.Add(1)
	stop := context.AfterFunc(ctx, w.fire)
	contended, err = relayGranted(rw.p)
	// A grant read when ctx had ended (as may be at once, for a ctx that
	// had ended before) is given back too.
	interrupted := w.finish(stop) || ctx.Err() != nil
	if err == nil && !interrupted {
		return true, true, contended, nil
	}
	if err == nil {
		err = ctx.Err()
	}
	if conn.IsClosed() {
		return false, false, false, err
	}
	cctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	st := &fixed[Session][Exclusive][pairIndex(k)]
	classid, objid, objsubid := k.LockTag()
	args := append(k.args(), int64(classid), int64(objid), objsubid)
	cerr := lockconn.RetryCanceled(func() error {
		_, err := conn.Exec(cctx, st.cleanup, args...)
		return err
	})
	if cerr != nil {
		return false, false, false, join(err, errUnlockFailed, cerr)
	}
	return false, true, false, err
}

// relayGranted reads the result of a relay's wait (contended: it was
// waited, see tryOrWaitSQL), and the sync after it, and ends the pipeline.
func relayGranted(p *pgconn.Pipeline) (contended bool, err error) {
	res, err := p.GetResults()
	if err == nil {
		if rr, ok := res.(*pgconn.ResultReader); ok {
			contended, err = oneRowIs(rr, "2")
		} else {
			err = fmt.Errorf("pglock: relay: unexpected %T for the wait", res)
		}
	}
	if cerr := p.Close(); err == nil {
		err = cerr
	}
	return contended, err
}

// oneRowIs reads rr to its end and reports whether it had exactly one row,
// of one column whose text is want, without copying the rows (as
// ResultReader.Read does: a relay reads two results a hand-off).
func oneRowIs(rr *pgconn.ResultReader, want string) (bool, error) {
	rows, is := 0, false
	for rr.NextRow() {
		rows++
		vals := rr.Values()
		is = len(vals) == 1 && string(vals[0]) == want
	}
	if _, err := rr.Close(); err != nil {
		return false, err
	}
	return rows == 1 && is, nil
}

// textArgs returns the bind arguments of the SQL functions for k in text
// format.
func textArgs(k Key) [][]byte {
	if k.pair {
		a, b := k.halves()
		return [][]byte{strconv.AppendInt(nil, int64(a), 10), strconv.AppendInt(nil, int64(b), 10)}
	}
	return [][]byte{strconv.AppendInt(nil, k.v, 10)}
}
