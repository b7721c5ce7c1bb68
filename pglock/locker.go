package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Locker makes Locks on one database with shared defaults (scope, mode,
// logger, namespace, wait and check settings). It is what adapters take.
// A Locker is safe for concurrent use, and so is a Lock it makes, in the
// sense that Locks of one Locker on one key exclude each other; a single Lock
// is meant for one goroutine at a time.
//
// On a pool (*pgxpool.Pool, or *sql.DB with pgx's database/sql driver) the
// Locker multiplexes: it holds the session locks of all its Locks on a few
// connections of its own ("lock connections", see [WithLockConns]) opened
// with the pool's settings, not on one pool connection per hold; a held lock
// costs no pool connection. Close the Locker when done with it. Transaction
// scope is not multiplexed: its transaction is the work's connection, taken
// from the pool for the hold. See the package documentation, "Lock
// connections". The lock connections are the Locker's, not the pool's:
// closing the pool does not close them; close the Locker first.
//
// On one connection or transaction the Locker is safe for concurrent use
// too: its holds take turns on the connection, each from the start of its
// acquire to its release (the protected work may use the connection), and
// other acquires wait for it, until their contexts end. It holds one lock at
// a time: an acquire made while holding waits too (to nest locks on one
// connection, use NewLock, where PostgreSQL stacks them; or a pool).
type Locker struct {
	conn   any
	cfg    config
	src    source // what the Locker runs on, as newSource made it
	pooled bool
	mux    *mux    // session locks on a pool, multiplexed
	serial *serial // a Locker on one connection or transaction
	closed atomic.Bool
	// closeOnce runs Close's work once; a Close called meanwhile waits for
	// it, so that every Close returns with the sessions ended.
	closeOnce sync.Once
	// probe runs and caches CheckHealth's checks.
	probe healthProbe
	// setGate lets one key set at a time take its keys on a Locker that
	// does not multiplex (see acquireSet).
	setGate chan struct{}
	// background runs the Locker's own clean-ups that a caller need not
	// wait for (a Semaphore's waits ended, its queue's place given back);
	// Close waits for them.
	background tasks
	// locks keeps the Locks of Do and TryDo on the lock connections for
	// their next calls (see putLock).
	locks sync.Pool
}

// tasks runs functions in goroutines that an owner's close waits for.
type tasks struct {
	mu     sync.Mutex
	wg     sync.WaitGroup
	closed bool
}

// Go runs fn in a goroutine, or at once once the owner is closing.
func (t *tasks) Go(fn func()) {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		fn()
		return
	}
	t.wg.Add(1)
	t.mu.Unlock()
	go func() {
		defer t.wg.Done()
		fn()
	}()
}

// close waits for the functions under way; later ones run at once.
func (t *tasks) close() {
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()
	t.wg.Wait()
}

// NewLocker returns a Locker for conn, which is one of the types [NewLock]
// takes; usually a *pgxpool.Pool or *sql.DB. opts are the defaults of every
// Lock it makes, and the Locker's own settings ([WithLockConns],
// [WithWaitConns], [WithMaxLocks], [WithMultiplexing]). An unsupported conn or
// an invalid option is an error. NewLocker does not talk to the database:
// lock connections are opened on first use.
func NewLocker(conn any, opts ...Option) (*Locker, error) {
	cfg := defaultConfig()
	if err := cfg.apply(opts); err != nil {
		return nil, err
	}
	// newSource settles the scope (Transaction on a caller's transaction).
	src, err := newSource(conn, &cfg, nil)
	if err != nil {
		return nil, err
	}
	lk := &Locker{conn: conn, cfg: cfg, src: src, pooled: src.owned(), setGate: make(chan struct{}, 1)}
	switch _, mem := src.(*memSource); {
	case mem:
		// The in-memory double (pglocktest): each hold is a request in its
		// table; there are no connections to multiplex.
	case src.owned() && cfg.multiplex:
		pool, _ := conn.(*pgxpool.Pool)
		db, _ := conn.(*sql.DB)
		lk.mux = newMux(pool, db, &cfg)
	case !src.owned():
		lk.serial = newSerial()
	}
	lk.cfg.lockerOpts = nil
	return lk, nil
}

// NewLock returns a new Lock on key with the Locker's options, then opts.
// Options that configure the Locker itself (WithLockConns...) are an error
// here.
func (lk *Locker) NewLock(key any, opts ...Option) (*Lock, error) {
	if err := lk.unmade(); err != nil {
		return nil, err
	}
	if lk.closed.Load() {
		return nil, ErrLockerClosed
	}
	// Without options the Lock shares the Locker's configuration (settled
	// by NewLocker); with them it has a copy of its own.
	cfg := &lk.cfg
	if len(opts) > 0 {
		c := lk.cfg
		c.errs = nil
		if err := c.apply(opts); err != nil {
			return nil, err
		}
		if err := c.lockOnly(); err != nil {
			return nil, err
		}
		if err := settleScope(lk.src, &c); err != nil {
			return nil, err
		}
		cfg = &c
	}
	src := lk.src
	switch {
	case lk.mux != nil && cfg.scope == Session:
		src = lk.mux
	case lk.serial != nil:
		src = &serialSource{s: lk.serial, inner: src}
	}
	l, err := newLock(src, key, cfg)
	if err != nil {
		return nil, err
	}
	l.lockerClosed = &lk.closed
	l.domain = domainOf(lk.conn)
	return l, nil
}

// Do runs fn while holding the lock on key, as [Lock.Do] does. After
// [Locker.Close] it fails with an error matching [ErrNotAcquired] and
// [ErrLockerClosed].
func (lk *Locker) Do(ctx context.Context, key any, fn func(ctx context.Context) error) error {
	l, err := lk.lockFor(key)
	if err != nil {
		return err
	}
	err = l.Do(ctx, fn)
	lk.putLock(l)
	return err
}

// TryDo runs fn only if the lock on key is free now, as [Lock.TryDo] does.
func (lk *Locker) TryDo(ctx context.Context, key any, fn func(ctx context.Context) error) (bool, error) {
	l, err := lk.lockFor(key)
	if err != nil {
		return false, err
	}
	ok, err := l.TryDo(ctx, fn)
	lk.putLock(l)
	return ok, err
}

// lockFor is Lock for Do and TryDo: a closed Locker's error says the lock
// was not acquired, as Acquire's does.
//
// On a multiplexing Locker, in Session scope, it takes a Lock that an
// earlier Do or TryDo gave back (see putLock) when there is one: a Lock of a
// call is most of what the call allocates (600 bytes), and with many calls
// a second, the garbage collector's work is what lengthens the slowest
// waits across processes (BenchmarkTwoProcesses' p99).
func (lk *Locker) lockFor(key any) (*Lock, error) {
	if lk.mux != nil && !lk.closed.Load() {
		if l, _ := lk.locks.Get().(*Lock); l != nil {
			if err := l.init(lk.mux, key, &lk.cfg); err != nil {
				lk.locks.Put(l)
				return nil, err
			}
			return l, nil
		}
	}
	l, err := lk.NewLock(key)
	if errors.Is(err, ErrLockerClosed) {
		return nil, fmt.Errorf("%w: %w", ErrNotAcquired, err)
	}
	return l, err
}

// putLock keeps l, the Lock of a Do or TryDo that has returned, for another
// call (see lockFor), if it is a Lock on the lock connections that holds
// nothing. Nothing of the library keeps it past its call but the contexts
// of its holds (see holdCtx), which read only its hold number, and the
// reports of its holds' losses, which check that number first: a Lock's hold
// number grows from hold to hold, also across calls, so neither takes a
// later hold, of any key, for the one it was made for.
func (lk *Locker) putLock(l *Lock) {
	if lk.mux == nil || l.src != source(lk.mux) || l.cfg != &lk.cfg || !l.reset() {
		return
	}
	lk.locks.Put(l)
}

// unmade returns the error of a Locker that NewLocker did not make (nil or
// zero), else nil.
func (lk *Locker) unmade() error {
	switch {
	case lk == nil:
		return errNilLocker
	case lk.src == nil:
		return errZeroLocker
	}
	return nil
}

// Key returns the Key that key maps to under the Locker's namespace: the key
// its Locks take, for looking it up in pg_locks. On a nil or zero Locker it
// is an error matching [ErrUnsupportedConn].
func (lk *Locker) Key(key any) (Key, error) {
	if err := lk.unmade(); err != nil {
		return Key{}, err
	}
	return lk.cfg.keyOf(key)
}

// Scope returns the scope of the Locks it makes by default (Session for a
// nil Locker).
func (lk *Locker) Scope() Scope {
	if lk == nil {
		return Session
	}
	return lk.cfg.scope
}

// Mode returns the mode of the Locks it makes by default (Exclusive for a
// nil Locker).
func (lk *Locker) Mode() Mode {
	if lk == nil {
		return Exclusive
	}
	return lk.cfg.mode
}

// Pooled reports whether the Locker is on a pool (*pgxpool.Pool, *sql.DB):
// then Locks used concurrently exclude each other and do not wait for one
// another's statements, and a hold does not take a pool connection (unless
// multiplexing is off). On one connection (or transaction) the Locker is safe
// for concurrent use but serializes on that connection: adapters that lock
// concurrent requests or jobs require a pooled Locker.
func (lk *Locker) Pooled() bool { return lk != nil && lk.pooled }

// Close closes the Locker's lock connections, which ends every session lock
// held on them (each such Lock reports [Lock.Lost]): when Close returns, the
// server has ended those sessions, so another process can take their keys
// at once. It ends them side by side, connects under way included, and
// waits for the server, which takes a round trip or two; on a slow or
// silent network it stops waiting after about two seconds (a connect still
// under way after one is cut off, and its end waited for one more; a
// connection whose watch is pinging takes up to [WithLostCheckInterval]
// and a second). Through a session pooler the locks are given back before
// the session is left to the pooler.
// It makes the Locker's methods, and the acquires of its Locks, fail with
// [ErrLockerClosed]. It does not close the pool or connection the Locker
// was made with; Locks in Transaction scope end as their transactions do.
// Close is safe to call more than once, and from several goroutines at
// once (each returns when the first call's work is done); it returns nil.
func (lk *Locker) Close() error {
	if lk == nil {
		return nil
	}
	lk.closeOnce.Do(lk.close)
	return nil
}

// close is Close's work, run once.
func (lk *Locker) close() {
	lk.closed.Store(true)
	lk.background.close()
	if lk.mux != nil {
		_ = lk.mux.close() // always nil
		return
	}
	if lk.serial != nil {
		close(lk.serial.closing)
	}
	if m, ok := lk.src.(*memSource); ok {
		m.close() // the in-memory double: its holds are lost, as a mux's are
	}
}

// LockerStats is what a Locker uses now (see [Locker.Stats]).
type LockerStats struct {
	// LockConns is the number of open lock connections (at most
	// [WithLockConns]); WaitConns the number of open waiting connections,
	// waiting, holding what they waited for, or idle: at most
	// [WithWaitConns], plus one per [Leader] campaigning or leading. Both
	// are 0 for a Locker that does not multiplex.
	LockConns, WaitConns int
	// The waiting connections by role: WaitingConns wait in the server's
	// queue (or are about to), HoldingConns hold what they waited for (a
	// hold keeps its connection until it is released), IdleConns are open
	// and unused, and LeaderConns are the Leaders' own (campaigning or
	// leading). They add up to WaitConns.
	WaitingConns, HoldingConns, IdleConns, LeaderConns int
	// Sessions is every server session the Locker has open now (LockConns
	// + WaitConns); MaxSessions is its budget, which Sessions never exceeds:
	// WithLockConns + WithWaitConns + LeaderConns. The Locker ends a
	// session of its own that has held nothing and been idle for half the
	// abandoned-session bound (see [AbandonedSessionTimeout]); one of those
	// that the server ended sooner (pg_terminate_backend) is counted until
	// then. Pool connections are not
	// counted: a multiplexing Locker takes none for a Session-scope hold
	// (Transaction scope holds run on the work's own pool connection).
	Sessions, MaxSessions int
	// ServerLocks is the number of session locks the Locker holds, or is
	// trying without waiting, in the server (a wait counts once granted);
	// MaxLocks the cap on it (0 until the first lock
	// connection has read the server's lock table size).
	ServerLocks, MaxLocks int
	// HeldKeys is the number of keys held by the Locker's Locks; Queued the
	// number of goroutines waiting in the process for a key that another of
	// its Locks holds or is taking.
	HeldKeys, Queued int
}

// Stats returns what the Locker uses now. Once [Locker.Close] has returned,
// it counts nothing but the budget (MaxSessions without Leaders, MaxLocks):
// every session is closed and the server holds none of the Locker's locks,
// even while holders and Leaders that Close told of their end have not
// released yet.
func (lk *Locker) Stats() LockerStats {
	switch {
	case lk == nil:
		return LockerStats{}
	case lk.mux != nil:
		return lk.mux.stats()
	case lk.serial != nil:
		return LockerStats{HeldKeys: int(lk.serial.holds.Load())}
	}
	if m, ok := lk.src.(*memSource); ok {
		return m.stats() // the in-memory double: HeldKeys and Queued only
	}
	return LockerStats{}
}

var errLockerOnly = errors.New("is an option of NewLocker, not of a Lock")
