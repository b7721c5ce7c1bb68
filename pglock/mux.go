package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock/internal/keytable"
	"github.com/pglockkit/kit/pglock/internal/lockconn"
)

// lockConn is one of a multiplexing Locker's own connections (see package
// lockconn), and connOp one request to it.
type (
	lockConn = lockconn.Conn
	connOp   = lockconn.Op
)

// errConnGone and errConnectCut are the lock connections' errors (see
// lockconn.ErrGone and lockconn.ErrConnectCut).
var (
	errConnGone   = lockconn.ErrGone
	errConnectCut = lockconn.ErrConnectCut
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
//
// Its methods are in files by concern. A hold (backend_mux.go) calls into
// taking, waiting and giving back; taking and waiting call each other (a
// busy try goes on to wait, a wait without a waiting connection polls with
// tries); all of them use routing and connecting, package lockconn (the
// lock and waiting connections and their sets: the connection for a key,
// a waiting connection and its place, given back or replaced, all closed,
// counted; m owns them: see lockconn.Owner) and the key table (package
// keytable), which call nothing of theirs but the owner's methods:
//
//	mux.go          the type, Close, Stats; the owner of the lock connections
//	mux_connect.go  readiness, connecting, the server's lock table (guard)
//	mux_route.go    a key's numbers for lockconn.Group.Pick (slot, hints); the lock cap
//	mux_take.go     a key taken without waiting (and shared holders' probe)
//	mux_wait.go     a wait in the server's queue on a waiting connection
//	mux_give.go     a key given back, handed to the next goroutine or relayed
//	backend_mux.go  one hold (the backend a Lock sees)
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

	// lc is what the lock connections share: their configuration, their
	// sessions (which Close waits for) and the count of their statements.
	lc *lockconn.Group

	initMu  sync.Mutex
	inited  atomic.Bool
	initRun *initRun // the run of initOnce under way; guarded by initMu
	connCfg *pgx.ConnConfig
	perHold source // a database/sql driver other than pgx's: one connection per hold
	// refused is the error of a connect that found a transaction pooler, or
	// of a self-test that found locks that do not exclude: every later
	// connect fails with it at once.
	refused atomic.Pointer[error]
	// closeDone: Close has returned, every session of the Locker is closed
	// (see stats).
	closeDone atomic.Bool

	// mu guards held, limit, capacity and closed. The sets of connections
	// (lock connections by slot, waiting connections) are lc's, under its
	// own mutex, which is taken after mu, never before (see lockconn.Group):
	// close shuts them under mu, so that whoever sees closed finds them
	// shut.
	mu       sync.Mutex
	held     int // server locks held or being taken
	limit    int // the cap on held; 0 until known
	capacity int // the server's lock table, as configured (0 if unknown)
	closed   bool
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
	m := &mux{
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
	}
	m.lc = lockconn.NewGroup(m, lockconn.Config{
		LockConns:      m.conns,
		WaitConns:      m.waitConns,
		LostCheck:      m.lostCheck,
		ReleaseTimeout: m.releaseTimeout,
		StatementBound: m.statementBound(),
		AbandonBound:   m.abandonBound(),
		Closing:        closing,
		Closed:         ErrLockerClosed,
		Unavailable:    ErrUnavailable,
		TooManyLocks:   ErrTooManyLocks,
		Join:           join,
		Statements:     lockConnStatements,
	})
	return m
}

// lockConnStatements are the lock connections' statements (see
// lockconn.Config.Statements), by [mode][pair].
var lockConnStatements = func() (s [2][2]lockconn.Statements) {
	for mode := range 2 {
		for pair := range 2 {
			st := &fixed[Session][mode][pair]
			s[mode][pair] = lockconn.Statements{Try: st.try, Unlock: st.unlock}
		}
	}
	return s
}()

// Connect opens a lock connection (lock) or a waiting one (see
// mux.connect): m owns its lock connections (see lockconn.Owner).
func (m *mux) Connect(ctx context.Context, lock bool) (*pgx.Conn, error) {
	return m.connect(ctx, lock)
}

// Lost marks every key held on c as lost and tells its holders.
func (m *mux) Lost(c *lockConn, err error) {
	m.t.LoseConn(c, err)
}

// Refuse makes every later connect fail with err.
func (m *mux) Refuse(err error) {
	m.refused.Store(&err)
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

func (m *mux) isClosed() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.closed
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
	cs := m.lc.Shut()
	m.mu.Unlock()
	m.t.Close()
	// Side by side, with the connects under way (see
	// lockconn.Group.CloseAll), and with the readiness check under way,
	// whose self-test may have a pool connection of its own to end.
	var wg sync.WaitGroup
	wg.Go(func() { m.lc.CloseAll(cs, ErrLockerClosed) })
	wg.Go(m.waitInit)
	wg.Wait()
	m.closeDone.Store(true)
	return nil
}

// waitInit waits for a run of initOnce under way, which the Locker's Close
// cut short (its context ends with m.closing), at most twice
// lockconn.MaxSessionEnd, as Close's other waits.
func (m *mux) waitInit() {
	m.initMu.Lock()
	run := m.initRun
	m.initMu.Unlock()
	if run == nil {
		return
	}
	t := time.NewTimer(2 * lockconn.MaxSessionEnd)
	defer t.Stop()
	select {
	case <-run.done:
	case <-t.C:
	}
}

// stats counts what the multiplexer uses now. Once Close has returned it
// counts nothing but the budget: every session is closed, so the server holds
// none of the Locker's locks, although holders, waiting connections and
// Leaders that Close told of their end may not have given back theirs yet.
func (m *mux) stats() LockerStats {
	var s LockerStats
	if m.closeDone.Load() {
		m.mu.Lock()
		defer m.mu.Unlock()
		return LockerStats{MaxSessions: m.conns + m.waitConns, MaxLocks: m.limit}
	}
	s.HeldKeys, s.Queued = m.t.Counts()
	m.mu.Lock()
	defer m.mu.Unlock()
	n := m.lc.Counts()
	s.LockConns, s.LeaderConns, s.HoldingConns, s.WaitingConns, s.IdleConns = n.Lock, n.Leader, n.Holding, n.Waiting, n.Idle
	s.WaitConns = s.WaitingConns + s.HoldingConns + s.IdleConns + s.LeaderConns
	s.Sessions = s.LockConns + s.WaitConns
	s.MaxSessions = m.conns + m.waitConns + s.LeaderConns
	s.ServerLocks = m.held
	s.MaxLocks = m.limit
	return s
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
