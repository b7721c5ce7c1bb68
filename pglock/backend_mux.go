package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/pglock/internal/keytable"
	"github.com/pglockkit/kit/pglock/internal/lockconn"
)

// muxBackend is one hold of a multiplexing Locker's Lock.
type muxBackend struct {
	m *mux
	l *Lock
	e *keyEntry
	// op is the hold's request to its lock connection: the try that takes
	// it, then the unlock that gives it back (see mux.try and mux.give), one
	// at a time, so that neither allocates one.
	op connOp
}

func (b *muxBackend) acquire(ctx context.Context, wait bool) (bool, error) {
	mode := b.l.cfg.mode
	e, adm, err := b.m.t.Enter(ctx, b.l.key, tableMode(mode), wait, b.l.cfg.campaign)
	switch {
	case adm == keytable.AdmitRelay && err != nil:
		// Relayed a wait as ctx ended: it is stopped, and the turn passed
		// on (takeRelay finds ctx ended and keeps nothing).
		_, _ = b.m.takeRelay(ctx, e)
		return false, err
	case err != nil:
		return false, err
	case adm == keytable.AdmitBusy:
		return false, nil
	case adm == keytable.AdmitRelay:
		ok, err := b.m.takeRelay(ctx, e)
		if ok {
			b.e = e
		}
		return ok, b.m.closedErr(ctx, err)
	case adm == keytable.AdmitJoined:
		b.e = e
		return true, nil
	case adm == keytable.AdmitProbe:
		b.e = e
		b.m.probe(ctx, e)
		return true, nil
	}
	ok, err := b.m.take(ctx, b, e, wait)
	if ok {
		b.e = e
	}
	return ok, b.m.closedErr(ctx, err)
}

// release ends the hold; the last local holder of the key unlocks it. The
// unlock is bounded by the release timeout, not by ctx.
func (b *muxBackend) release(ctx context.Context, _ bool) error {
	return b.endAs(lockconn.SetMemberOf(ctx))
}

// discard ends a hold that was lost: nothing is sent for it (unless it turns
// out not to be lost, then it is unlocked).
func (b *muxBackend) discard() { _ = b.end() }

func (b *muxBackend) end() error { return b.endAs(nil) }

// endAs is end; member: the release is one of a key set's (see lockconn.SetBatch),
// whose unlock lingers for the others' on a free lock connection.
func (b *muxBackend) endAs(member *lockconn.SetMember) error {
	e := b.e
	if e == nil {
		return nil
	}
	b.e = nil
	t := b.m.t
	c, lostErr, others := t.Leaving(e, b)
	// A shared holder that leaves while others keep the server's lock
	// unlocks nothing, but a statement on the lock's session proves that the
	// lock lived until now (its connection may have died unnoticed yet). It
	// is sent while this hold still counts, so that the connection cannot
	// have moved on to other work (a waiting connection given back and
	// reused) before it is answered.
	var checkErr error
	if lostErr == nil && others && c != nil {
		op := connOp{Check: true}
		c.Do(&op)
		if errors.Is(op.Err, errConnGone) {
			checkErr = join(ErrLockLost, op.Err)
		}
	}
	if !t.Leave(e) {
		if lostErr != nil {
			return join(ErrLockLost, lostErr)
		}
		return checkErr
	}
	return b.m.give(e, b.l.cfg.mode, member, &b.op)
}

// watch registers lost to be called when the hold's connection is lost;
// the lock connection is watched once for all its holds.
func (b *muxBackend) watch(_ time.Duration, lost func(error)) func() {
	e := b.e
	t := b.m.t
	if lostErr := t.Watch(e, b, lost); lostErr != nil {
		lost(lostErr)
	}
	return func() { t.Unwatch(e, b) }
}

func (b *muxBackend) pgxTx() pgx.Tx  { return nil }
func (b *muxBackend) sqlTx() *sql.Tx { return nil }

// guarded is nil: the Locker's own guard counts a multiplexed hold.
func (b *muxBackend) guarded() *callerGuard { return nil }

// token takes the fencing token on the connection that holds the key's
// server lock: the key's lock connection, or the waiting connection that
// was granted it.
func (b *muxBackend) token(ctx context.Context) (int64, error) {
	var c *lockConn
	if b.e != nil {
		c, _ = b.m.t.HeldOn(b.e)
	}
	if c == nil {
		return 0, fmt.Errorf("%w: take a fencing token: the key's connection is gone", ErrLockLost)
	}
	// One statement per attempt, which does not wait for a lock on a lock
	// connection (its lock_timeout is short, and the key's row is locked
	// NOWAIT): the connection serves other keys between attempts. It is
	// bounded like any statement there (see lockconn.Conn.flush), so a silent
	// network loses the connection within the same bound as when idle.
	return b.l.takeToken(ctx, func() (int64, error) {
		var token int64
		var err error
		op := connOp{Ctx: ctx, Bounded: true, Fn: func(conn *pgx.Conn) {
			if conn == nil {
				err = errConnGone
				return
			}
			token, err = b.l.tokenOnce(context.Background(), conn, true, false)
		}}
		c.Do(&op)
		if err == nil {
			err = op.Err
		}
		return token, err
	})
}
