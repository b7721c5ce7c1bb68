package pglock

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/pglock/internal/lockconn"
	"github.com/pglockkit/kit/pglock/internal/pooler"
)

// give gives back the server's lock on e's key (the caller owns e's turn),
// then passes the turn on. A hold that was lost is not sent anything. When
// the next goroutine of the process waits for the same exclusive key, the
// unlock takes the key again in the same statement and hands it over: one
// round trip per hand-off, and a waiter of another session, queued in the
// server, still comes first (see lockconn.Op.Retake). op is the request to
// send the unlock with (the hold's own, see muxBackend.op).
func (m *mux) give(e *keyEntry, mode Mode, member *lockconn.SetMember, op *connOp) error {
	c, lostErr := m.t.HeldOn(e)
	if lostErr != nil {
		m.ended(e, c, false)
		return join(ErrLockLost, lostErr)
	}
	k := e.Key()
	*op = connOp{Unlock: true, Key: k.v, Pair: k.pair, Shared: mode == Shared, Member: member}
	accept := m.handsTo(c)
	if mode == Exclusive && c.Slot() < 0 && accept(false) && m.t.IsHot(e.Key()) && m.t.CanRelay(e) {
		if done, err := m.relay(e, c); done {
			return err
		}
	}
	next, campaign := m.t.NextExclusive(e)
	op.Retake = mode == Exclusive && next && accept(campaign)
	err := m.unlock(c, op)
	if err == nil && op.Retake && !op.Retaken {
		// The unlock granted the key to a session of another process,
		// queued in the server.
		m.t.MarkHot(e.Key())
	}
	if err == nil && op.Retaken {
		handed, lost := m.t.HandOff(e, c, accept)
		switch {
		case handed:
			return nil
		case lost: // the key taken again is gone with the connection
			m.ended(e, c, false)
			return nil
		}
		// The waiter left meanwhile: give the key back after all.
		*op = connOp{Unlock: true, Key: k.v, Pair: k.pair, Shared: mode == Shared}
		err = m.unlock(c, op)
	}
	m.ended(e, c, err == nil)
	return err
}

// relay gives back the server's lock on e's key, held on the waiting
// connection c (the caller owns e's turn), and passes the turn to the next
// goroutine of the process, which waits for an exclusive hold, with a wait
// for the key in the server's queue that relay sends on c in the same write
// as the unlock, with c and its place (see keyTable.RelayTo). While a
// session of another process contends for the key (see keytable.HotFor), the
// process is so back in the server's queue from the instant its hold ends,
// on a backend that is running already, as a process with a session per
// waiter would be; a retake would keep the key only when no request is
// queued, and otherwise leave the process out of the queue until its next
// goroutine has tried the key and sent its wait, which lets the other
// process take the key again in the meantime. A waiter of another session
// queued in the server comes first: the unlock grants it the key, and the
// relayed wait queues behind it. done is false, with nothing sent, when c
// goes through a pooler (whose statements prove their session one by one).
func (m *mux) relay(e *keyEntry, c *lockConn) (done bool, err error) {
	var rw *relayWait
	var held bool
	op := connOp{Bounded: true, Fn: func(conn *pgx.Conn) {
		if conn == nil {
			err = errConnGone
			return
		}
		if pooler.ProofOf(conn) != nil {
			return
		}
		done = true
		p, ok, gone, serr := sendRelay(conn, e.Key())
		switch {
		case gone:
			err = fmt.Errorf("%w: %w", errConnGone, serr)
			return
		case serr != nil:
			// Failed on a live session, which is closed now: the key is
			// free, and was held until then.
			return
		}
		_ = conn.PgConn().Conn().SetDeadline(time.Time{}) // the wait is not bounded
		held = ok
		rw = &relayWait{conn: c, pc: conn.PgConn(), p: p, sent: time.Now()}
		c.AddHolds(-1)
	}}
	c.Do(&op)
	switch {
	case op.Err != nil:
		m.ended(e, c, false)
		return true, join(ErrLockLost, op.Err)
	case !done:
		return false, nil
	case err != nil:
		m.ended(e, c, false)
		return true, join(ErrLockLost, err)
	case rw == nil: // the session was closed: nothing is held
		m.ended(e, c, false)
		return true, nil
	case !held:
		// Not held, and a wait queued: the session is in doubt, closed.
		m.relayEnded(e.Key(), rw, false)
		m.ended(e, c, false)
		return true, errServerNotHeld
	}
	m.unreserve()
	if !m.t.RelayTo(e, rw) {
		// Nobody left to take it: the wait is stopped.
		m.relayEnded(e.Key(), rw, true)
		m.lc.PutWaitConn(c, !c.IsDead())
		m.t.PassTurn(e)
	}
	return true, nil
}

// relayEnded stops a relayed wait for k that nobody will finish, and gives
// back the key if it was granted meanwhile (healthy: the connection stays
// usable when that works; else it is closed).
func (m *mux) relayEnded(k Key, rw *relayWait, healthy bool) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	op := connOp{Fn: func(conn *pgx.Conn) {
		_, ok, _, _ := waitRelayed(ctx, conn, rw, k, m.releaseTimeout)
		if (!ok || !healthy) && conn != nil && !conn.IsClosed() {
			cctx, ccancel := context.WithTimeout(context.Background(), m.releaseTimeout)
			_ = conn.Close(cctx)
			ccancel()
		}
	}}
	rw.conn.Do(&op)
}

// handsTo says to which waiters a hold on c may be handed without leaving
// it (a retake): any but a Leader's campaign, on a lock connection; on a waiting connection that
// holds a place among WithWaitConns, not a Leader's campaign (which would keep
// the place for a whole term); on a Leader's own connection, none (the hold
// would live outside the places). The others take the key the usual way.
func (m *mux) handsTo(c *lockConn) func(campaign bool) bool {
	if c.Slot() >= 0 {
		// Not to a Leader's campaign, which takes its key on a connection
		// of its own (issue 25, see takeCampaign).
		return func(campaign bool) bool { return !campaign }
	}
	placed := c.Placed()
	return func(campaign bool) bool { return placed && !campaign }
}

// unlock sends an unlock (or retake) on c and says how it went.
func (m *mux) unlock(c *lockConn, op *connOp) error {
	c.Do(op)
	switch {
	case errors.Is(op.Err, errConnGone):
		return join(ErrLockLost, op.Err)
	case op.Err != nil:
		return join(errUnlockFailed, op.Err)
	case !op.OK:
		return errServerNotHeld
	}
	return nil
}

// ended records that e's key is no longer held on c: the cap, the waiting
// connection and e's turn are given back.
func (m *mux) ended(e *keyEntry, c *lockConn, healthy bool) {
	m.unreserve()
	if c != nil && c.Slot() < 0 {
		m.lc.PutWaitConn(c, healthy)
	}
	m.t.PassTurn(e)
}
