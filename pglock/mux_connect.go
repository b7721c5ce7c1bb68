package pglock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pglockkit/kit/pglock/internal/lockconn"
	"github.com/pglockkit/kit/pglock/internal/pooler"
)

// initRun is one run of mux.initOnce: done is closed when it ends, with err.
type initRun struct {
	done chan struct{}
	err  error
}

// init makes sure the Locker is ready (see initOnce). The work is the
// Locker's, not the caller's: it runs in a goroutine of its own, bounded by
// the connect timeout and Close, and callers wait for it as long as their
// contexts allow; one whose context ends first fails with ErrUnavailable
// (see connectingErr), and the next caller finds the work done. A run that
// failed is started again by the next caller.
func (m *mux) init(ctx context.Context) error {
	if m.inited.Load() {
		return nil
	}
	m.initMu.Lock()
	if m.inited.Load() {
		m.initMu.Unlock()
		return nil
	}
	if m.isClosed() {
		m.initMu.Unlock()
		return ErrLockerClosed
	}
	run := m.initRun
	if run == nil {
		run = &initRun{done: make(chan struct{})}
		m.initRun = run
		go func() {
			err := m.initOnce()
			m.initMu.Lock()
			defer m.initMu.Unlock()
			if err == nil {
				m.inited.Store(true)
			} else {
				m.initRun = nil
			}
			run.err = err
			close(run.done)
		}()
	}
	m.initMu.Unlock()
	select {
	case <-run.done:
		return run.err
	case <-ctx.Done():
		return connectingErr(ctx.Err())
	}
}

// connectingErr is the error of a request whose context ended (ctxErr)
// while the connection it needs was still being opened: ErrUnavailable, not
// busy (see lockconn.ConnectingErr).
func connectingErr(ctxErr error) error {
	return lockconn.ConnectingErr(ErrUnavailable, ctxErr)
}

// initOnce finds the connection settings (on a *sql.DB, those of pgx's
// driver; with another driver the Locker keeps one connection per hold),
// opens the first lock connection, reads the server's lock table size and
// checks that the server's advisory locks exclude (see selfTest).
func (m *mux) initOnce() error {
	limit := m.releaseTimeout
	if m.pool != nil && m.pool.Config().ConnConfig.ConnectTimeout > 0 {
		limit = m.pool.Config().ConnConfig.ConnectTimeout
	}
	ctx, cancel := context.WithTimeout(m.closing, limit+m.releaseTimeout)
	defer cancel()
	switch {
	case m.connCfg != nil: // an earlier run got as far (a connect may be using it)
	case m.pool != nil:
		m.connCfg = m.pool.Config().ConnConfig
	default:
		c, err := m.db.Conn(ctx)
		if err != nil {
			return err
		}
		var cfg *pgx.ConnConfig
		_ = c.Raw(func(dc any) error {
			if pc, ok := dc.(pgxConner); ok && pc.Conn() != nil {
				cfg = pc.Conn().Config()
			}
			return nil
		})
		_ = c.Close()
		if cfg == nil {
			m.perHold = &sqlSource{db: m.db}
			return nil
		}
		m.connCfg = cfg
	}
	c := m.lc.Slot(0)
	if c == nil {
		return ErrLockerClosed
	}
	var err error
	op := connOp{Ctx: ctx, Fn: func(conn *pgx.Conn) { err = m.readLimit(conn) }}
	c.Do(&op)
	if err == nil {
		err = op.Err
	}
	if err == nil {
		if _, err = m.selfTest(ctx, c); err != nil {
			m.refused.Store(&err) // no connect again: it would find the same
		}
	}
	return err
}

// readLimit sets the cap on locks held from the server's lock table size,
// unless WithMaxLocks set it.
func (m *mux) readLimit(conn *pgx.Conn) error {
	if conn == nil {
		return errConnGone
	}
	ctx, cancel := context.WithTimeout(context.Background(), m.releaseTimeout)
	defer cancel()
	var capacity int
	err := conn.QueryRow(ctx, `SELECT `+capacitySQL).Scan(&capacity)
	if err != nil {
		return fmt.Errorf("pglock: read the server's lock table size: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.capacity = capacity
	m.tg.mu.Lock()
	m.tg.capacity = capacity
	m.tg.mu.Unlock()
	if limit := serverLimitOf(capacity); m.maxLocks > limit {
		return fmt.Errorf("%w: WithMaxLocks(%d) is above what the server's lock table can hold for advisory locks:"+
			" %d (3/4 of its %d slots, max_locks_per_transaction * (max_connections + max_prepared_transactions), shared by every session);"+
			" raise max_locks_per_transaction, or lower the cap", ErrInvalidOption, m.maxLocks, limit, capacity)
	}
	m.limit = m.maxLocks
	if m.limit == 0 {
		m.limit = max(capacity/lockTableShare, 1)
	}
	return nil
}

// lockTableShare: by default a Locker holds at most 1/lockTableShare of the
// server's lock table, which every session of the server shares.
const lockTableShare = 4

// guard refuses a new lock when the advisory locks of every session of the
// server reach the server-wide limit (see tableGuard): a cap per Locker
// cannot see the other Lockers and processes that share the server.
func (m *mux) guard(ctx context.Context, k Key) error {
	return m.tg.admit(ctx, k, func() int {
		m.mu.Lock()
		defer m.mu.Unlock()
		return m.held
	}, m.serverAdvisory)
}

// serverAdvisory counts the advisory locks of every session of the server,
// held or waited for, and reads its lock table size, on the first lock
// connection (the statement waits for no lock).
func (m *mux) serverAdvisory() (n, capacity int, err error) {
	c := m.lc.Slot(0)
	if c == nil {
		return 0, 0, ErrLockerClosed
	}
	op := connOp{Fn: func(conn *pgx.Conn) {
		err = conn.QueryRow(context.Background(), guardCountSQL).Scan(&n, &capacity)
	}}
	c.Do(&op)
	if err == nil {
		err = op.Err
	}
	return n, capacity, err
}

// connect opens a lock connection, and tells the server to end its session
// if the client vanishes: a client cut off by a dead network would otherwise
// keep its locks for hours (TCP keepalives default to 2 h), or forever behind
// a middlebox that keeps TCP open. Server-side keepalives end it when the
// client's kernel no longer answers; idle_session_timeout (PostgreSQL 14 and
// later) when nothing comes from it: while a lock is held the connection's
// watch keeps it busy, so a live holder is never cut. Both bounds are well
// past the client's own (twice the check interval), so the client sees the
// loss first.
//
// On a lock connection (lockConn true) lock_timeout is short
// (lockConnLockTimeout): nothing sent there may wait for a lock, since it
// would stall every key of the connection; a statement that could (a fencing
// token, waiting for a table lock of a migration) fails at once and is tried
// again later. On a waiting connection it is 0: a wait lasts as long as its
// context allows.
func (m *mux) connect(parent context.Context, lockConn bool) (conn *pgx.Conn, err error) {
	if parent == nil {
		parent = context.Background()
	}
	if err := m.refused.Load(); err != nil {
		return nil, *err
	}
	cfg := m.connCfg.Copy()
	// A session the server ends (pg_terminate_backend, a timeout, a
	// shutdown) sends FATAL and then exits; pgx closes the connection on
	// reading it. Read on until the server has closed its end first: the
	// backend has then given back its locks, its pg_stat_activity entry and
	// its place among max_connections, so that the connection's loss, told
	// and counted after this, never lets a new session of the Locker open
	// beside one the server still has (see lockconn.AwaitServerEnd).
	onPgError := cfg.OnPgError
	cfg.OnPgError = func(pc *pgconn.PgConn, pgErr *pgconn.PgError) bool {
		keep := pgErr.Severity != "FATAL"
		if onPgError != nil {
			keep = onPgError(pc, pgErr)
		}
		if !keep {
			lockconn.AwaitServerEnd(pc.Conn(), lockconn.MaxSessionEnd)
		}
		return keep
	}
	if cfg.ValidateConnect == nil && hostList(cfg) {
		// A host list: connect to the primary among them, as
		// target_session_attrs=primary would (see checkPrimary).
		cfg.ValidateConnect = pgconn.ValidateConnectTargetSessionAttrsPrimary
	}
	limit := cfg.ConnectTimeout
	if limit <= 0 {
		limit = m.releaseTimeout
	}
	ctx, cancel := context.WithTimeout(parent, limit)
	defer cancel()
	defer func() {
		// The Locker's own bound, not a caller's deadline: the server did
		// not answer in time. Said as unavailable, and the deadline in the
		// text only, so that it does not read as a busy key.
		if err != nil && errors.Is(err, context.DeadlineExceeded) && parent.Err() == nil {
			err = fmt.Errorf("%w: no answer from the server within the connect timeout (%v): %v", ErrUnavailable, limit, err)
		}
	}()
	conn, err = pgx.ConnectConfig(ctx, cfg)
	if errors.Is(err, pgconn.ErrStandbyConnection) {
		// Every host of the list is a standby (or the pool's own
		// target_session_attrs refused one): said as checkPrimary says it.
		return nil, fmt.Errorf("%w: %w: no host of the list is a primary: %w", ErrNotPrimary, ErrUnavailable, err)
	}
	if err != nil {
		return nil, err
	}
	if err := pooler.Check(ctx, conn, m.releaseTimeout, notePrimary); err != nil {
		if errors.Is(err, ErrTransactionPooler) {
			m.refused.Store(&err)
		}
		endConnected(conn)
		return nil, err
	}
	if err := checkPrimary(ctx, conn, m.releaseTimeout); err != nil {
		endConnected(conn)
		return nil, err
	}
	// One statement after the connect, not startup parameters: a pooler
	// such as PgBouncer refuses startup parameters it does not know.
	// Keepalives end a silent session bound/2 + 2 probes 1 s apart after the
	// last packet the server received, which is past the client's
	// 2 x lostCheck; tcp_user_timeout (PostgreSQL 12 and later) covers
	// the case keepalives do not, data the server sent that is never
	// acknowledged. A setting the pool's configuration gives is left as it is.
	bound := m.abandonBound()
	settings := [][2]string{
		{"tcp_keepalives_idle", strconv.Itoa(int(max(bound/2, time.Second) / time.Second))},
		{"tcp_keepalives_interval", "1"},
		{"tcp_keepalives_count", "2"},
	}
	major := serverMajor(conn)
	if major >= 12 {
		settings = append(settings, [2]string{"tcp_user_timeout", strconv.FormatInt(bound.Milliseconds(), 10)})
	}
	if major >= 14 {
		settings = append(settings, [2]string{"idle_session_timeout", strconv.FormatInt(bound.Milliseconds(), 10)})
	}
	for i := 0; i < len(settings); i++ {
		if _, set := cfg.RuntimeParams[settings[i][0]]; set {
			settings = append(settings[:i], settings[i+1:]...)
			i--
		}
	}
	// A lock connection that holds many locks stays inside a transaction
	// block (see lockconn.blockFrom): there idle_session_timeout does not apply, and
	// idle_in_transaction_session_timeout bounds a silent client instead
	// (set whatever the pool's configuration says: these sessions are the
	// Locker's, and the block is its own).
	if lockConn {
		settings = append(settings, [2]string{"idle_in_transaction_session_timeout", strconv.FormatInt(bound.Milliseconds(), 10)})
	}
	// A wait on the Locker's own sessions lasts as long as its context
	// allows, and their statements are bounded by the library (socket
	// deadlines, cancel requests): a lock_timeout or statement_timeout set
	// for the role, the database or the pool would cut every wait short.
	lockTimeout := "0"
	if lockConn {
		lockTimeout = strconv.FormatInt(lockConnLockTimeout.Milliseconds(), 10)
	}
	settings = append(settings, [2]string{"lock_timeout", lockTimeout}, [2]string{"statement_timeout", "0"})
	var q strings.Builder
	var args []any
	for _, kv := range settings {
		if len(args) == 0 {
			q.WriteString("SELECT ")
		} else {
			q.WriteString(", ")
		}
		args = append(args, kv[0], kv[1])
		fmt.Fprintf(&q, "set_config($%d, $%d, false)", len(args)-1, len(args))
	}
	if len(args) > 0 {
		if _, err := conn.Exec(ctx, q.String(), append([]any{pgx.QueryExecModeSimpleProtocol}, args...)...); err != nil {
			endConnected(conn)
			return nil, fmt.Errorf("pglock: set the lock connection's session bounds: %w", err)
		}
	}
	// The client's side too: a wait in the server's queue can last for
	// hours with nothing sent, and a network that dies meanwhile would
	// otherwise be noticed only when the kernel's default keepalives
	// (minutes) give up; then the wait fails, and a Leader campaigns again
	// on a new connection.
	keepAlive(conn.PgConn().Conn(), max(bound/2, time.Second))
	if lockConn {
		// The unlocks that clean up after a failed statement (see
		// lockconn.Conn.cleanup) are prepared now: on a full lock table their
		// Parse could need a lock for the catalog lookups (when a filler's
		// strong locks keep catalogs off the fast path), fail, and lose
		// the connection with every lock on it.
		for _, mode := range []Mode{Exclusive, Shared} {
			for pair := range 2 {
				sql := fixed[Session][mode][pair].unlock
				if _, err := conn.Prepare(ctx, sql, sql); err != nil {
					endConnected(conn)
					return nil, fmt.Errorf("pglock: prepare the lock connection's statements: %w", err)
				}
			}
		}
	}
	return conn, nil
}

// hostList reports whether cfg lists more than one server: pgconn also
// makes a fallback of one host for sslmode=prefer (TLS, then plain), which
// is not a list.
func hostList(cfg *pgx.ConnConfig) bool {
	for _, fb := range cfg.Fallbacks {
		if fb.Host != cfg.Host || fb.Port != cfg.Port {
			return true
		}
	}
	return false
}

// keepAlive sets TCP keepalives on nc (a TCP connection, or TLS over one):
// the connection fails after idle of silence and 2 unanswered probes 1 s
// apart.
func keepAlive(nc net.Conn, idle time.Duration) {
	if tc, ok := nc.(interface{ NetConn() net.Conn }); ok {
		nc = tc.NetConn()
	}
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: idle, Interval: time.Second, Count: 2})
	}
}

// lockConnLockTimeout is the lock_timeout of a lock connection (see
// mux.connect).
const lockConnLockTimeout = 20 * time.Millisecond

// abandonBound is how long the server keeps the session of a lock connection
// whose client went silent.
func (m *mux) abandonBound() time.Duration {
	return max(AbandonedSessionTimeout, 4*m.lostCheck)
}

// statementBound bounds each statement on a lock connection: twice the
// lost-check interval (the bound in which a silent connection is noticed),
// or the release timeout if shorter.
func (m *mux) statementBound() time.Duration {
	return min(m.releaseTimeout, 2*m.lostCheck)
}

// serverMajor reads the server's major version from server_version ("15.4",
// "16beta1"); 0 if unknown.
func serverMajor(conn *pgx.Conn) int {
	v := conn.PgConn().ParameterStatus("server_version")
	n := 0
	for _, r := range v {
		if r < '0' || r > '9' {
			break
		}
		n = n*10 + int(r-'0')
	}
	return n
}

// endConnected ends the session of a connect that failed after the server
// accepted it (in the pooler check, the primary check, the session
// settings, the Prepares), or of the self-test's pool connection, before
// the connect or the self-test returns, so that the Locker's
// count of its sessions (see lockconn.Group.WaitSessions) counts it out
// only once it is gone: one pgx closed itself, its statement cut short (the
// Locker's Close cut the connect off), is waited for until pgx has read it
// to its end; another is ended by lockconn.EndSession. Either way for at
// most lockconn.MaxSessionEnd.
func endConnected(conn *pgx.Conn) {
	if !conn.IsClosed() {
		lockconn.EndSession(conn, lockconn.MaxSessionEnd)
		return
	}
	t := time.NewTimer(lockconn.MaxSessionEnd)
	defer t.Stop()
	select {
	case <-conn.PgConn().CleanupDone():
	case <-t.C:
	}
}
