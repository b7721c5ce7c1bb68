package pglock

import (
	"context"
	"errors"
	"fmt"
)

// take takes the server's lock on e's key; the caller owns e's turn, which
// take passes on when the lock is not held afterwards. A key that a session
// of another process contends for (see keytable.HotFor) is waited for in the
// server's queue at once, when waiting places are free (see takeHot).
func (m *mux) take(ctx context.Context, b *muxBackend, e *keyEntry, wait bool) (bool, error) {
	if wait && b.l.cfg.campaign {
		return m.takeCampaign(ctx, b, e)
	}
	if wait && b.l.cfg.mode == Exclusive && !b.l.cfg.campaign && m.t.IsHot(e.Key()) {
		if done, held, err := m.takeHot(ctx, b, e); done {
			return held, err
		}
	}
	ok, err := m.try(ctx, e, b.l.cfg.mode, &b.op)
	if err == nil && !ok {
		m.t.MarkHot(e.Key()) // held or waited for by another session
	}
	switch {
	case err != nil || (!ok && !wait):
		m.t.PassTurn(e)
		return false, err
	case ok:
		return true, nil
	}
	m.t.Tried(e)
	held, err := m.wait(ctx, b, e)
	if !held {
		m.t.PassTurn(e)
	}
	return held, err
}

// takeCampaign is take for a Leader's campaign (issue 25): it waits, and
// leads, on a waiting connection of its own, never on a lock connection, so
// that the session that holds the Leader's key is the Leader's alone and
// carries its identity (application_name, set before the wait: see
// nameCampaign), which every replica reads from the server. The caps are
// checked as a try checks them; the grant is counted as a wait's is.
func (m *mux) takeCampaign(ctx context.Context, b *muxBackend, e *keyEntry) (bool, error) {
	err := m.guard(ctx, e.Key())
	if err == nil {
		if err = m.reserve(e.Key()); err == nil {
			m.unreserve() // counted once granted, as a wait is
		}
	}
	if err != nil {
		m.t.PassTurn(e)
		return false, err
	}
	m.t.Tried(e) // tries queued behind are answered busy
	held, err := m.wait(ctx, b, e)
	if !held {
		m.t.PassTurn(e)
	}
	return held, err
}

// try takes the key with the non-blocking function on its lock connection;
// held, it counts against the cap (see reserve). op is the request to send
// it with (a hold's own, see muxBackend.op), or nil for a new one.
func (m *mux) try(ctx context.Context, e *keyEntry, mode Mode, op *connOp) (bool, error) {
	k := e.Key()
	if err := m.guard(ctx, k); err != nil {
		return false, err
	}
	if err := m.reserve(k); err != nil {
		return false, err
	}
	var c *lockConn
	if op == nil {
		op = new(connOp)
	}
	*op = connOp{Ctx: ctx, Key: k.v, Pair: k.pair, Shared: mode == Shared}
	// A connection lost before or during the statement, or before its grant
	// was recorded, holds nothing: try again on a new one.
	for range 3 {
		if c = m.pick(k); c == nil {
			op.Err = ErrLockerClosed
			break
		}
		op.OK, op.Err = false, nil
		c.Do(op)
		if op.Err == nil && op.OK && !m.t.Granted(e, tableMode(mode), c) {
			op.OK, op.Err = false, fmt.Errorf("%w: lost before the grant was recorded", errConnGone)
		}
		if !errors.Is(op.Err, errConnGone) {
			break
		}
	}
	if op.Err != nil || !op.OK {
		m.unreserve()
	}
	return op.OK, op.Err
}

// probe checks, for a shared hold of e's key that others of the process keep
// joining, whether a session of another process waits for the key in
// Exclusive mode, and records it (see keytable.Config.Probes): a new shared
// request of a session that does not hold the key is granted only when none
// does. It runs on the key's lock connection when the key is held on a
// waiting connection, else on another lock connection, else
// (WithLockConns(1)) on a waiting connection if one is free; when none is,
// the probe tells nothing and the next joiner tries again.
func (m *mux) probe(ctx context.Context, e *keyEntry) {
	held, _ := m.t.HeldOn(e)
	slot := m.slotOf(e.Key())
	var c, borrowed *lockConn
	switch {
	case held == nil || held.Slot() != slot:
		c = m.lc.Slot(slot)
	case m.conns > 1:
		c = m.lc.Slot((slot + 1) % m.conns)
	default:
		if m.lc.TakePlace() {
			if borrowed = m.lc.WaitConn(true); borrowed == nil {
				m.lc.GivePlace()
			}
			c = borrowed
		}
	}
	exclusiveWaits, ok := false, false
	if c != nil {
		k := e.Key()
		op := connOp{Ctx: ctx, Key: k.v, Pair: k.pair, Shared: true, Probe: true}
		c.Do(&op)
		exclusiveWaits, ok = !op.OK, op.Err == nil
		if borrowed != nil {
			m.lc.PutWaitConn(borrowed, ok || errors.Is(op.Err, errConnectCut))
		}
	}
	m.t.Probed(e, exclusiveWaits, ok)
}
