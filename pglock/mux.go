package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// mux is the source of a multiplexing Locker's session locks: they live on a
// few connections of the Locker's own (lock connections), not on one pool
// connection each. See the package documentation, "Lock connections".
//
// A key is taken in the server by the goroutine whose turn it is in the key
// table: first with the non-blocking function on the key's lock connection
// (combined with other goroutines' requests), then, if another session holds
// it and the caller waits, with the blocking function on a waiting
// connection, which keeps the lock until it is released.
type mux struct {
	t              *keyTable
	pool           *pgxpool.Pool
	db             *sql.DB
	conns          int // lock connections
	waitConns      int // waiting connections, at most
	maxLocks       int // WithMaxLocks; 0: derived from the server
	lostCheck      time.Duration
	releaseTimeout time.Duration

	closing       context.Context // ends when the Locker is closed
	cancelClosing context.CancelFunc

	initMu  sync.Mutex
	inited  atomic.Bool
	connCfg *pgx.ConnConfig
	perHold source // a database/sql driver other than pgx's: one connection per hold
	// refused is the error of a connect that found a transaction pooler:
	// every later connect fails with it at once.
	refused atomic.Pointer[error]

	mu       sync.Mutex
	slots    []*lockConn
	waitSem  chan struct{}
	waitIdle []*lockConn
	waitBusy map[*lockConn]struct{}
	held     int // server locks held or being taken
	limit    int // the cap on held; 0 until known
	capacity int // the server's lock table, as configured (0 if unknown)
	closed   bool
}

func newMux(pool *pgxpool.Pool, db *sql.DB, cfg *config) *mux {
	closing, cancel := context.WithCancel(context.Background())
	t := newKeyTable()
	t.sharedTries = true
	return &mux{
		closing:        closing,
		cancelClosing:  cancel,
		t:              t,
		pool:           pool,
		db:             db,
		conns:          cfg.lockConns,
		waitConns:      cfg.waitConns,
		maxLocks:       cfg.maxLocks,
		lostCheck:      cfg.lostCheck,
		releaseTimeout: cfg.releaseTimeout,
		slots:          make([]*lockConn, cfg.lockConns),
		waitSem:        make(chan struct{}, cfg.waitConns),
		waitBusy:       make(map[*lockConn]struct{}),
	}
}

func (m *mux) owned() bool    { return true }
func (m *mux) callerTx() bool { return false }
func (m *mux) kind() string {
	if m.pool != nil {
		return "pgxpool.Pool"
	}
	return "sql.DB"
}

func (m *mux) open(ctx context.Context, l *Lock) (backend, error) {
	if err := m.init(ctx); err != nil {
		return nil, err
	}
	if m.perHold != nil {
		return m.perHold.open(ctx, l)
	}
	// A Lock has one hold at a time: its backend lives in the Lock.
	l.muxb = muxBackend{m: m, l: l}
	return &l.muxb, nil
}

// init finds the connection settings (on a *sql.DB, those of pgx's driver;
// with another driver the Locker keeps one connection per hold), opens the
// first lock connection and reads the server's lock table size, once.
func (m *mux) init(ctx context.Context) error {
	if m.inited.Load() {
		return nil
	}
	m.initMu.Lock()
	defer m.initMu.Unlock()
	if m.inited.Load() {
		return nil
	}
	if m.isClosed() {
		return ErrLockerClosed
	}
	if m.pool != nil {
		m.connCfg = m.pool.Config().ConnConfig
	} else {
		c, err := m.db.Conn(ctx)
		if err != nil {
			return err
		}
		_ = c.Raw(func(dc any) error {
			if pc, ok := dc.(pgxConner); ok && pc.Conn() != nil {
				m.connCfg = pc.Conn().Config()
			}
			return nil
		})
		_ = c.Close()
		if m.connCfg == nil {
			m.perHold = &sqlSource{db: m.db}
			m.inited.Store(true)
			return nil
		}
	}
	c := m.slot(0)
	if c == nil {
		return ErrLockerClosed
	}
	var err error
	op := connOp{ctx: ctx, fn: func(conn *pgx.Conn) { err = m.readLimit(conn) }}
	c.do(&op)
	if err == nil {
		err = op.err
	}
	if err == nil {
		m.inited.Store(true)
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
	err := conn.QueryRow(ctx, `SELECT current_setting('max_locks_per_transaction')::int *
		(current_setting('max_connections')::int + current_setting('max_prepared_transactions')::int)`).Scan(&capacity)
	if err != nil {
		return fmt.Errorf("pglock: read the server's lock table size: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.capacity = capacity
	m.limit = m.maxLocks
	if m.limit == 0 {
		m.limit = max(capacity/lockTableShare, 1)
	}
	return nil
}

// lockTableShare: by default a Locker holds at most 1/lockTableShare of the
// server's lock table, which every session of the server shares.
const lockTableShare = 4

// connect opens a lock connection, and tells the server to end its session
// if the client vanishes: a client cut off by a dead network would otherwise
// keep its locks for hours (TCP keepalives default to 2 h), or forever behind
// a middlebox that keeps TCP open. Server-side keepalives end it when the
// client's kernel no longer answers; idle_session_timeout (PostgreSQL 14 and
// later) when nothing comes from it: while a lock is held the connection's
// watch keeps it busy, so a live holder is never cut. Both bounds are well
// past the client's own (twice the check interval), so the client sees the
// loss first.
func (m *mux) connect(ctx context.Context) (*pgx.Conn, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	if err := m.refused.Load(); err != nil {
		return nil, *err
	}
	cfg := m.connCfg.Copy()
	limit := cfg.ConnectTimeout
	if limit <= 0 {
		limit = m.releaseTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := checkSession(ctx, conn, m.releaseTimeout); err != nil {
		if errors.Is(err, ErrTransactionPooler) {
			m.refused.Store(&err)
		}
		_ = conn.Close(ctx)
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
	var q strings.Builder
	var args []any
	for _, kv := range settings {
		if _, set := cfg.RuntimeParams[kv[0]]; set {
			continue
		}
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
			_ = conn.Close(ctx)
			return nil, fmt.Errorf("pglock: set the lock connection's session bounds: %w", err)
		}
	}
	return conn, nil
}

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

// AbandonedSessionTimeout bounds how long the server keeps the session of a
// multiplexing Locker's lock connection whose client has gone silent, and so
// its locks: it ends it within this time of silence (by server-side TCP
// keepalives from half of it, tcp_user_timeout, or idle_session_timeout),
// and never before the client has seen the loss (twice the lost-check
// interval). With a lost-check interval above a quarter of it, the bound is
// four intervals. The bound holds on PostgreSQL 14 and later; before 14
// there is no idle_session_timeout, and behind a proxy or middlebox that
// answers TCP for a vanished client (so that keepalives never fail), the
// server keeps the session until the proxy closes it.
const AbandonedSessionTimeout = 6 * time.Second

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

// slot returns the live lock connection of slot i, replacing a lost one;
// nil once the Locker is closed.
func (m *mux) slot(i int) *lockConn {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	c := m.slots[i]
	if c == nil || c.isDead() {
		c = &lockConn{m: m, slot: i}
		m.slots[i] = c
	}
	return c
}

// slotOf spreads keys over the lock connections; a key's lock and unlock go
// to the same one.
func (m *mux) slotOf(k Key) int {
	h := uint64(k.v) * 0x9E3779B97F4A7C15
	if k.pair {
		h ^= 0xBF58476D1CE4E5B9
	}
	return int((h >> 32) % uint64(m.conns))
}

// reserve counts one more server lock against the cap.
func (m *mux) reserve(k Key) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrLockerClosed
	}
	if m.limit > 0 && m.held >= m.limit {
		return fmt.Errorf("%w: key %s: this Locker holds %d locks, its limit (see WithMaxLocks; the server's lock table has %d slots for every session of the server)",
			ErrTooManyLocks, k, m.held, m.capacity)
	}
	m.held++
	return nil
}

func (m *mux) unreserve() {
	m.mu.Lock()
	m.held--
	m.mu.Unlock()
}

func (m *mux) isClosed() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.closed
}

// take takes the server's lock on e's key; the caller owns e's turn, which
// take passes on when the lock is not held afterwards.
func (m *mux) take(ctx context.Context, b *muxBackend, e *keyEntry, wait bool) (bool, error) {
	k, mode := e.key, b.l.cfg.mode
	if err := m.reserve(k); err != nil {
		m.t.passTurn(e)
		return false, err
	}
	var c *lockConn
	op := connOp{ctx: ctx, key: k, mode: mode}
	// A connection lost before or during the statement, or before its grant
	// was recorded, holds nothing: try again on a new one.
	for range 3 {
		if c = m.slot(m.slotOf(k)); c == nil {
			op.err = ErrLockerClosed
			break
		}
		op.ok, op.err = false, nil
		c.do(&op)
		if op.err == nil && op.ok && !m.t.granted(e, mode, c) {
			op.ok, op.err = false, fmt.Errorf("%w: lost before the grant was recorded", errConnGone)
		}
		if !errors.Is(op.err, errConnGone) {
			break
		}
	}
	switch {
	case op.err != nil:
		m.unreserve()
		m.t.passTurn(e)
		return false, op.err
	case op.ok:
		return true, nil
	case !wait:
		m.unreserve()
		m.t.passTurn(e)
		return false, nil
	}
	m.t.tried(e)
	held, err := m.wait(ctx, b, e)
	if !held {
		m.unreserve()
		m.t.passTurn(e)
	}
	return held, err
}

// wait waits for the key in the server's queue on a waiting connection.
func (m *mux) wait(ctx context.Context, b *muxBackend, e *keyEntry) (bool, error) {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(m.closing, cancel)
	defer stop()
	// A Leader's campaign waits for as long as the process lives: it does
	// not count among the waits WithWaitConns bounds.
	counted := !b.l.cfg.campaign
	if counted {
		select {
		case m.waitSem <- struct{}{}:
		case <-wctx.Done():
			return false, m.waitErr(ctx)
		}
	}
	wc := m.waitConn()
	if wc == nil {
		if counted {
			<-m.waitSem
		}
		return false, ErrLockerClosed
	}
	var held, healthy bool
	var err error
	op := connOp{ctx: wctx, fn: func(conn *pgx.Conn) {
		held, healthy, err = waitSession(wctx, b.l, conn)
		if held {
			wc.addHolds(1)
		}
	}}
	wc.do(&op)
	if op.err != nil {
		err = op.err // the waiting connection could not be opened
	}
	if held && m.t.granted(e, b.l.cfg.mode, wc) {
		// The connection now holds what it waited for, until its release: it
		// no longer counts among the waiting, so a long hold does not keep
		// other keys from being waited for.
		if counted {
			<-m.waitSem
		}
		return true, nil
	}
	if held { // granted on a connection lost since: gone with it
		healthy, err = false, fmt.Errorf("%w: lost as the wait ended", errConnGone)
	}
	if err == nil {
		err = m.waitErr(ctx)
	}
	m.putWaitConn(wc, healthy && !errors.Is(err, errConnGone), counted)
	return false, err
}

// waitErr is the error of a wait that ended without the lock: ctx's, or the
// Locker's closing.
func (m *mux) waitErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return ErrLockerClosed
}

// waitConn takes an idle waiting connection or makes one; the caller holds
// a place in waitSem. It returns nil once the Locker is closed.
func (m *mux) waitConn() *lockConn {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	var c *lockConn
	for len(m.waitIdle) > 0 && c == nil {
		c = m.waitIdle[len(m.waitIdle)-1]
		m.waitIdle = m.waitIdle[:len(m.waitIdle)-1]
		if c.isDead() {
			c = nil
		}
	}
	if c == nil {
		c = &lockConn{m: m, slot: -1}
	}
	m.waitBusy[c] = struct{}{}
	return c
}

// putWaitConn gives back a waiting connection that holds nothing: after a
// wait that failed (waiting: it gives back its place in waitSem too), or after
// the release of what it waited for. One in doubt is closed, and so is one
// that would make more idle ones than WithWaitConns.
func (m *mux) putWaitConn(c *lockConn, healthy, waiting bool) {
	m.mu.Lock()
	delete(m.waitBusy, c)
	closed := m.closed
	keep := healthy && !closed && !c.isDead() && len(m.waitIdle) < m.waitConns
	if keep {
		m.waitIdle = append(m.waitIdle, c)
	}
	m.mu.Unlock()
	if !keep {
		c.close(errConnGone)
	}
	if waiting {
		<-m.waitSem
	}
}

// connLost marks every key held on c as lost and tells its holders.
func (m *mux) connLost(c *lockConn, err error) {
	var fns []func(error)
	m.t.mu.Lock()
	if c.lost == nil {
		c.lost = err
	}
	for _, e := range m.t.m {
		if e.conn != c || e.lostErr != nil {
			continue
		}
		e.lostErr = err
		for _, h := range e.onLost {
			fns = append(fns, h.fn)
		}
	}
	m.t.mu.Unlock()
	for _, f := range fns {
		f(err)
	}
}

// give gives back the server's lock on e's key (the caller owns e's turn),
// then passes the turn on. A hold that was lost is not sent anything. When
// the next goroutine of the process waits for the same exclusive key, the
// unlock takes the key again in the same statement and hands it over: one
// round trip per hand-off, and a waiter of another session, queued in the
// server, still comes first (see connOp.retake).
func (m *mux) give(e *keyEntry, mode Mode) error {
	m.t.mu.Lock()
	c, lostErr := e.conn, e.lostErr
	m.t.mu.Unlock()
	if lostErr != nil {
		m.ended(e, c, false)
		return join(ErrLockLost, lostErr)
	}
	op := connOp{unlock: true, key: e.key, mode: mode}
	op.retake = mode == Exclusive && m.t.nextExclusive(e)
	err := m.unlock(c, &op)
	if err == nil && op.retaken {
		handed, lost := m.t.handOff(e, c)
		switch {
		case handed:
			return nil
		case lost: // the key taken again is gone with the connection
			m.ended(e, c, false)
			return nil
		}
		// The waiter left meanwhile: give the key back after all.
		op = connOp{unlock: true, key: e.key, mode: mode}
		err = m.unlock(c, &op)
	}
	m.ended(e, c, err == nil)
	return err
}

// unlock sends an unlock (or retake) on c and says how it went.
func (m *mux) unlock(c *lockConn, op *connOp) error {
	c.do(op)
	switch {
	case errors.Is(op.err, errConnGone):
		return join(ErrLockLost, op.err)
	case op.err != nil:
		return join(errUnlockFailed, op.err)
	case !op.ok:
		return errServerNotHeld
	}
	return nil
}

// ended records that e's key is no longer held on c: the cap, the waiting
// connection and e's turn are given back.
func (m *mux) ended(e *keyEntry, c *lockConn, healthy bool) {
	m.unreserve()
	if c != nil && c.slot < 0 {
		m.putWaitConn(c, healthy, false)
	}
	m.t.passTurn(e)
}

// close closes every connection: the locks on them are lost.
func (m *mux) close() error {
	m.cancelClosing()
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	var cs []*lockConn
	for _, c := range m.slots {
		if c != nil {
			cs = append(cs, c)
		}
	}
	cs = append(cs, m.waitIdle...)
	m.waitIdle = nil
	for c := range m.waitBusy {
		cs = append(cs, c)
	}
	m.mu.Unlock()
	close(m.t.closing)
	for _, c := range cs {
		c.close(ErrLockerClosed)
	}
	return nil
}

// stats counts what the multiplexer uses now.
func (m *mux) stats() LockerStats {
	var s LockerStats
	s.HeldKeys, s.Queued = m.t.counts()
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, c := range m.slots {
		if c != nil && !c.isDead() && c.hasConn() {
			s.LockConns++
		}
	}
	s.WaitConns = len(m.waitBusy)
	for _, c := range m.waitIdle {
		if c.hasConn() {
			s.WaitConns++
		}
	}
	s.ServerLocks = m.held
	s.MaxLocks = m.limit
	return s
}

// muxBackend is one hold of a multiplexing Locker's Lock.
type muxBackend struct {
	m *mux
	l *Lock
	e *keyEntry
}

func (b *muxBackend) acquire(ctx context.Context, wait bool) (bool, error) {
	mode := b.l.cfg.mode
	e, adm, err := b.m.t.enter(ctx, b.l.key, mode, wait)
	switch {
	case err != nil:
		return false, err
	case adm == admitBusy:
		return false, nil
	case adm == admitJoined:
		b.e = e
		return true, nil
	}
	ok, err := b.m.take(ctx, b, e, wait)
	if ok {
		b.e = e
	}
	return ok, err
}

// release ends the hold; the last local holder of the key unlocks it. The
// unlock is bounded by the release timeout, not by ctx.
func (b *muxBackend) release(context.Context, bool) error { return b.end() }

// discard ends a hold that was lost: nothing is sent for it (unless it turns
// out not to be lost, then it is unlocked).
func (b *muxBackend) discard() { _ = b.end() }

func (b *muxBackend) end() error {
	e := b.e
	if e == nil {
		return nil
	}
	b.e = nil
	t := b.m.t
	t.mu.Lock()
	e.dropHook(b)
	lostErr := e.lostErr
	t.mu.Unlock()
	if !t.leave(e) {
		if lostErr != nil {
			return join(ErrLockLost, lostErr)
		}
		return nil
	}
	return b.m.give(e, b.l.cfg.mode)
}

// watch registers lost to be called when the hold's connection is lost;
// the lock connection is watched once for all its holds.
func (b *muxBackend) watch(_ time.Duration, lost func(error)) func() {
	e := b.e
	t := b.m.t
	t.mu.Lock()
	e.onLost = append(e.onLost, lostHook{b, lost})
	lostErr := e.lostErr
	t.mu.Unlock()
	if lostErr != nil {
		lost(lostErr)
	}
	return func() {
		t.mu.Lock()
		e.dropHook(b)
		t.mu.Unlock()
	}
}

func (b *muxBackend) pgxTx() pgx.Tx  { return nil }
func (b *muxBackend) sqlTx() *sql.Tx { return nil }

// hasConn reports whether the lock connection has been opened.
func (c *lockConn) hasConn() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conn != nil
}

// token takes the fencing token on the connection that holds the key's
// server lock: the key's lock connection, or the waiting connection that
// was granted it.
func (b *muxBackend) token(ctx context.Context) (int64, error) {
	t := b.m.t
	t.mu.Lock()
	var c *lockConn
	if b.e != nil {
		c = b.e.conn
	}
	t.mu.Unlock()
	if c == nil {
		return 0, fmt.Errorf("%w: take a fencing token: the key's connection is gone", ErrLockLost)
	}
	// One statement per attempt, which never waits: the connection serves
	// other keys between attempts.
	return b.l.takeToken(ctx, func() (int64, error) {
		var token int64
		var err error
		op := connOp{ctx: ctx, fn: func(conn *pgx.Conn) {
			if conn == nil {
				err = errConnGone
				return
			}
			token, err = b.l.tokenOnce(ctx, conn, true)
		}}
		c.do(&op)
		if err == nil {
			err = op.err
		}
		return token, err
	})
}
