package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock/internal/keytable"
	"github.com/pglockkit/kit/pglock/internal/pooler"
)

// keyTable is a multiplexing Locker's table of keys (see package keytable):
// exclusion among its Locks, which share sessions. keyEntry is one key of it.
type (
	keyTable = keytable.Table[Key, *lockConn, *muxBackend, *relayWait]
	keyEntry = keytable.Entry[Key, *lockConn, *muxBackend, *relayWait]
)

// tableMode is m as the key table knows it.
func tableMode(m Mode) keytable.Mode {
	if m == Shared {
		return keytable.Shared
	}
	return keytable.Exclusive
}

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
	initRun *initRun // the run of initOnce under way; guarded by initMu
	connCfg *pgx.ConnConfig
	perHold source // a database/sql driver other than pgx's: one connection per hold
	// refused is the error of a connect that found a transaction pooler, or
	// of a self-test that found locks that do not exclude: every later
	// connect fails with it at once.
	refused atomic.Pointer[error]

	// statements counts the lock requests' statements on lock connections
	// (tests read it).
	statements atomic.Int64

	// hints are the homes of keys moved by pick (slot+1; 0: the slot by
	// hash), by bucket of hintOf.
	hints [hintBuckets]atomic.Int32

	mu       sync.Mutex
	slots    []*lockConn
	waitSem  chan struct{}
	waitIdle []*lockConn
	waitBusy map[*lockConn]struct{}
	// placedConns counts the waiting connections that hold a place in
	// waitSem (see mux.wait).
	placedConns int
	held        int // server locks held or being taken
	limit       int // the cap on held; 0 until known
	capacity    int // the server's lock table, as configured (0 if unknown)
	closed      bool
	// tg is the server-wide lock-table guard (see mux.guard).
	tg tableGuard
}

func newMux(pool *pgxpool.Pool, db *sql.DB, cfg *config) *mux {
	closing, cancel := context.WithCancel(context.Background())
	t := keytable.New[Key, *lockConn, *muxBackend, *relayWait](keytable.Config{
		SharedTries: true,
		Probes:      true, // see mux.probe
		Closed:      ErrLockerClosed,
	})
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
		return nil, m.closedErr(ctx, err)
	}
	if m.perHold != nil {
		b, err := m.perHold.open(ctx, l)
		if err != nil {
			return nil, err
		}
		return &perHoldBackend{backend: b, m: m}, nil
	}
	// A Lock has one hold at a time: its backend lives in the Lock.
	l.muxb = muxBackend{m: m, l: l}
	return &l.muxb, nil
}

// perHoldBackend is a hold of a Locker on a *sql.DB whose driver is not
// pgx's (one connection per hold): its acquire is interrupted by the Locker's
// Close, as a multiplexed one is, and fails with ErrLockerClosed.
type perHoldBackend struct {
	backend
	m *mux
}

func (b *perHoldBackend) acquire(ctx context.Context, wait bool) (bool, error) {
	actx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(b.m.closing, cancel)
	defer stop()
	ok, err := b.backend.acquire(actx, wait)
	if ok && b.m.closing.Err() != nil {
		// Granted as the Locker closed: let it go.
		_ = b.backend.release(context.WithoutCancel(ctx), false)
		return false, ErrLockerClosed
	}
	if !ok && err == nil && wait && ctx.Err() == nil && b.m.closing.Err() != nil {
		err = ErrLockerClosed
	}
	return ok, b.m.closedErr(ctx, err)
}

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
// busy. A deadline is said in the text only, so that it does not read as a
// busy key; a cancel is kept (context.Canceled matches).
func connectingErr(ctxErr error) error {
	if errors.Is(ctxErr, context.DeadlineExceeded) {
		return fmt.Errorf("%w: %w (%v)", ErrUnavailable, errConnectCut, ctxErr)
	}
	return fmt.Errorf("%w: %w: %w", ErrUnavailable, errConnectCut, ctxErr)
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
	c := m.slot(0)
	if c == nil {
		return 0, 0, ErrLockerClosed
	}
	op := connOp{fn: func(conn *pgx.Conn) {
		err = conn.QueryRow(context.Background(), guardCountSQL).Scan(&n, &capacity)
	}}
	c.do(&op)
	if err == nil {
		err = op.err
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
		_ = conn.Close(ctx)
		return nil, err
	}
	if err := checkPrimary(ctx, conn, m.releaseTimeout); err != nil {
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
	for i := 0; i < len(settings); i++ {
		if _, set := cfg.RuntimeParams[settings[i][0]]; set {
			settings = append(settings[:i], settings[i+1:]...)
			i--
		}
	}
	// A lock connection that holds many locks stays inside a transaction
	// block (see blockFrom): there idle_session_timeout does not apply, and
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
			_ = conn.Close(ctx)
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
		// lockConn.cleanup) are prepared now: on a full lock table their
		// Parse could need a lock for the catalog lookups (when a filler's
		// strong locks keep catalogs off the fast path), fail, and lose
		// the connection with every lock on it.
		for _, mode := range []Mode{Exclusive, Shared} {
			for pair := range 2 {
				sql := fixed[Session][mode][pair].unlock
				if _, err := conn.Prepare(ctx, sql, sql); err != nil {
					_ = conn.Close(ctx)
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

// pick returns the lock connection for a try of k: its home slot (homeOf),
// unless that one is running a statement while another lock connection is
// free (open and unused, or not opened yet), which then takes it at once
// rather than after the home's round trip, and becomes the home of the
// key's bucket of hints. The hold lives where it was taken (see
// keyTable.HeldOn): its unlock goes there, whatever the home. So a few
// goroutines on distinct keys use the lock connections side by side, as many
// raw sessions would, even when their keys hash to one slot (after one
// collision their keys live apart), and under load, when all are busy,
// requests queue at home and share its statements. nil once the Locker is
// closed.
func (m *mux) pick(k Key) *lockConn {
	home := m.homeOf(k)
	c := m.slot(home)
	if c == nil || m.conns == 1 || !c.busy() {
		return c
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	unopened := -1
	for i := 1; i < m.conns; i++ {
		j := (home + i) % m.conns
		switch o := m.slots[j]; {
		case o == nil:
			if unopened < 0 {
				unopened = j
			}
		case o.free():
			m.hints[hintOf(k)].Store(int32(j) + 1)
			return o
		}
	}
	if unopened >= 0 {
		// A slot no key has used yet: opened now, once (a connect instead
		// of the home's round trip).
		o := &lockConn{m: m, slot: unopened}
		m.slots[unopened] = o
		m.hints[hintOf(k)].Store(int32(unopened) + 1)
		return o
	}
	return c
}

// hintBuckets is the number of buckets of mux.hints: keys that share a
// bucket share their home (a hint, not a rule: any lock connection may take
// any key).
const hintBuckets = 256

// homeOf is k's home lock connection: where a try of its hint bucket last
// moved to (see pick), else its slot by hash (slotOf).
func (m *mux) homeOf(k Key) int {
	if h := int(m.hints[hintOf(k)].Load()); h > 0 && h <= m.conns {
		return h - 1
	}
	return m.slotOf(k)
}

// keyHash mixes a key's bits (Fibonacci hashing).
func keyHash(k Key) uint64 {
	h := uint64(k.v) * 0x9E3779B97F4A7C15
	if k.pair {
		h ^= 0xBF58476D1CE4E5B9
	}
	return h
}

// hintOf is k's bucket of mux.hints.
func hintOf(k Key) int { return int(keyHash(k)>>16) % hintBuckets }

// slotOf spreads keys over the lock connections (see pick).
func (m *mux) slotOf(k Key) int {
	return int((keyHash(k) >> 32) % uint64(m.conns))
}

// reserve counts one more server lock against the cap: a lock held, or a
// try in flight. A wait counts once granted (see forceReserve), not while it
// waits.
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

// forceReserve counts a lock granted after a wait against the cap, even past
// it (see mux.wait).
func (m *mux) forceReserve() {
	m.mu.Lock()
	m.held++
	m.mu.Unlock()
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
	ok, err := m.try(ctx, e, b.l.cfg.mode)
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
// held, it counts against the cap (see reserve).
func (m *mux) try(ctx context.Context, e *keyEntry, mode Mode) (bool, error) {
	k := e.Key()
	if err := m.guard(ctx, k); err != nil {
		return false, err
	}
	if err := m.reserve(k); err != nil {
		return false, err
	}
	var c *lockConn
	op := connOp{ctx: ctx, key: k, mode: mode}
	// A connection lost before or during the statement, or before its grant
	// was recorded, holds nothing: try again on a new one.
	for range 3 {
		if c = m.pick(k); c == nil {
			op.err = ErrLockerClosed
			break
		}
		op.ok, op.err = false, nil
		c.do(&op)
		if op.err == nil && op.ok && !m.t.Granted(e, tableMode(mode), c) {
			op.ok, op.err = false, fmt.Errorf("%w: lost before the grant was recorded", errConnGone)
		}
		if !errors.Is(op.err, errConnGone) {
			break
		}
	}
	if op.err != nil || !op.ok {
		m.unreserve()
	}
	return op.ok, op.err
}

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
// too.
func (m *mux) waitContext(ctx context.Context) (context.Context, func()) {
	wctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(m.closing, cancel)
	return wctx, func() {
		stop()
		cancel()
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
	if len(m.waitSem) >= cap(m.waitSem)-1 {
		return false, false, nil
	}
	select {
	case m.waitSem <- struct{}{}:
	default:
		return false, false, nil
	}
	err = m.guard(ctx, e.Key())
	if err == nil {
		if err = m.reserve(e.Key()); err == nil {
			m.unreserve() // counted once granted, as a wait is
		}
	}
	if err != nil {
		<-m.waitSem
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
	wc = m.waitConn(placed)
	if wc == nil {
		if placed {
			<-m.waitSem
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
		if wc = m.replaceWaitConn(wc, placed); wc == nil {
			return nil, false, false, ErrLockerClosed
		}
	}
}

// deadOnArrival is how soon the first answer to a waiting connection's
// statement must come to be taken for a session that was over before the
// statement was sent (see serverWait).
const deadOnArrival = 50 * time.Millisecond

// replaceWaitConn closes wc, whose session ended, and returns another
// waiting connection in its stead, with its place (placed) kept; nil once
// the Locker is closed (the place given back).
func (m *mux) replaceWaitConn(wc *lockConn, placed bool) *lockConn {
	m.mu.Lock()
	delete(m.waitBusy, wc)
	if wc.placed {
		wc.placed = false
		m.placedConns--
	}
	m.mu.Unlock()
	wc.close(errConnGone)
	next := m.waitConn(placed)
	if next == nil && placed {
		<-m.waitSem
	}
	return next
}

// serverWaitOn is one attempt of serverWait on wc; start is when its wait
// statement was sent.
func (m *mux) serverWaitOn(wctx context.Context, b *muxBackend, wc *lockConn, placed, hot bool) (_ *lockConn, held, healthy bool, start time.Time, err error) {
	start = time.Now()
	op := connOp{ctx: wctx, fn: func(conn *pgx.Conn) {
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
			wc.addHolds(1)
		}
	}}
	wc.do(&op)
	if op.err != nil {
		// The waiting connection could not be opened, or not yet: a
		// connect under way goes on, for the next wait.
		err, healthy = op.err, errors.Is(op.err, errConnectCut)
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
	m.putWaitConn(wc, healthy && !errors.Is(err, errConnGone))
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
	op := connOp{fn: func(conn *pgx.Conn) {
		var contended bool
		held, healthy, contended, err = waitRelayed(wctx, conn, rw, e.Key(), m.releaseTimeout)
		if contended {
			m.t.MarkHot(e.Key()) // another session had the key, or waited for it, first
		}
		if held && time.Since(rw.sent) >= m.statementBound() {
			held, healthy, err = m.confirm(conn)
		}
		if held {
			wc.addHolds(1)
		}
	}}
	wc.do(&op)
	if op.err != nil {
		held, healthy, err = false, false, op.err
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
	// that says nothing of the session (see retryCanceled).
	err = retryCanceled(func() error { return conn.QueryRow(context.Background(), checkSQL).Scan(&ok) })
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
	select {
	case m.waitSem <- struct{}{}:
		return true, false, nil
	default:
	}
	pause := minPlacePoll
	t := time.NewTimer(pause)
	defer t.Stop()
	for {
		select {
		case m.waitSem <- struct{}{}:
			return true, false, nil
		case <-ctx.Done():
			return false, false, nil
		case <-t.C:
		}
		held, err := m.try(ctx, e, mode)
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

// waitConn takes an idle waiting connection or makes one; placed: the
// caller holds a place in waitSem, which the connection keeps until it is
// given back (see putWaitConn). It returns nil once the Locker is closed.
func (m *mux) waitConn(placed bool) *lockConn {
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
	c.placed = placed
	if placed {
		m.placedConns++
	}
	m.waitBusy[c] = struct{}{}
	return c
}

// putWaitConn gives back a waiting connection that holds nothing, after a
// wait that failed or after the release of what it waited for, with its
// place in waitSem if it has one. One in doubt is closed, and so is one that
// would make more idle and placed connections than WithWaitConns, and a
// Leader's campaign connection.
func (m *mux) putWaitConn(c *lockConn, healthy bool) {
	m.mu.Lock()
	delete(m.waitBusy, c)
	placed := c.placed
	if placed {
		c.placed = false
		m.placedConns--
	}
	// Idle and placed connections together stay within WithWaitConns: a
	// wait that takes a place takes an idle connection, or opens one
	// only when none is idle. A Leader's campaign connection (not placed)
	// is not kept: it carries the Leader's identity (issue 25, see
	// nameCampaign).
	keep := healthy && placed && !m.closed && !c.isDead() && len(m.waitIdle)+m.placedConns < m.waitConns
	if keep {
		m.waitIdle = append(m.waitIdle, c)
	}
	m.mu.Unlock()
	if !keep {
		c.close(errConnGone)
	}
	if placed {
		<-m.waitSem
	}
}

// connLost marks every key held on c as lost and tells its holders.
func (m *mux) connLost(c *lockConn, err error) {
	m.t.LoseConn(c, err)
}

// give gives back the server's lock on e's key (the caller owns e's turn),
// then passes the turn on. A hold that was lost is not sent anything. When
// the next goroutine of the process waits for the same exclusive key, the
// unlock takes the key again in the same statement and hands it over: one
// round trip per hand-off, and a waiter of another session, queued in the
// server, still comes first (see connOp.retake).
func (m *mux) give(e *keyEntry, mode Mode, member *setMember) error {
	c, lostErr := m.t.HeldOn(e)
	if lostErr != nil {
		m.ended(e, c, false)
		return join(ErrLockLost, lostErr)
	}
	op := connOp{unlock: true, key: e.Key(), mode: mode, member: member}
	accept := m.handsTo(c)
	if mode == Exclusive && c.slot < 0 && accept(false) && m.t.IsHot(e.Key()) && m.t.CanRelay(e) {
		if done, err := m.relay(e, c); done {
			return err
		}
	}
	next, campaign := m.t.NextExclusive(e)
	op.retake = mode == Exclusive && next && accept(campaign)
	err := m.unlock(c, &op)
	if err == nil && op.retake && !op.retaken {
		// The unlock granted the key to a session of another process,
		// queued in the server.
		m.t.MarkHot(e.Key())
	}
	if err == nil && op.retaken {
		handed, lost := m.t.HandOff(e, c, accept)
		switch {
		case handed:
			return nil
		case lost: // the key taken again is gone with the connection
			m.ended(e, c, false)
			return nil
		}
		// The waiter left meanwhile: give the key back after all.
		op = connOp{unlock: true, key: e.Key(), mode: mode}
		err = m.unlock(c, &op)
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
	op := connOp{bounded: true, fn: func(conn *pgx.Conn) {
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
		c.addHolds(-1)
	}}
	c.do(&op)
	switch {
	case op.err != nil:
		m.ended(e, c, false)
		return true, join(ErrLockLost, op.err)
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
		m.putWaitConn(c, !c.isDead())
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
	op := connOp{fn: func(conn *pgx.Conn) {
		_, ok, _, _ := waitRelayed(ctx, conn, rw, k, m.releaseTimeout)
		if (!ok || !healthy) && conn != nil && !conn.IsClosed() {
			cctx, ccancel := context.WithTimeout(context.Background(), m.releaseTimeout)
			_ = conn.Close(cctx)
			ccancel()
		}
	}}
	rw.conn.do(&op)
}

// handsTo says to which waiters a hold on c may be handed without leaving
// it (a retake): any but a Leader's campaign, on a lock connection; on a waiting connection that
// holds a place among WithWaitConns, not a Leader's campaign (which would keep
// the place for a whole term); on a Leader's own connection, none (the hold
// would live outside the places). The others take the key the usual way.
func (m *mux) handsTo(c *lockConn) func(campaign bool) bool {
	if c.slot >= 0 {
		// Not to a Leader's campaign, which takes its key on a connection
		// of its own (issue 25, see takeCampaign).
		return func(campaign bool) bool { return !campaign }
	}
	m.mu.Lock()
	placed := c.placed
	m.mu.Unlock()
	return func(campaign bool) bool { return placed && !campaign }
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
		m.putWaitConn(c, healthy)
	}
	m.t.PassTurn(e)
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
	m.t.Close()
	for _, c := range cs {
		c.close(ErrLockerClosed)
	}
	return nil
}

// stats counts what the multiplexer uses now.
func (m *mux) stats() LockerStats {
	var s LockerStats
	s.HeldKeys, s.Queued = m.t.Counts()
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, c := range m.slots {
		if c != nil && !c.isDead() && c.hasConn() {
			s.LockConns++
		}
	}
	for c := range m.waitBusy {
		switch {
		case !c.placed:
			s.LeaderConns++
		case c.holdsAny():
			s.HoldingConns++
		default:
			s.WaitingConns++
		}
	}
	for _, c := range m.waitIdle {
		if c.hasConn() {
			s.IdleConns++
		}
	}
	s.WaitConns = s.WaitingConns + s.HoldingConns + s.IdleConns + s.LeaderConns
	s.Sessions = s.LockConns + s.WaitConns
	s.MaxSessions = m.conns + m.waitConns + s.LeaderConns
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
	case held == nil || held.slot != slot:
		c = m.slot(slot)
	case m.conns > 1:
		c = m.slot((slot + 1) % m.conns)
	default:
		select {
		case m.waitSem <- struct{}{}:
			if borrowed = m.waitConn(true); borrowed == nil {
				<-m.waitSem
			}
			c = borrowed
		default:
		}
	}
	exclusiveWaits, ok := false, false
	if c != nil {
		op := connOp{ctx: ctx, key: e.Key(), mode: Shared, probe: true}
		c.do(&op)
		exclusiveWaits, ok = !op.ok, op.err == nil
		if borrowed != nil {
			m.putWaitConn(borrowed, ok || errors.Is(op.err, errConnectCut))
		}
	}
	m.t.Probed(e, exclusiveWaits, ok)
}

// closedErr is the error of an acquire that failed while the Locker was
// being closed: ErrLockerClosed, whatever the interrupted statement or
// connect said (a cancelled statement, a connect cut short), which is kept
// as text only, so that the error does not claim that the caller's context
// ended.
func (m *mux) closedErr(ctx context.Context, err error) error {
	if err == nil || ctx.Err() != nil || m.closing.Err() == nil {
		return err
	}
	if errors.Is(err, ErrLockerClosed) && !errors.Is(err, context.Canceled) {
		return err
	}
	return fmt.Errorf("%w (%v)", ErrLockerClosed, err)
}

// release ends the hold; the last local holder of the key unlocks it. The
// unlock is bounded by the release timeout, not by ctx.
func (b *muxBackend) release(ctx context.Context, _ bool) error {
	return b.endAs(setMemberOf(ctx))
}

// discard ends a hold that was lost: nothing is sent for it (unless it turns
// out not to be lost, then it is unlocked).
func (b *muxBackend) discard() { _ = b.end() }

func (b *muxBackend) end() error { return b.endAs(nil) }

// endAs is end; member: the release is one of a key set's (see setBatch),
// whose unlock lingers for the others' on a free lock connection.
func (b *muxBackend) endAs(member *setMember) error {
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
		op := connOp{check: true}
		c.do(&op)
		if errors.Is(op.err, errConnGone) {
			checkErr = join(ErrLockLost, op.err)
		}
	}
	if !t.Leave(e) {
		if lostErr != nil {
			return join(ErrLockLost, lostErr)
		}
		return checkErr
	}
	return b.m.give(e, b.l.cfg.mode, member)
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

// busy reports whether a goroutine is using the connection (its requests
// would queue).
func (c *lockConn) busy() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.active
}

// free reports whether the connection is open, not known to be lost, and
// unused: a request sent now runs at once. (The pgx connection itself is
// not asked: its watch may be using it.)
func (c *lockConn) free() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.active && c.dead == nil && c.conn != nil
}

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
	// bounded like any statement there (see lockConn.flush), so a silent
	// network loses the connection within the same bound as when idle.
	return b.l.takeToken(ctx, func() (int64, error) {
		var token int64
		var err error
		op := connOp{ctx: ctx, bounded: true, fn: func(conn *pgx.Conn) {
			if conn == nil {
				err = errConnGone
				return
			}
			token, err = b.l.tokenOnce(context.Background(), conn, true, false)
		}}
		c.do(&op)
		if err == nil {
			err = op.err
		}
		return token, err
	})
}
