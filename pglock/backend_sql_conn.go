package pglock

import (
	"context"
	"database/sql/driver"
	"fmt"
	"net"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/pglock/internal/connwatch"
)

// onPgx runs a statement that never waits for a lock on the *pgx.Conn under
// the lock's connection, when the driver is pgx's: bounded by a deadline on
// the socket (see pgxBackend.detach), not by a context and a timer per
// statement. It reports whether it ran (false with another driver).
func (b *sqlBackend) onPgx(ctx context.Context, f func(context.Context, *pgx.Conn) error) (ran bool, err error) {
	ran = b.withPgx(func(pc *pgx.Conn) {
		nc := pc.PgConn().Conn()
		_ = nc.SetDeadline(time.Now().Add(b.l.cfg.releaseTimeout))
		if ctx.Done() != nil {
			ctx = context.WithoutCancel(ctx)
		}
		err = f(ctx, pc)
		if !pc.IsClosed() {
			_ = nc.SetDeadline(time.Time{})
		}
	})
	return ran, err
}

// pgxConner is what pgx's database/sql driver (stdlib.Conn) offers: the
// *pgx.Conn under a *sql.Conn.
type pgxConner interface{ Conn() *pgx.Conn }

// withPgx runs f on the *pgx.Conn under the lock's *sql.Conn when the driver
// is pgx's stdlib, and reports whether it did.
func (b *sqlBackend) withPgx(f func(*pgx.Conn)) bool {
	if b.conn == nil {
		return false
	}
	ran := false
	_ = b.conn.Raw(func(dc any) error {
		if pc, ok := dc.(pgxConner); ok && pc.Conn() != nil {
			ran = true
			f(pc.Conn())
		}
		return nil
	})
	return ran
}

// name names the pinned connection with the Leader's identity when the lock
// is a Leader's (see nameHold).
func (b *sqlBackend) name(ctx context.Context) (err error) {
	if ran, _ := b.onPgx(ctx, func(ctx context.Context, pc *pgx.Conn) error {
		b.prevApp, b.named, err = nameHold(ctx, pc, b.l)
		return nil
	}); ran {
		return err
	}
	b.prevApp, b.named, err = nameSQLHold(ctx, b.conn, b.l)
	return err
}

// unname gives the pinned connection back the application_name that name
// replaced.
func (b *sqlBackend) unname() (err error) {
	if ran, _ := b.onPgx(context.Background(), func(ctx context.Context, pc *pgx.Conn) error {
		if pc.IsClosed() {
			err = errConnGone
			return nil
		}
		err = unnameHold(ctx, pc, b.prevApp)
		return nil
	}); ran {
		return err
	}
	return unnameSQLHold(b.conn, b.prevApp, b.l.cfg.releaseTimeout)
}

// connGone reports whether the driver knows the connection is closed.
func (b *sqlBackend) connGone() (gone bool) {
	_ = b.conn.Raw(func(dc any) error {
		switch c := dc.(type) {
		case pgxConner: // pgx's stdlib
			gone = c.Conn() == nil || c.Conn().IsClosed()
		case driver.Validator: // lib/pq
			gone = !c.IsValid()
		}
		return nil
	})
	return gone
}

// discard destroys the connection of a lost hold. The lock's own
// transaction holds its *sql.Conn until it ends, so it is ended first, on a
// connection closed beforehand (with pgx's driver), so that its ROLLBACK
// waits for no network.
func (b *sqlBackend) discard() {
	if b.ownTx != nil {
		b.withPgx(func(pc *pgx.Conn) {
			ctx, cancel := context.WithTimeout(context.Background(), b.l.cfg.releaseTimeout)
			_ = pc.Close(ctx)
			cancel()
		})
		stop := b.boundTx()
		_ = b.ownTx.Rollback()
		stop()
		b.txCancel()
		b.ownTx = nil
	}
	b.close(false)
}

func (b *sqlBackend) watch(interval time.Duration, lost func(error)) func() {
	if !b.pinned {
		return nil
	}
	if b.l.cfg.scope != Session {
		// The lock's own transaction, which the work uses: watched from
		// the kernel's side only (see connwatch.Peer), with pgx's driver.
		var nc net.Conn
		if b.ownTx == nil || !b.withPgx(func(pc *pgx.Conn) { nc = pc.PgConn().Conn() }) {
			return nil
		}
		return connwatch.Peer(nc, interval, lost)
	}
	stop := make(chan struct{})
	w := connwatch.NewConn(interval, lost)
	run := func() {
		// With pgx's driver, watch the connection itself; else ping it.
		if b.withPgx(func(pc *pgx.Conn) { w.Attach(pc); w.Run() }) {
			return
		}
		b.pingLoop(interval, stop, lost)
	}
	return connwatch.After(min(connwatch.Delay, interval), run, func() {
		close(stop)
		w.Stop()
	})
}

// pingLoop pings the connection every interval until stop is closed or a
// ping fails.
func (b *sqlBackend) pingLoop(interval time.Duration, stop <-chan struct{}, lost func(error)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), interval)
		err := b.conn.PingContext(ctx)
		cancel()
		if err != nil {
			select {
			case <-stop: // the ping raced with release: not a loss
			default:
				lost(err)
			}
			return
		}
	}
}

func (b *sqlBackend) token(ctx context.Context) (int64, error) {
	q, nowait := b.target(), b.sqlTx() == nil
	return b.l.takeToken(ctx, func() (int64, error) { return b.l.tokenOnce(ctx, q, nowait, true) })
}

// checkPrimaryEachHold is checkPrimary where the connection cannot be
// reached (a caller's *sql.Tx, a driver other than pgx's): one statement,
// on what the lock runs on, before each hold.
func (b *sqlBackend) checkPrimaryEachHold(ctx context.Context) error {
	var q sqlQuerier
	switch {
	case b.callerTx != nil:
		q = b.callerTx
	case b.conn != nil:
		q = b.conn
	default:
		return nil
	}
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.l.cfg.releaseTimeout)
	defer cancel()
	var inRecovery bool
	if err := q.QueryRowContext(qctx, primarySQL).Scan(&inRecovery); err != nil {
		return fmt.Errorf("pglock: check that the server is a primary: %w", err)
	}
	if inRecovery {
		return errStandby("")
	}
	return nil
}
