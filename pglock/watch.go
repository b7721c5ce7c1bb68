package pglock

import (
	"time"

	"github.com/pglockkit/kit/pglock/internal/connwatch"
)

func (b *pgxBackend) watch(interval time.Duration, lost func(error)) func() {
	if b.pooled == nil {
		return nil
	}
	if b.l.cfg.scope != Session {
		if b.ownTx == nil {
			return nil
		}
		// From a pool of them, as below.
		l := b.l
		if l.peer == nil {
			l.peer = connwatch.GetPeerWatch()
		}
		l.peer.Arm(b.conn.PgConn().Conn(), interval, lost)
		return l.peer.StopFn
	}
	// A Lock has one hold at a time: the hold takes a watch (its timer and
	// goroutine's state) from a pool of them, and Lock.dropHold gives it
	// back, so that a Lock made per hold (NewLock) makes no watch of its own.
	l := b.l
	if l.watch == nil {
		l.watch = connwatch.GetRewatch()
	}
	l.watch.Arm(b.conn, interval, lost, nil)
	return l.watch.StopFn
}
