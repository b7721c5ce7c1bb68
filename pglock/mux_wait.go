package pglock

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/pglock/internal/lockconn"
)

// wait waits for the key in the server's queue on a waiting connection. A
// counted wait (every wait but a Leader's campaign) first takes a place among
// WithWaitConns, which it keeps while it waits and, once granted, while it
// holds the key on that connection (a session that holds an exclusive key
// cannot hand it to another session without letting it go): so the Locker's
// server sessions never exceed WithLockConns + WithWaitConns (+ one per
// Leader). While every place is taken, the wait polls the key on its lock
// connection instead (see waitPlace), so that a key freed meanwhile is
// still taken, and a goroutine that holds a key on a waiting connection can
// take another one.
func (m *mux) wait(ctx context.Context, b *muxBackend, e *keyEntry) (bool, error) {
	mode := b.l.cfg.mode
	wctx, cancel := m.waitContext(ctx)
	defer cancel()
	// A Leader's campaign waits for as long as the process lives: it does
	// not count among the waits WithWaitConns bounds.
	counted := !b.l.cfg.campaign
	if counted {
		placed, held, err := m.waitPlace(wctx, e, mode)
		switch {
		case held:
			return true, nil
		case err != nil:
			return false, err
		case !placed:
			return false, m.waitErr(ctx)
		}
	}
	wc, held, healthy, err := m.serverWait(wctx, b, counted, false)
	if wc == nil {
		return false, ErrLockerClosed
	}
	return m.waited(ctx, e, mode, wc, held, healthy, err)
}

// waitContext is the context of a wait: ctx, ended by the Locker's Close
// too, with ErrLockerClosed as its cause (then the wait's cancel is bounded
// by lockconn.MaxSessionEnd, not the release timeout: see waitStop.fire).
func (m *mux) waitContext(ctx context.Context) (context.Context, func()) {
	wctx, cancel := context.WithCancelCause(ctx)
	stop := context.AfterFunc(m.closing, func() { cancel(ErrLockerClosed) })
	return wctx, func() {
		stop()
		cancel(nil)
	}
}

// takeHot is take for an exclusive key that a session of another process
// contends for: a try first would cost a round trip, in which the other
// process's next request may reach the server's queue first, so the owner
// of e's turn takes a waiting place and waits in the server's queue at once
// (where a free key is granted at once, and held on the waiting
// connection). The caps are checked as a try checks them. done is false,
// and nothing is done, unless two places are free: a key that turns out to
// be free keeps its place while held, and the last one is left to the waits
// of other keys (which would poll without it). Then the caller tries the
// key as usual.
func (m *mux) takeHot(ctx context.Context, b *muxBackend, e *keyEntry) (done, held bool, err error) {
	if places := m.lc.Places(); len(places) >= cap(places)-1 {
		return false, false, nil
	}
	if !m.lc.TakePlace() {
		return false, false, nil
	}
	err = m.guard(ctx, e.Key())
	if err == nil {
		if err = m.reserve(e.Key()); err == nil {
			m.unreserve() // counted once granted, as a wait is
		}
	}
	if err != nil {
		m.lc.GivePlace()
		m.t.PassTurn(e)
		return true, false, err
	}
	// Tries queued behind are answered busy, as after a try that failed.
	m.t.Tried(e)
	wctx, cancel := m.waitContext(ctx)
	defer cancel()
	wc, held, healthy, err := m.serverWait(wctx, b, true, true)
	if wc == nil {
		m.t.PassTurn(e)
		return true, false, ErrLockerClosed
	}
	held, err = m.waited(ctx, e, b.l.cfg.mode, wc, held, healthy, err)
	if !held {
		m.t.PassTurn(e)
	}
	return true, held, err
}

// serverWait waits for b's key in the server's queue on a waiting
// connection (placed: with a place among WithWaitConns, which the
// connection keeps until it is given back) until wctx ends; hot: with
// tryOrWaitSQL (see waitSessionAs), and a wait that finds another session
// first marks the key hot again. It returns the connection, whether the key
// is held on it (counted in its holds) and, when it is not, whether the
// connection is known to be usable, and why. A nil connection: the Locker
// is closed (and a place taken is given back).
func (m *mux) serverWait(wctx context.Context, b *muxBackend, placed, hot bool) (wc *lockConn, held, healthy bool, err error) {
	wc = m.lc.WaitConn(placed)
	if wc == nil {
		if placed {
			m.lc.GivePlace()
		}
		return nil, false, false, ErrLockerClosed
	}
	for attempt := 0; ; attempt++ {
		var start time.Time
		wc, held, healthy, start, err = m.serverWaitOn(wctx, b, wc, placed, hot)
		// An idle waiting connection whose session the server ended
		// (pg_terminate_backend, a restart) answers the first statement
		// sent to it, at once, with the end of its session: the wait never
		// reached the server's queue. It runs again, once, on another
		// connection, as a pool's dead idle connection is replaced (see
		// Lock.open); a wait ended later in its course fails as before.
		if attempt > 0 || held || !retryable(err) || time.Since(start) > deadOnArrival || wctx.Err() != nil {
			return wc, held, healthy, err
		}
		if wc = m.lc.ReplaceWaitConn(wc, placed); wc == nil {
			return nil, false, false, ErrLockerClosed
		}
	}
}

// deadOnArrival is how soon the first answer to a waiting connection's
// statement must come to be taken for a session that was over before the
// statement was sent (see serverWait).
const deadOnArrival = 50 * time.Millisecond

// serverWaitOn is one attempt of serverWait on wc; start is when its wait
// statement was sent.
func (m *mux) serverWaitOn(wctx context.Context, b *muxBackend, wc *lockConn, placed, hot bool) (_ *lockConn, held, healthy bool, start time.Time, err error) {
	start = time.Now()
	op := connOp{Ctx: wctx, Fn: func(conn *pgx.Conn) {
		if !placed {
			// A Leader's campaign: its session carries the Leader's
			// identity before it waits (issue 25, see nameCampaign).
			if err = nameCampaign(wctx, conn, b.l, m.releaseTimeout); err != nil {
				return
			}
		}
		start = time.Now()
		var contended bool
		held, healthy, contended, err = waitSessionAs(wctx, b.l, conn, hot)
		if contended {
			m.t.MarkHot(b.l.key)
		}
		if held && time.Since(start) >= m.statementBound() {
			held, healthy, err = m.confirm(conn)
		}
		if held {
			wc.AddHolds(1)
		}
	}}
	wc.Do(&op)
	if op.Err != nil {
		// The waiting connection could not be opened, or not yet: a
		// connect under way goes on, for the next wait.
		err, healthy = op.Err, errors.Is(op.Err, errConnectCut)
	}
	return wc, held, healthy, start, err
}

// waited ends a wait of the owner of e's turn on wc: a grant is recorded
// (and counted against the cap); else wc is given back, and the error
// returned.
func (m *mux) waited(ctx context.Context, e *keyEntry, mode Mode, wc *lockConn, held, healthy bool, err error) (bool, error) {
	if held && m.t.Granted(e, tableMode(mode), wc) {
		// Counted when granted, not while waiting: a waiter takes no slot
		// of the cap. Past the cap too, since the lock is held by now: the
		// cap is passed by at most the waits under way (WithWaitConns, and
		// the Leaders' campaigns).
		m.forceReserve()
		return true, nil
	}
	if held { // granted on a connection lost since: gone with it
		healthy, err = false, fmt.Errorf("%w: lost as the wait ended", errConnGone)
	}
	if err == nil {
		err = m.waitErr(ctx)
	}
	if errors.Is(err, ErrTransactionPooler) {
		m.refused.Store(&err)
	}
	m.lc.PutWaitConn(wc, healthy && !errors.Is(err, errConnGone))
	return false, err
}

// takeRelay is the acquire of the goroutine to which the turn was relayed
// with a wait in the server's queue (keytable.AdmitRelay, see relay): it
// finishes that wait, as its own, on the waiting connection and place that
// came with it. A relayed wait is counted as a wait is: when granted, not while
// waiting; and since the key passes from one Lock of the process to the
// next, as in a hand-off, the caps are not checked again.
func (m *mux) takeRelay(ctx context.Context, e *keyEntry) (bool, error) {
	rw := m.t.Relayed(e)
	wc := rw.conn
	wctx, cancel := m.waitContext(ctx)
	defer cancel()
	var held, healthy bool
	var err error
	op := connOp{Fn: func(conn *pgx.Conn) {
		var contended bool
		held, healthy, contended, err = waitRelayed(wctx, conn, rw, e.Key(), m.releaseTimeout)
		if contended {
			m.t.MarkHot(e.Key()) // another session had the key, or waited for it, first
		}
		if held && time.Since(rw.sent) >= m.statementBound() {
			held, healthy, err = m.confirm(conn)
		}
		if held {
			wc.AddHolds(1)
		}
	}}
	wc.Do(&op)
	if op.Err != nil {
		held, healthy, err = false, false, op.Err
	}
	held, err = m.waited(ctx, e, Exclusive, wc, held, healthy, err)
	if !held {
		m.t.PassTurn(e)
	}
	return held, err
}

// confirm proves, by one round trip, that the session of a waiting
// connection that was just granted its key is still alive, before the grant
// is reported: a grant read after a silent spell can come from a session the
// server has ended since (the grant was on its way), whose lock another
// session may hold by now. A session that does not answer within the
// statement bound is lost (its connection closed, which gives back the lock if
// it was not). Only a wait that lasted the statement bound or more needs it:
// the server ends a silent session only after seconds of silence (see
// AbandonedSessionTimeout), which the client sees as a long wait.
func (m *mux) confirm(conn *pgx.Conn) (held, healthy bool, err error) {
	nc := conn.PgConn().Conn()
	_ = nc.SetDeadline(time.Now().Add(m.statementBound()))
	var ok bool
	// A cancel request sent for the wait can land late, on this statement:
	// that says nothing of the session (see lockconn.RetryCanceled).
	err = lockconn.RetryCanceled(func() error { return conn.QueryRow(context.Background(), lockconn.CheckSQL).Scan(&ok) })
	if err == nil {
		_ = nc.SetDeadline(time.Time{})
		return true, true, nil
	}
	if !conn.IsClosed() {
		ctx, cancel := context.WithTimeout(context.Background(), m.releaseTimeout)
		_ = conn.Close(ctx)
		cancel()
	}
	return false, false, fmt.Errorf("%w: the session was lost as its wait was granted: %w", errConnGone, err)
}

// waitPlace takes a place among the waiting connections (placed), or, while
// none is free, tries the key with the non-blocking function on its lock
// connection now and then (the pause doubles from minPlacePoll to
// maxPlacePoll), and reports held when a try got it. Neither, with no
// error: ctx ended.
func (m *mux) waitPlace(ctx context.Context, e *keyEntry, mode Mode) (placed, held bool, err error) {
	if m.lc.TakePlace() {
		return true, false, nil
	}
	pause := minPlacePoll
	t := time.NewTimer(pause)
	defer t.Stop()
	places := m.lc.Places()
	for {
		select {
		case places <- struct{}{}:
			return true, false, nil
		case <-ctx.Done():
			return false, false, nil
		case <-t.C:
		}
		held, err := m.try(ctx, e, mode, nil)
		if held || (err != nil && !errors.Is(err, ErrTooManyLocks)) {
			return false, held, err
		}
		// At the cap (or the server's), a waiter goes on waiting: it takes
		// nothing until its key is free and the cap allows.
		pause = min(2*pause, maxPlacePoll)
		t.Reset(pause)
	}
}

// The pauses between tries of a wait that finds every waiting connection
// taken (see mux.waitPlace).
const (
	minPlacePoll = 20 * time.Millisecond
	maxPlacePoll = time.Second
)

// waitErr is the error of a wait that ended without the lock: ctx's, or the
// Locker's closing.
func (m *mux) waitErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return ErrLockerClosed
}
