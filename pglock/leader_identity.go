package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock/internal/lockconn"
	"github.com/pglockkit/kit/pglock/internal/memlock"
)

// A Leader's identity (issue 25). Every replica can ask the server who leads:
// the session that holds a Leader's key carries the Leader's identity as its
// application_name, which pg_stat_activity shows to every session, so "who
// leads" is pg_locks (the key, granted) joined with pg_stat_activity.

// DefaultLeaderObserveInterval is how often a [Leader] with an OnNewLeader
// callback reads who leads from the server while its Run runs (see
// [LeaderConfig]).
const DefaultLeaderObserveInterval = 500 * time.Millisecond

// The range of LeaderConfig.ObserveInterval.
const (
	minObserveInterval = 100 * time.Millisecond
	maxObserveInterval = time.Hour
)

// maxIdentityLen is the longest identity: PostgreSQL keeps NAMEDATALEN-1
// bytes of an application_name and cuts the rest.
const maxIdentityLen = 63

// defaultIdentity is the identity of a Leader whose configuration gives
// none: the host name and the process id, "host-1:4242", within
// maxIdentityLen and in printable ASCII.
var defaultIdentity = sync.OnceValue(func() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "unknown-host"
	}
	pid := ":" + strconv.Itoa(os.Getpid())
	b := []byte(host)
	for i, c := range b {
		if c < ' ' || c > '~' {
			b[i] = '?' // as PostgreSQL shows it
		}
	}
	if len(b) > maxIdentityLen-len(pid) {
		b = b[:maxIdentityLen-len(pid)]
	}
	return string(b) + pid
})

// checkIdentity refuses an identity that the server would not show as it is
// (see LeaderConfig.Identity).
func checkIdentity(id string) error {
	if id == "" || len(id) > maxIdentityLen {
		return fmt.Errorf("%w: leader Identity %q: want 1 to %d bytes (PostgreSQL cuts a longer application_name)",
			ErrInvalidOption, id, maxIdentityLen)
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c < ' ' || c > '~' {
			return fmt.Errorf("%w: leader Identity %q: byte %d is not printable ASCII (PostgreSQL shows it as '?' in application_name)",
				ErrInvalidOption, id, i)
		}
	}
	return nil
}

// Identity returns the identity of the Leader: [LeaderConfig].Identity, or
// the default, the host name and process id ("host-1:4242"). "" for a nil
// or zero Leader.
func (ld *Leader) Identity() string {
	if ld == nil {
		return ""
	}
	return ld.cfg.Identity
}

// CurrentLeader reads from the server which session holds the Leader's key
// now, and returns its application_name: the identity of the Leader that
// leads (see [LeaderConfig].Identity), whichever process it runs in. ok is
// false when no session holds the key (between two terms, or when no Leader
// runs). Any replica can ask, whether or not its own Run runs; it costs one
// round trip on a connection of the Locker's pool, and reads pg_locks,
// whose read takes every partition of the server's lock manager in turn:
// ask now and then, not in a loop (OnNewLeader polls for you).
//
// The identity is the holder's application_name whatever holds the key: a
// session that takes the key without a Leader (psql, a Lock) shows its own.
// A Leader on a Locker that does not multiplex ([WithMultiplexing](false),
// or a *sql.DB with a driver other than pgx's) names the pool connection
// that holds its key (see [LeaderConfig].Identity), so it is shown as every
// Leader is; a Leader on a Locker on one connection leaves the caller's
// session as it is. On a Locker on one connection or transaction (no pool to ask on)
// it returns an error matching [ErrUnsupportedConn]. A database error is
// returned as it is (with [ErrUnavailable] when the server cannot be
// reached).
func (ld *Leader) CurrentLeader(ctx context.Context) (identity string, ok bool, err error) {
	if err := ld.unmade(); err != nil {
		return "", false, fmt.Errorf("pglock: Leader.CurrentLeader: %w", err)
	}
	_, identity, ok, err = ld.lk.keyHolder(ctx, ld.Key())
	return identity, ok, err
}

// holderSQL reads the session that holds an advisory key exclusively in the
// current database, with its application_name (0 for a prepared
// transaction). A key is held exclusively by one session at most; LIMIT 1
// for servers whose pg_locks can show a lock twice (YugabyteDB).
const holderSQL = `SELECT coalesce(l.pid, 0)::int8, coalesce(a.application_name, '')
FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.mode = 'ExclusiveLock'
  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
  AND l.classid = $1::oid AND l.objid = $2::oid AND l.objsubid = $3::smallint
LIMIT 1`

// keyHolder reads who holds k exclusively now (see holderSQL): on a lock
// connection of a multiplexing Locker when one is open, else on the
// Locker's pool.
func (lk *Locker) keyHolder(ctx context.Context, k Key) (pid int64, app string, ok bool, err error) {
	if ctx == nil {
		ctx = context.Background()
	}
	classid, objid, objsubid := k.LockTag()
	args := []any{int64(classid), int64(objid), objsubid}
	if lk.mux != nil {
		// On an open lock connection of the Locker's, sharing its turn with
		// the lock requests of the moment: a pool the application keeps busy
		// does not make the answer wait (a Leader's health check would call
		// a sound leader in doubt). A Locker that holds one connection per
		// hold (a *sql.DB whose driver is not pgx's) has none open, so it
		// asks its pool. (Not lk.multiplexes(): its read of mux.perHold is
		// not guarded, and the Locker's first acquire writes it, while
		// OnNewLeader's observer may be reading.)
		var on bool
		pid, app, ok, on, err = lk.mux.keyHolder(ctx, args)
		if on {
			if err != nil {
				if unavailable(err) || errors.Is(err, errConnGone) {
					err = fmt.Errorf("%w: read who holds key %s: %w", ErrUnavailable, k, err)
				} else {
					err = fmt.Errorf("pglock: read who holds key %s: %w", k, err)
				}
			}
			return pid, app, ok, err
		}
	}
	switch db := lk.conn.(type) {
	case *pgxpool.Pool:
		err = db.QueryRow(ctx, holderSQL, args...).Scan(&pid, &app)
		if errors.Is(err, pgx.ErrNoRows) {
			return 0, "", false, nil
		}
	case *sql.DB:
		err = db.QueryRowContext(ctx, holderSQL, args...).Scan(&pid, &app)
		if errors.Is(err, sql.ErrNoRows) {
			return 0, "", false, nil
		}
	case *memlock.Session:
		// The in-memory double: its table says.
		pid, app, ok = memHolder(db, k)
		return pid, app, ok, nil
	default:
		return 0, "", false, fmt.Errorf("%w: who holds key %s is read on a pool (*pgxpool.Pool or *sql.DB), not on a Locker on %T",
			ErrUnsupportedConn, k, lk.conn)
	}
	if err != nil {
		if unavailable(err) {
			err = fmt.Errorf("%w: read who holds key %s: %w", ErrUnavailable, k, err)
		} else {
			err = fmt.Errorf("pglock: read who holds key %s: %w", k, err)
		}
		return 0, "", false, err
	}
	return pid, app, true, nil
}

// nameCampaign sets the application_name of conn, the connection of a
// campaign of l (a Leader's Lock), to the Leader's identity, before the
// campaign waits on it: one round trip, unless the session carries it
// already (the server reports application_name to the client, so pgx knows
// it). The connection is the campaign's alone, and is closed rather than
// used for anything else afterwards (see lockconn.Group.PutWaitConn).
func nameCampaign(ctx context.Context, conn *pgx.Conn, l *Lock, bound time.Duration) error {
	id := l.cfg.identity
	if id == "" {
		return nil
	}
	if conn.PgConn().ParameterStatus("application_name") == id {
		return nil
	}
	sctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	if _, err := conn.Exec(sctx, setAppNameSQL, id); err != nil {
		return fmt.Errorf("pglock: name the Leader's session %q: %w", id, err)
	}
	return nil
}

// setAppNameSQL sets the session's application_name until the session
// ends or it is set again (not for the transaction alone).
const setAppNameSQL = "SELECT pg_catalog.set_config('application_name', $1, false)"

// A Leader on a Locker that does not multiplex (WithMultiplexing(false) on a
// pool, a *sql.DB whose driver is not pgx's) campaigns and leads on a
// connection of the caller's pool, taken for the hold. Its session carries
// the Leader's identity too: the pool connection is named when the campaign
// takes it, before it waits, and gets its application_name back before it
// returns to the pool (see pgxBackend.close, sqlBackend.close), so that no
// pooled connection keeps a Leader's name; a connection whose name could not
// be given back is destroyed, as one in doubt is. On a caller's own
// connection (a Locker on one connection) nothing is named: the connection
// is the caller's, and no replica can read who leads there.

// nameHold names conn, the pool connection of a hold of l, with the Leader's
// identity when l is a Leader's lock, and returns the application_name that
// the connection had (to give back when the hold ends) and whether it was
// named. One round trip, none when the connection carries the identity
// already (pgx knows the application_name: the server reports it). ctx
// bounds the statement, and should not end with the caller's (see
// pgxBackend.detach): a statement cut by its context costs the connection.
func nameHold(ctx context.Context, conn *pgx.Conn, l *Lock) (prev string, named bool, err error) {
	id := l.cfg.identity
	if !l.cfg.campaign || id == "" {
		return "", false, nil
	}
	prev = conn.PgConn().ParameterStatus("application_name")
	if prev == id {
		return "", false, nil
	}
	if err := lockconn.RetryCanceled(func() error { _, err := conn.Exec(ctx, setAppNameSQL, id); return err }); err != nil {
		return "", false, fmt.Errorf("pglock: name the Leader's session %q: %w", id, err)
	}
	return prev, true, nil
}

// unnameHold gives conn back the application_name prev that nameHold
// replaced.
func unnameHold(ctx context.Context, conn *pgx.Conn, prev string) error {
	return lockconn.RetryCanceled(func() error { _, err := conn.Exec(ctx, setAppNameSQL, prev); return err })
}

// nameSQLHold is nameHold on a *sql.Conn whose driver is not pgx's, which
// does not tell the application_name: it is read first (two round trips).
func nameSQLHold(ctx context.Context, conn *sql.Conn, l *Lock) (prev string, named bool, err error) {
	id := l.cfg.identity
	if !l.cfg.campaign || id == "" {
		return "", false, nil
	}
	qctx, cancel := bounded(ctx, l.cfg.releaseTimeout)
	defer cancel()
	err = lockconn.RetryCanceled(func() error {
		return conn.QueryRowContext(qctx, "SELECT pg_catalog.current_setting('application_name')").Scan(&prev)
	})
	if err == nil && prev == id {
		return "", false, nil
	}
	if err == nil {
		err = lockconn.RetryCanceled(func() error { _, err := conn.ExecContext(qctx, setAppNameSQL, id); return err })
	}
	if err != nil {
		return "", false, fmt.Errorf("pglock: name the Leader's session %q: %w", id, err)
	}
	return prev, true, nil
}

// unnameSQLHold is unnameHold on a *sql.Conn whose driver is not pgx's.
func unnameSQLHold(conn *sql.Conn, prev string, bound time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	return lockconn.RetryCanceled(func() error { _, err := conn.ExecContext(ctx, setAppNameSQL, prev); return err })
}

// observe reads who leads from the server every ObserveInterval, and at
// once when kicked (this Leader's term began or ended), until ctx ends, and
// calls OnNewLeader with each new identity seen.
func (ld *Leader) observe(ctx context.Context) {
	t := time.NewTimer(0)
	defer t.Stop()
	last, failing := "", false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-ld.kick:
		}
		rctx, cancel := context.WithTimeout(ctx, ld.l.cfg.releaseTimeout)
		_, id, ok, err := ld.lk.keyHolder(rctx, ld.Key())
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case err != nil && !failing:
			failing = true
			ld.logf(slog.LevelWarn, "pglock: leader: cannot read who leads from the server", err)
		case err != nil:
		case ok && id != last:
			failing = false
			last = id
			ld.cfg.OnNewLeader(id)
		default:
			failing = false
		}
		t.Reset(ld.cfg.ObserveInterval)
	}
}

// kicked asks the observer, if any, to read who leads now.
func (ld *Leader) kicked() {
	select {
	case ld.kick <- struct{}{}:
	default:
	}
}

// keyHolder runs holderSQL on an open lock connection (on reports whether
// one was open to ask): a read of pg_locks that waits for no lock, bounded
// as every statement there is, the caller's ctx ending only its place in the
// queue (a statement cut by a context would cost the connection its locks).
func (m *mux) keyHolder(ctx context.Context, args []any) (pid int64, app string, ok, on bool, err error) {
	c := m.openSlot()
	if c == nil {
		return 0, "", false, false, nil
	}
	op := connOp{Ctx: ctx, Bounded: true, Fn: func(conn *pgx.Conn) {
		if conn == nil {
			err = errConnGone
			return
		}
		err = conn.QueryRow(context.Background(), holderSQL, args...).Scan(&pid, &app)
	}}
	c.Do(&op)
	if err == nil {
		err = op.Err
	}
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, "", false, true, nil
	}
	if err != nil {
		return 0, "", false, true, err
	}
	return pid, app, true, true, nil
}
