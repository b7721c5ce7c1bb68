package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/pglock/internal/connwatch"
	"github.com/pglockkit/kit/pglock/internal/lockconn"
	"github.com/pglockkit/kit/pglock/internal/pooler"
)

// Lock is one advisory lock on one key, bound to the database it was made
// for. Make it with [NewLock] or [Locker.NewLock].
//
// A Lock is held at most once at a time: Acquire on a held Lock fails with
// [ErrAlreadyHeld] (PostgreSQL itself would stack a second hold on the same
// connection). Do and TryDo are re-entrant through their context instead: a
// Do of the key inside the function of another runs in its hold (see
// [Lock.Do]). After Release it may be acquired
// again. Acquire, TryAcquire, Release, HandleError, Do and TryDo are meant to
// be called by one goroutine at a time (they serialize if not); Held, Lost
// and Key may be called from any goroutine.
//
// A hold taken by Do or TryDo is theirs until their function returns: Release
// and HandleError called meanwhile (from the function or from another
// goroutine) change nothing and return [ErrInDo]. In Transaction scope on a
// pool or connection the transaction is the lock's: ending it by hand (Commit,
// Rollback, a COMMIT or ROLLBACK statement) ends the lock with it, and the
// next Release, or Do, reports it with [ErrTxEnded].
type Lock struct {
	key  Key
	name string  // what key was hashed from, with the namespace ("" for a Key)
	cfg  *config // shared by the Locks of a Locker made without options: never written
	src  source
	st   statements
	// domain is the database the Lock was made for, for re-entrant Do (see
	// domainOf); nil where nesting is not recognised.
	domain any
	log    *slog.Logger

	mu sync.Mutex // serializes hold changes
	b  backend    // the current hold's backend; nil when not held
	// tx is the current hold's own pgx transaction as handed out (Tx, Do);
	// nil without one. l.mu guards it.
	tx *givenTx
	// inDo: Do or TryDo owns the current hold, and ends it; Release and
	// HandleError refuse. Set and cleared under l.mu.
	inDo atomic.Bool
	// handled is the error given to HandleError while Do owns the hold: Do
	// then rolls back when its function returns, whatever it returns.
	handled atomic.Pointer[error]
	// stopWatch ends the current hold's connection watch.
	stopWatch func()

	held   atomic.Bool
	lostMu sync.Mutex
	// lostCh is closed when the current (or last) hold is lost; nil until
	// Lost asks for it or the hold is lost (then closedCh).
	lostCh   chan struct{}
	lostErr  error
	lostDone bool
	// lostGiven: Lost handed out the current channel, so the next hold needs
	// a channel of its own.
	lostGiven bool
	onLost    context.CancelCauseFunc // cancels the context of Do's fn
	hold      uint64                  // counts the holds, for their watches
	since     time.Time               // when the current (or last) hold began
	tokenV    atomic.Int64            // the current hold's fencing token (WithToken)
	// guard counts the current hold against the server's lock table (see
	// callerGuard); nil for a multiplexed hold. l.mu guards it.
	guard *callerGuard

	// lockerClosed is the Locker's closed flag, for Locks made by a Locker.
	lockerClosed *atomic.Bool
	// muxb is the backend of the current hold on a multiplexing Locker.
	muxb muxBackend
	// watch watches the connection of the current hold on a pool
	// connection of its own (pgxBackend.watch), taken from a pool of them
	// and given back by dropHold; peer is the same for a hold in the
	// lock's own transaction.
	watch *connwatch.Rewatch
	peer  *connwatch.PeerWatch
}

// NewLock returns a Lock on key for conn, which is one of *pgxpool.Pool,
// *pgxpool.Conn, *pgx.Conn, pgx.Tx, *sql.DB, *sql.Conn or *sql.Tx. The key
// is anything [KeyOf] takes, or a [Key].
//
// On a pool (*pgxpool.Pool, *sql.DB) each hold of a Lock made by NewLock takes
// one connection from the pool and keeps it until the hold ends; the Locks of
// a [Locker] on a pool share a few lock connections instead (see
// [NewLocker]). On a connection the lock runs on
// that connection, which the caller must not use concurrently with the Lock's
// methods (inside Do's function, it may). On a transaction the scope is
// Transaction and the lock joins that transaction.
//
// NewLock does not talk to the database. An unsupported conn, an unsupported key
// or an invalid option is an error; so is a nil conn, or a zero one that its
// package did not make (&pgxpool.Pool{}, &sql.DB{}...), or a released
// *pgxpool.Conn ([ErrUnsupportedConn], naming the type).
func NewLock(conn any, key any, opts ...Option) (*Lock, error) {
	// One allocation for the Lock, its configuration and its source.
	o := &ownLock{cfg: defaultConfig()}
	cfg := &o.cfg
	if err := cfg.apply(opts); err != nil {
		return nil, err
	}
	if err := cfg.lockOnly(); err != nil {
		return nil, err
	}
	src, err := newSource(conn, cfg, &o.pgx)
	if err != nil {
		return nil, err
	}
	cfg.errs = nil
	if err := o.init(src, key, cfg); err != nil {
		return nil, err
	}
	o.domain = domainOf(conn)
	return &o.Lock, nil
}

// ownLock is a Lock made by NewLock, with the configuration and the source that
// it alone uses.
type ownLock struct {
	Lock
	cfg config
	pgx pgxSource
}

// newLock makes a Lock with cfg, which it keeps and never writes: the Locks
// of a Locker made without options share the Locker's.
func newLock(src source, key any, cfg *config) (*Lock, error) {
	l := new(Lock)
	if err := l.init(src, key, cfg); err != nil {
		return nil, err
	}
	return l, nil
}

// init makes l a Lock on key with cfg (see newLock).
func (l *Lock) init(src source, key any, cfg *config) error {
	k, name, err := cfg.keyName(key)
	if err != nil {
		return err
	}
	l.key, l.name, l.cfg, l.src = k, name, cfg, src
	l.st.set(k, l.cfg.scope, l.cfg.mode)
	if cfg.logger != nil {
		l.log = cfg.logger.With(
			slog.String("key", k.String()),
			slog.String("scope", l.cfg.scope.String()),
			slog.String("mode", l.cfg.mode.String()),
		)
	}
	return nil
}

// reset makes l, a Lock of Locker.Do or TryDo whose call has returned,
// ready to be made again for another key (see Locker.putLock): every field
// of its last hold back to zero, its hold number kept. It reports false,
// and changes nothing, when l still holds something.
func (l *Lock) reset() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b != nil || l.inDo.Load() || l.tx != nil || l.stopWatch != nil || l.watch != nil || l.peer != nil || l.guard != nil {
		return false
	}
	l.lostMu.Lock()
	l.lostCh, l.lostErr, l.lostDone, l.lostGiven, l.onLost = nil, nil, false, false, nil
	l.since = time.Time{}
	l.lostMu.Unlock()
	l.held.Store(false)
	l.tokenV.Store(0)
	l.handled.Store(nil)
	l.muxb = muxBackend{}
	l.key, l.name, l.log = Key{}, "", nil
	return true
}

// unmade returns the error of a Lock that NewLock or Locker.NewLock did not make
// (nil or zero), else nil.
func (l *Lock) unmade() error {
	switch {
	case l == nil:
		return errNilLock
	case l.src == nil:
		return errZeroLock
	}
	return nil
}

// Key returns the lock's key (after the namespace, if any, was applied); the
// zero Key for a nil Lock.
func (l *Lock) Key() Key {
	if l == nil {
		return Key{}
	}
	return l.key
}

// Name returns the name the lock's key was hashed from, namespace included
// (the decimal text of an integer key), or "" when the key was given as a
// [Key]. Names can carry user data (customer ids): think before logging or
// exporting them.
func (l *Lock) Name() string {
	if l == nil {
		return ""
	}
	return l.name
}

// Held reports whether the lock is held now: acquired, not yet released, and
// not known to be lost. A nil Lock is not held.
func (l *Lock) Held() bool { return l != nil && l.held.Load() }

// Lost returns a channel that is closed when the current hold is lost: its
// connection died or the server ended its session. Each hold has its own
// channel; before the first hold and after a release without loss it is
// simply never closed. Call Lost after Acquire to watch that hold.
//
// Session locks on a pool (*pgxpool.Pool, *sql.DB) are watched, since their
// connection belongs to the lock (a Locker's lock connection is watched once
// for all the locks on it, with the Locker's check interval): a server-side
// close is seen at once (the watch starts 50 ms into the hold: most holds end
// sooner and never pay for it), a silent connection within twice the
// lost-check interval (see [WithLostCheckInterval]). A Transaction-scope
// hold on a pool is watched too, on Linux, from the kernel's side (the
// socket's TCP state, without touching the connection the work uses): a
// session the server ended is seen at once. On a caller's connection or
// transaction the loss is seen at release; in Transaction scope the work
// commits together with the lock, so a lost connection cannot commit work
// done without the lock.
//
// A nil or zero Lock is never held: its channel is nil, never closed.
func (l *Lock) Lost() <-chan struct{} {
	if l == nil {
		return nil
	}
	if l.src == nil {
		return nil // a zero Lock
	}
	l.lostMu.Lock()
	defer l.lostMu.Unlock()
	l.lostGiven = true
	if l.lostCh == nil {
		l.lostCh = make(chan struct{}) // made when asked for: most holds never are
	}
	return l.lostCh
}

// Tx returns the pgx transaction the lock runs in while it is held in
// Transaction scope on a pgx connection or pool, else nil. Work done in it
// commits or rolls back together with the lock. Committing or rolling it back
// by hand ends the lock too; Release then reports it ([ErrTxEnded]).
func (l *Lock) Tx() pgx.Tx {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b == nil {
		return nil
	}
	if l.tx != nil {
		return l.tx
	}
	return l.b.pgxTx()
}

// SQLTx is Tx for database/sql: the *sql.Tx the lock runs in while held in
// Transaction scope on a *sql.DB, *sql.Conn or *sql.Tx, else nil.
func (l *Lock) SQLTx() *sql.Tx {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b == nil {
		return nil
	}
	return l.b.sqlTx()
}

// Acquire blocks until the lock is held or ctx ends (or the wait timeout of
// [WithWait] passes). It returns nil when the lock is held.
//
// When ctx ends first, Acquire returns promptly an error that matches both
// [ErrNotAcquired] and ctx's error, and the lock is certainly not held
// afterwards, even when the server granted it as the wait was being
// cancelled. (When ctx's deadline passes before a connection to the server
// could be opened, the error matches ErrNotAcquired and [ErrUnavailable]
// instead of the deadline: the key was not found busy. So is a connect that
// the pool's own ConnectTimeout cut while ctx was alive, on every path: it
// does not match context.DeadlineExceeded.) The wait is cancelled on the server with a cancel request, so
// the connection stays usable (on database/sql, waits poll instead; see the
// package documentation). A database error also matches ErrNotAcquired.
//
// Acquire on a Lock that is held returns [ErrAlreadyHeld]; a hold that was
// lost (see [Lock.Lost]) does not count: it is let go first. On a nil or zero
// Lock (one that NewLock or Locker.NewLock did not make) it returns an error
// matching ErrNotAcquired and [ErrUnsupportedConn]; so do TryAcquire, Do and
// TryDo.
func (l *Lock) Acquire(ctx context.Context) error {
	if err := l.unmade(); err != nil {
		return fmt.Errorf("%w: %w", ErrNotAcquired, err)
	}
	ctx, end := l.trace(ctx, "acquire")
	_, err := l.acquire(ctx, true, false)
	if end != nil {
		end(err == nil, err)
	}
	return err
}

// TryAcquire takes the lock if it is free and never waits for it: it
// returns (true, nil) when the lock is now held and (false, nil) when another
// session holds it. An error means the lock is not held.
func (l *Lock) TryAcquire(ctx context.Context) (bool, error) {
	return l.acquire(ctx, false, false)
}

// acquire is Acquire (wait) or TryAcquire; for Do and TryDo (do), the hold
// it takes is theirs (see Lock.inDo).
func (l *Lock) acquire(ctx context.Context, wait, do bool) (bool, error) {
	if err := l.unmade(); err != nil {
		return false, fmt.Errorf("%w: %w", ErrNotAcquired, err)
	}
	if ctx == nil {
		return false, fmt.Errorf("%w: key %s: nil context", ErrNotAcquired, l.key)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.inDo.Load() {
		// Even a lost hold stays Do's until its function returns.
		return false, fmt.Errorf("%w: key %s: %w", ErrAlreadyHeld, l.key, ErrInDo)
	}
	if l.b != nil {
		if !l.isLost() {
			return false, fmt.Errorf("%w: key %s", ErrAlreadyHeld, l.key)
		}
		// The last hold was lost (and said so on Lost): let it go, and say
		// that it ended, as a Release would have.
		held := time.Since(l.since)
		l.dropHold().discard()
		l.lostMu.Lock()
		lostErr := l.lostErr
		l.lostMu.Unlock()
		l.emit(EventReleaseFailed, held, fmt.Errorf("pglock: release key %s: %w", l.key, join(ErrLockLost, lostErr)))
	}
	if err := ctx.Err(); err != nil {
		return false, l.notAcquired(ctx, nil)
	}
	if l.lockerClosed != nil && l.lockerClosed.Load() {
		return false, l.notAcquired(ctx, ErrLockerClosed)
	}
	start := time.Now()
	if wait && l.cfg.waitTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, l.cfg.waitTimeout)
		defer cancel()
	}
	// A wait inside a hold is checked for cycles of such waits (see
	// deadlock.go); it runs in wctx, which a cycle ends.
	wctx, rec := ctx, (*cycleRec)(nil)
	if wait {
		wctx, rec = l.watchCycles(ctx)
	}
	b, ok, err := l.open(wctx, wait)
	cycleErr := rec.stop()
	waited := time.Since(start)
	switch {
	case cycleErr != nil && (err != nil || !ok):
		err = fmt.Errorf("%w: key %s: %w", ErrNotAcquired, l.key, cycleErr)
		l.emit(EventNotAcquired, waited, err)
		return false, err
	case err != nil || (wait && !ok):
		err = l.notAcquired(ctx, err)
		l.emit(EventNotAcquired, waited, err)
		return false, err
	case !ok:
		l.emit(EventBusy, waited, nil)
		return false, nil
	}
	l.b = b
	if l.guard = b.guarded(); l.guard != nil {
		l.guard.held.Add(1)
	}
	if tx := b.pgxTx(); tx != nil && !l.src.callerTx() {
		l.tx = &givenTx{Tx: tx}
	}
	l.inDo.Store(do)
	l.handled.Store(nil)
	l.lostMu.Lock()
	if l.lostDone || l.lostGiven {
		// This hold's channel is made when Lost asks for it.
		l.lostCh, l.lostErr, l.lostDone, l.lostGiven = nil, nil, false, false
	}
	l.hold++
	hold := l.hold
	l.since = time.Now()
	l.lostMu.Unlock()
	l.held.Store(true)
	// The watch reports the loss of this hold only: a report that comes late,
	// after the hold ended, must not mark a later one lost.
	l.stopWatch = b.watch(l.cfg.lostCheck, func(err error) { l.markLostOf(hold, err) })
	l.emit(EventAcquired, waited, nil)
	return true, nil
}

// open opens a backend on the source and takes the lock on it. A pool's
// connection that turns out to have been dead before the lock's first
// statement reached it (see retryable) is destroyed and replaced: after a
// server restart, each idle pool connection would otherwise fail one
// acquire.
func (l *Lock) open(ctx context.Context, wait bool) (backend, bool, error) {
	r, _ := l.src.(retrier)
	budget := -1 // unknown until the first retryable failure
	for {
		b, err := l.src.open(ctx, l)
		if err != nil {
			return nil, false, connectErr(ctx, err)
		}
		ok, err := b.acquire(ctx, wait)
		if err == nil && ok && l.cfg.token && l.cfg.mode == Exclusive {
			token, terr := b.token(ctx)
			if terr != nil {
				_ = b.release(ctx, false) // a grant without its token is let go
				return b, false, terr
			}
			l.tokenV.Store(token)
		}
		if err == nil || r == nil || !retryable(err) || ctx.Err() != nil {
			return b, ok, err
		}
		if budget < 0 {
			budget = r.retries()
		}
		if budget == 0 {
			return b, ok, err
		}
		budget--
		if l.log != nil {
			l.log.Debug("pglock: connection was dead before the lock's statement; retrying on a new one", slog.Any("error", err))
		}
	}
}

// notAcquired builds Acquire's error: ErrNotAcquired, the context's error
// when it ended, and the database's error when there was one.
func (l *Lock) notAcquired(ctx context.Context, err error) error {
	// A dial or read cut by the deadline can fail before ctx's own timer
	// fires: a passed deadline counts as ended.
	ctxErr := lockconn.ContextEnded(ctx)
	switch {
	case err == nil && ctxErr == nil:
		return fmt.Errorf("%w: key %s", ErrNotAcquired, l.key)
	case pooler.StatementPooler(err):
		// A configuration that cannot work, not a server that is down:
		// retrying does not help.
		return fmt.Errorf("%w: key %s: %w: statement pooling allows no transaction block, which Transaction scope needs"+
			" (and Session scope needs a session of its own): use session or transaction pooling, or a direct connection: %w",
			ErrNotAcquired, l.key, ErrTransactionPooler, err)
	case isDeadlock(err) && !errors.Is(err, ErrDeadlock):
		// PostgreSQL ended this wait to break a cycle of waits.
		return fmt.Errorf("%w: key %s: %w: %w", ErrNotAcquired, l.key, ErrDeadlock, err)
	case lockconn.OutOfSharedMemory(err) && !errors.Is(err, ErrTooManyLocks):
		return fmt.Errorf("%w: key %s: %w", ErrNotAcquired, l.key, lockconn.LockFailed(ErrTooManyLocks, err))
	case errors.Is(err, ErrUnavailable):
		// The server could not be reached (in time): not a busy key, even
		// when the context ended meanwhile.
		return fmt.Errorf("%w: key %s: %w", ErrNotAcquired, l.key, err)
	case err == nil:
		return fmt.Errorf("%w: key %s: %w", ErrNotAcquired, l.key, ctxErr)
	case ctxErr == nil && unavailable(err):
		return fmt.Errorf("%w: key %s: %w: %w", ErrNotAcquired, l.key, ErrUnavailable, err)
	case ctxErr == nil || errors.Is(err, ctxErr):
		return fmt.Errorf("%w: key %s: %w", ErrNotAcquired, l.key, err)
	default:
		return fmt.Errorf("%w: key %s: %w: %w", ErrNotAcquired, l.key, ctxErr, err)
	}
}

// dropHold stops watching the current hold and forgets it; the caller ends
// it. l.mu must be held.
func (l *Lock) dropHold() backend {
	if l.stopWatch != nil {
		l.stopWatch()
		l.stopWatch = nil
	}
	if l.watch != nil {
		connwatch.PutRewatch(l.watch)
		l.watch = nil
	}
	if l.peer != nil {
		connwatch.PutPeerWatch(l.peer)
		l.peer = nil
	}
	b := l.b
	l.b, l.tx = nil, nil
	if l.guard != nil {
		l.guard.held.Add(-1)
		l.guard = nil
	}
	l.held.Store(false)
	l.tokenV.Store(0)
	l.lostMu.Lock()
	l.hold++ // a late report of this hold's loss is ignored
	l.lostMu.Unlock()
	return b
}

// closedCh is the Lost channel of a hold lost before Lost was called.
var closedCh = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()

func (l *Lock) isLost() bool {
	l.lostMu.Lock()
	defer l.lostMu.Unlock()
	return l.lostDone
}

// markLost is called when the connection of the current hold died.
func (l *Lock) markLost(err error) {
	l.lostMu.Lock()
	defer l.lostMu.Unlock()
	l.markLostLocked(err)
}

// markLostOf is markLost for hold number hold, from its watch: a report for
// an earlier hold is ignored.
func (l *Lock) markLostOf(hold uint64, err error) {
	l.lostMu.Lock()
	defer l.lostMu.Unlock()
	if hold == l.hold {
		l.markLostLocked(err)
	}
}

// markLostLocked marks the current hold lost, once. l.lostMu must be held.
func (l *Lock) markLostLocked(err error) {
	if l.lostDone {
		return
	}
	l.held.Store(false)
	l.lostErr, l.lostDone = err, true
	if l.lostCh == nil {
		l.lostCh = closedCh // Lost did not hand one out yet
	} else {
		close(l.lostCh)
	}
	if l.onLost != nil {
		l.onLost(ErrLockLost)
	}
	l.emit(EventLost, time.Since(l.since), err)
}

// Release ends the hold. It is safe to call whether or not the lock is held,
// and more than once: when nothing is held it returns nil.
//
// In Session scope it unlocks the key and gives a pooled connection back to
// its pool; a connection whose unlock failed or whose outcome is unknown is
// destroyed, never returned to the pool holding the lock. In Transaction
// scope on a pool or connection it commits the lock's transaction (use
// HandleError, or Do, to roll back); on a caller's transaction it only forgets
// the hold: the transaction goes on, and the lock with it until it ends.
//
// When the hold was lost (the connection died), Release cleans up and returns
// an error matching [ErrLockLost]. The statements run even when ctx has ended,
// bounded by [WithReleaseTimeout].
//
// When the lock's own transaction was already committed or rolled back by its
// user (Commit or Rollback on [Lock.Tx], or a COMMIT or ROLLBACK statement),
// the lock ended with it: Release commits nothing, gives the connection back
// and returns an error matching [ErrTxEnded], which says what is known of the
// work.
//
// While Do or TryDo runs on the Lock, the hold is theirs: Release, from their
// function or from another goroutine, changes nothing and returns an error
// matching [ErrInDo] (Do ends the hold when the function returns).
//
// On a nil or zero Lock (one that NewLock or Locker.NewLock did not make) Release
// changes nothing and returns an error matching [ErrUnsupportedConn]: after
// `l, err := locker.NewLock(key)` failed, a deferred l.Release does not panic.
func (l *Lock) Release(ctx context.Context) error {
	if err := l.unmade(); err != nil {
		return fmt.Errorf("pglock: release: %w", err)
	}
	return l.end(ctx, true, false)
}

// HandleError is the Python package's handle_error: when err is not nil and
// RollbackOnError is on (the default), it rolls back the lock's transaction,
// which in Transaction scope releases the lock (on a caller's transaction it
// rolls back the caller's transaction). It returns err, joined with any
// rollback error. With err nil, RollbackOnError off, or in Session scope it
// changes nothing and returns err.
//
// While Do or TryDo runs on the Lock (HandleError called from their function
// or from another goroutine), the hold is theirs: HandleError returns err
// joined with an error matching [ErrInDo], and where it would roll back it
// marks the transaction instead, which Do rolls back when the function
// returns, even if it returns nil (Do then returns err). Returning err from
// the function does the same.
//
// On a nil or zero Lock it returns err joined with an error matching
// [ErrUnsupportedConn].
func (l *Lock) HandleError(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if uerr := l.unmade(); uerr != nil {
		return join(err, fmt.Errorf("pglock: HandleError: %w", uerr))
	}
	rollback := l.cfg.rollbackOnError && l.cfg.scope == Transaction
	if l.inDo.Load() {
		// Do ends the hold: it rolls back when its function returns.
		if rollback {
			l.handled.CompareAndSwap(nil, &err)
			return join(err, fmt.Errorf("pglock: HandleError on key %s: Do rolls back when its function returns: %w", l.key, ErrInDo))
		}
		return join(err, fmt.Errorf("pglock: HandleError on key %s: %w", l.key, ErrInDo))
	}
	if !rollback {
		return err
	}
	if rerr := l.end(ctx, false, false); rerr != nil {
		return join(err, rerr)
	}
	return err
}

// end ends the hold: commit (Release) or roll back (HandleError, a failed Do).
// A hold that Do owns is ended by Do only (do); others are refused.
func (l *Lock) end(ctx context.Context, commit, do bool) error {
	if ctx == nil {
		ctx = context.Background()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if do {
		l.inDo.Store(false)
	} else if l.inDo.Load() {
		if commit {
			return fmt.Errorf("pglock: release key %s: %w", l.key, ErrInDo)
		}
		return fmt.Errorf("pglock: HandleError on key %s: %w", l.key, ErrInDo)
	}
	if l.b == nil {
		return nil
	}
	given := l.tx
	held := time.Since(l.since)
	b := l.dropHold()
	l.lostMu.Lock()
	lost, lostErr := l.lostDone, l.lostErr
	l.lostMu.Unlock()
	var err error
	if lost {
		// The watcher saw the connection die: nothing more is sent on it.
		b.discard()
		err = join(ErrLockLost, lostErr)
	} else if err = b.release(ctx, commit); errors.Is(err, ErrLockLost) {
		l.markLost(err)
	}
	if given != nil && errors.Is(err, ErrTxEnded) {
		// The user ended it with Commit or Rollback: that says more.
		if e := given.endedErr(); e != nil {
			err = e
		}
	}
	if err != nil {
		err = fmt.Errorf("pglock: release key %s: %w", l.key, err)
		l.emit(EventReleaseFailed, held, err)
		return err
	}
	l.emit(EventReleased, held, nil)
	return nil
}
