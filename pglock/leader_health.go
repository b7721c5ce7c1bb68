package pglock

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/pglockkit/kit/pglock/internal/pooler"
)

// ErrLeaderInDoubt is what [Leader.CheckHealth] returns (wrapped) while the
// Leader believes it leads but cannot confirm, from the server, that its
// session holds the key: the server cannot be reached, or shows another
// session, or none, holding it.
var ErrLeaderInDoubt = errors.New("pglock: leading, but the lock is in doubt")

// leaderTerm is one term of a Leader, for CheckHealth: its number, the
// server pid of the session that holds the key (0 when unknown), and the
// hold's Lost channel.
type leaderTerm struct {
	n    int64
	pid  int64
	lost <-chan struct{}
}

// holdPID returns the server pid of the session that holds the Leader's key
// now, or 0 when it cannot be known without using the connection (a
// database/sql hold, whose connection its watch uses). Called by Run's
// goroutine right after its Acquire returned: the hold's state was written
// by that goroutine.
func (ld *Leader) holdPID() int64 {
	l := ld.l
	switch b := l.b.(type) {
	case *muxBackend:
		if b.e == nil {
			return 0
		}
		c, _ := b.m.t.HeldOn(b.e)
		if c == nil {
			return 0
		}
		return c.SessionPID()
	case *memBackend: // the in-memory double
		return b.pid()
	case *pgxBackend:
		if proof := pooler.ProofOf(b.conn); proof != nil {
			return int64(proof.PID())
		}
		return int64(b.conn.PgConn().PID())
	}
	return 0
}

// CheckHealth reports whether the Leader's belief is sound: nil when it
// does not lead (Run not running, campaigning, between terms), and when it
// leads and the server shows its session holding the key; an error matching
// [ErrLeaderInDoubt] when it believes it leads but cannot confirm that from
// the server within the lost-check interval (the server cannot be reached:
// the error matches [ErrUnavailable] too), or the server shows another
// session, or none, holding the key. Use it with [HealthHandler].
//
// Cost: nothing while not leading; while leading, one read of pg_locks on a
// connection of the Locker's pool, at most once per half lost-check
// interval (250 ms by default) whatever the number of callers (concurrent
// calls share one read, and later ones its result), bounded by the
// interval (500 ms): it never waits longer than that (or than ctx), and
// never sends anything on the Leader's own connection (whose watch it would
// delay).
//
// A Leader stops believing it leads on its own when its connection is lost,
// within the loss bound of [Lock.Lost] (at once when the server ends the
// session, within twice the lost-check interval when the network goes
// silent), so CheckHealth fails only in that window, or when something
// keeps the belief past it: a stale belief, the watch overdue, or the
// server showing another leader. A read that fails while the term ends by
// a step-down (the function returned, Run's context ended) does not count;
// one that fails as the term is lost does (it was right).
//
// Kubernetes: wire it to the liveness probe, as client-go's leader election
// wires its HealthzAdaptor, so that a replica that keeps believing it leads
// when the server says otherwise is restarted. Set periodSeconds times
// failureThreshold well above the loss bound (the default probe, 10 s x 3,
// is), so that a blip the Leader resolves itself by stepping down does not
// restart it, and timeoutSeconds to 1 s or more. Do not wire it to the
// readiness probe: leading or not says nothing of whether the replica can
// serve requests. A Leader on a Locker on one connection or transaction is
// not checked (there is no pool to read on): CheckHealth returns nil. On a
// nil or zero Leader it returns an error matching [ErrUnsupportedConn].
func (ld *Leader) CheckHealth(ctx context.Context) error {
	if err := ld.unmade(); err != nil {
		return fmt.Errorf("pglock: Leader.CheckHealth: %w", err)
	}
	if ctx == nil {
		ctx = context.Background()
	}
	st := ld.cur.Load()
	if st == nil || !ld.leading.Load() || !ld.lk.pooled {
		return nil
	}
	interval := ld.l.cfg.lostCheck
	err := ld.health.do(ctx, st.n, interval/2, func() error { return ld.confirm(st, interval) })
	if err == nil || ctx.Err() != nil {
		return err
	}
	select {
	case <-st.lost: // lost meanwhile: the read was right
	default:
		if ld.cur.Load() != st || !ld.leading.Load() {
			return nil // the term ended by a step-down meanwhile
		}
	}
	return fmt.Errorf("%w: key %s, term %d of %q: %w", ErrLeaderInDoubt, ld.Key(), st.n, ld.cfg.Identity, err)
}

// confirm reads from the server whether the session of term st holds the
// Leader's key, within bound.
func (ld *Leader) confirm(st *leaderTerm, bound time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	pid, app, ok, err := ld.lk.keyHolder(ctx, ld.Key())
	switch {
	case err != nil && ctx.Err() != nil:
		return fmt.Errorf("%w: no answer from the server within %v", ErrUnavailable, bound)
	case err != nil:
		return err
	case !ok:
		return errors.New("the server shows no session holding the key")
	case st.pid != 0 && pid != st.pid:
		return fmt.Errorf("the server shows session %d (%q) holding the key, not this Leader's session %d", pid, app, st.pid)
	}
	return nil
}
