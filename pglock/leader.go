package pglock

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Default backoffs of a [Leader] (see [LeaderConfig]).
const (
	DefaultLeaderMinBackoff = 500 * time.Millisecond
	DefaultLeaderMaxBackoff = 30 * time.Second
)

// The range of a Leader's backoffs (see LeaderConfig).
const (
	minLeaderBackoff = 10 * time.Millisecond
	maxLeaderBackoff = 24 * time.Hour
)

// LeaderConfig configures a [Leader]. The zero value is ready to use.
type LeaderConfig struct {
	// OnElected, if set, is called when this process becomes the leader,
	// with the context of the term (the one fn gets), before fn runs, in
	// Run's goroutine.
	OnElected func(ctx context.Context)
	// OnDeposed, if set, is called when a term ends, after the lock was let
	// go (so another process may already lead), in Run's goroutine, with why:
	// nil when fn returned nil, an error matching ErrLockLost when the lock
	// was lost, the context's error when Run's context ended, or fn's error.
	OnDeposed func(why error)
	// MinBackoff is the pause before campaigning again after a lost term, an
	// error of fn, or a failed campaign (the database down); it doubles, with
	// jitter, after each failure in a row, up to MaxBackoff, and starts over
	// after a term that lasted longer than MaxBackoff. Zero means
	// DefaultLeaderMinBackoff and DefaultLeaderMaxBackoff. Each is 0 or
	// 10 ms to 24 h (a shorter pause would hammer a database that is down),
	// and MaxBackoff is at least MinBackoff; other values are an error. The processes that
	// are not leading wait in the server's queue, not in a backoff: when a
	// leader's term ends, the next one is elected at once.
	MinBackoff, MaxBackoff time.Duration

	// Identity names this Leader to every replica: while it campaigns and
	// leads, its session carries the identity as its application_name,
	// which pg_stat_activity shows to every session, so [Leader.CurrentLeader]
	// on any replica, OnNewLeader, `pglock locks` and pg_stat_activity all
	// say who leads. Empty means the host name and process id
	// ("host-1:4242"). It is 1 to 63 bytes of printable ASCII (what
	// PostgreSQL keeps of an application_name as it is); other values are
	// an error. Give each replica its own: two replicas with one identity
	// cannot be told apart. On a Locker that does not multiplex
	// ([WithMultiplexing](false), or a *sql.DB whose driver is not pgx's)
	// the key lives on a connection of the pool: it is named when the
	// campaign takes it and gets the pool's application_name back before
	// it returns to the pool. On a Locker on one connection the caller's
	// session is left as it is.
	Identity string
	// OnNewLeader, if set, is called with the identity of each new leader
	// that this replica sees (itself included), read from the server
	// (see [Leader.CurrentLeader]): once when Run starts and finds a
	// leader, then whenever the identity changes. It is read every
	// ObserveInterval while Run runs, and at once when this Leader's own
	// term starts or ends; a change is seen within ObserveInterval plus a
	// round trip. Each read is one round trip on a connection of the
	// Locker's pool. It is called from a goroutine of Run's, one call at a
	// time (not in order with OnElected and OnDeposed), and never after Run
	// has returned; it should not block. Between two terms the key can be
	// free for a moment: that is not reported, and a new term of the same
	// identity is not a new leader. It needs a Locker on a pool (a
	// *pgxpool.Pool or *sql.DB) or of pglocktest's in-memory double; on a
	// Locker on one connection or transaction it is an error.
	OnNewLeader func(identity string)
	// ObserveInterval is how often OnNewLeader's reads happen. Zero means
	// DefaultLeaderObserveInterval (500 ms); otherwise 100 ms to 1 h. It
	// has no use without OnNewLeader.
	ObserveInterval time.Duration
}

// Leader is leader election on one key: of all the processes (or Leaders)
// that run it for the key, one at a time is the leader and runs the
// function given to [Leader.Run], for as long as it holds the key's lock.
// Make it with [Locker.Leader].
//
// A term starts when the Leader's lock is granted: the others wait for it in
// the server's queue (FIFO across processes). It ends when fn returns, when
// the lock is lost (its connection died: see [Lock.Lost]), or when Run's
// context ends; fn's context ends with it, with cause [ErrLockLost] for a
// loss. Then the lock is let go, and the next process in the queue is elected
// at once.
//
// At most one Leader believes it leads (see [Leader.IsLeader]) while the
// server holds its lock. After its connection dies, a Leader stops believing
// within the loss bound of [Lock.Lost] (at once when the server closed the
// connection; within twice the lost-check interval, 1 s by default, when the
// network went silent), and the server frees the lock, so that another
// process is elected: at once when the session was ended, within
// [AbandonedSessionTimeout] (6 s) for a multiplexing Locker whose client went
// silent. When the server ends the session itself (pg_terminate_backend, a
// restart), the new leader can be elected a moment before the old one has
// read that its connection is closed: work that must never overlap across
// terms should commit in the database with a check of its own, or use
// Transaction scope per unit of work. (Measured: a new leader elected 10 ms
// after pg_terminate_backend of the old one's session, which believed it led
// for 30 ms more, since a hold's connection is watched from 50 ms into it.)
//
// The lock is a Session-scope, exclusive lock of the Locker (a term can last
// for days; a transaction open that long would hold back vacuum). On a
// multiplexing Locker a Leader costs no pool connection: while it
// campaigns it waits in the server's queue on a waiting connection of its
// own, which does not count among [WithWaitConns] (so campaigns never starve
// other waits), and it leads on that connection, never on a lock connection
// shared with other keys. That session carries the Leader's identity as its
// application_name (see [LeaderConfig].Identity and [Leader.CurrentLeader]),
// set before it waits, in one round trip; it is closed when the campaign or
// the term ends (a campaign opens one, or takes an idle waiting
// connection). With one connection per hold ([WithMultiplexing](false), or
// a *sql.DB whose driver is not pgx's) a campaign takes a pool connection
// for as long as it waits and leads, and names it with the identity in one
// round trip (two with another driver than pgx's), then gives it back its
// application_name, in one more, before it returns to the pool (a
// connection whose name could not be given back is destroyed). A Locker on
// one connection holds one lock at a time, so its other locks wait for the
// whole term there.
type Leader struct {
	lk      *Locker
	l       *Lock
	cfg     LeaderConfig
	leading atomic.Bool
	running atomic.Bool
	terms   atomic.Int64
	// kick asks the observer (see observe) to read who leads now.
	kick chan struct{}
	// cur is the current term, set before leading is, and cleared after it
	// is (see CheckHealth); health caches CheckHealth's reads.
	cur    atomic.Pointer[leaderTerm]
	health healthProbe
}

// Leader returns a Leader for key on the Locker. key is anything [KeyOf]
// takes (the Locker's namespace applies). The Locker's logger, observer,
// lost-check interval and release timeout apply to its lock; its scope, mode
// and wait timeout do not (see [Leader]). A bad key, a backoff or
// ObserveInterval out of its range, a bad Identity, or OnNewLeader on a
// Locker on one connection or transaction (see [LeaderConfig]) is an error matching
// [ErrInvalidOption] ([ErrInvalidKey] for the key).
func (lk *Locker) Leader(key any, cfg LeaderConfig) (*Leader, error) {
	for _, b := range []struct {
		name     string
		d, deflt time.Duration
	}{{"MinBackoff", cfg.MinBackoff, DefaultLeaderMinBackoff}, {"MaxBackoff", cfg.MaxBackoff, DefaultLeaderMaxBackoff}} {
		if b.d != 0 && (b.d < minLeaderBackoff || b.d > maxLeaderBackoff) {
			return nil, fmt.Errorf("%w: leader %s %v is out of range: want 0 (the default, %v) or %v..%v",
				ErrInvalidOption, b.name, b.d, b.deflt, minLeaderBackoff, maxLeaderBackoff)
		}
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff = DefaultLeaderMinBackoff
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = max(DefaultLeaderMaxBackoff, cfg.MinBackoff)
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		return nil, fmt.Errorf("%w: leader MaxBackoff %v is below MinBackoff %v", ErrInvalidOption, cfg.MaxBackoff, cfg.MinBackoff)
	}
	if err := settleIdentity(lk, &cfg); err != nil {
		return nil, err
	}
	id := cfg.Identity
	l, err := lk.NewLock(key, WithScope(Session), WithMode(Exclusive), WithWait(0), func(c *config) { c.campaign, c.identity = true, id })
	if err != nil {
		return nil, err
	}
	return &Leader{lk: lk, l: l, cfg: cfg, kick: make(chan struct{}, 1)}, nil
}

// settleIdentity checks the identity settings of cfg and fills in their
// defaults (see LeaderConfig).
func settleIdentity(lk *Locker, cfg *LeaderConfig) error {
	if cfg.Identity == "" {
		cfg.Identity = defaultIdentity()
	}
	if err := checkIdentity(cfg.Identity); err != nil {
		return err
	}
	switch d := cfg.ObserveInterval; {
	case d == 0:
		cfg.ObserveInterval = DefaultLeaderObserveInterval
	case d < minObserveInterval || d > maxObserveInterval:
		return fmt.Errorf("%w: leader ObserveInterval %v is out of range: want 0 (the default, %v) or %v..%v",
			ErrInvalidOption, d, DefaultLeaderObserveInterval, minObserveInterval, maxObserveInterval)
	}
	mem := false // the in-memory double (pglocktest) knows who holds a key
	if lk != nil {
		_, mem = lk.src.(*memSource)
	}
	if cfg.OnNewLeader != nil && !mem && (lk == nil || !lk.pooled) {
		return fmt.Errorf("%w: leader OnNewLeader needs a Locker on a pool (*pgxpool.Pool or *sql.DB):"+
			" on one connection or transaction, a Leader's session is the caller's, and there is no pool to read who leads on",
			ErrInvalidOption)
	}
	return nil
}

// unmade returns the error of a Leader that Locker.Leader did not make (nil
// or zero), else nil.
func (ld *Leader) unmade() error {
	switch {
	case ld == nil:
		return errNilLeader
	case ld.l == nil:
		return errZeroLeader
	}
	return nil
}

// Key returns the key of the Leader's lock (the zero Key for a nil or zero
// Leader).
func (ld *Leader) Key() Key {
	if ld == nil || ld.l == nil {
		return Key{}
	}
	return ld.l.Key()
}

// IsLeader reports whether this Leader leads now: its term started and has
// not ended, nor been lost. A nil Leader does not lead.
func (ld *Leader) IsLeader() bool { return ld != nil && ld.leading.Load() }

// Terms returns how many terms this Leader has started (0 for a nil Leader).
func (ld *Leader) Terms() int64 {
	if ld == nil {
		return 0
	}
	return ld.terms.Load()
}

// Run campaigns for the key until ctx ends, and runs fn during each term
// won, with a context that ends when the term ends (see [Leader]).
//
//   - fn returns nil while leading: the work is done; Run steps down and
//     returns nil (a one-shot job, such as migrations, runs once).
//   - fn returns an error while leading: Run steps down, waits the backoff
//     and campaigns again (a service that keeps one consumer running
//     restarts it on one replica).
//   - The lock is lost: fn's context ends with cause ErrLockLost; once fn
//     has returned, Run campaigns again after the backoff.
//   - ctx ends: fn's context ends; once fn has returned, Run steps down and
//     returns ctx's error. A Run that is only campaigning returns at once,
//     its campaign's session closed (a connect still under way is waited
//     for, at most a second, so that no session of the Leader outlives its
//     Run).
//
// A campaign that cannot succeed by trying again ends Run with its error:
// the Locker was closed ([ErrLockerClosed]), or its connection cannot hold
// session locks ([ErrTransactionPooler]). A panic in fn steps down, then
// goes on up. Run returns [ErrLeaderRunning] when called while another Run
// of the same Leader runs, and [ErrNilFunc] for a nil fn. On a nil or zero
// Leader (one that Locker.Leader did not make) it returns an error matching
// [ErrUnsupportedConn].
func (ld *Leader) Run(ctx context.Context, fn func(ctx context.Context) error) error {
	if err := ld.unmade(); err != nil {
		return fmt.Errorf("pglock: Leader.Run: %w", err)
	}
	if fn == nil {
		return fmt.Errorf("%w: Leader.Run on key %s", ErrNilFunc, ld.Key())
	}
	if ctx == nil {
		return fmt.Errorf("%w: key %s: nil context", ErrNotAcquired, ld.Key())
	}
	if !ld.running.CompareAndSwap(false, true) {
		return fmt.Errorf("%w: key %s", ErrLeaderRunning, ld.Key())
	}
	defer ld.running.Store(false)
	// The campaigns' sessions carry the identity (see nameCampaign), and
	// OnNewLeader's reads run while Run does.
	if ld.cfg.OnNewLeader != nil {
		octx, stop := context.WithCancel(ctx)
		var ow sync.WaitGroup
		ow.Go(func() { ld.observe(octx) })
		defer func() {
			stop()
			ow.Wait()
		}()
	}
	backoff := ld.cfg.MinBackoff
	for {
		err := ld.l.Acquire(ctx)
		if ctx.Err() != nil {
			if err == nil {
				_ = ld.l.Release(ctx)
			}
			return ctx.Err()
		}
		if err != nil && permanent(err) {
			return err
		}
		if err != nil {
			ld.logf(slog.LevelWarn, "pglock: leader campaign failed", err)
			if !sleepCtx(ctx, jitter(backoff)) {
				return ctx.Err()
			}
			backoff = min(2*backoff, ld.cfg.MaxBackoff)
			continue
		}
		start := time.Now()
		why, lost := ld.term(ctx, fn)
		if ld.cfg.OnDeposed != nil {
			ld.cfg.OnDeposed(why)
		}
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case why == nil:
			return nil
		}
		if time.Since(start) > ld.cfg.MaxBackoff {
			backoff = ld.cfg.MinBackoff
		}
		if !lost {
			ld.logf(slog.LevelWarn, "pglock: leader's function failed; stepped down", why)
		}
		if !sleepCtx(ctx, jitter(backoff)) {
			return ctx.Err()
		}
		backoff = min(2*backoff, ld.cfg.MaxBackoff)
	}
}

// permanent reports whether a failed campaign cannot succeed by trying
// again: the Locker was closed, or its connection cannot hold session locks
// (a transaction pooler) or was refused.
func permanent(err error) bool {
	return errors.Is(err, ErrLockerClosed) || errors.Is(err, ErrTransactionPooler) ||
		errors.Is(err, ErrInvalidOption) || errors.Is(err, ErrUnsupportedConn)
}

// term runs one term: fn with the term's context, then the release. It
// returns why the term ended and whether the lock was lost.
func (ld *Leader) term(ctx context.Context, fn func(ctx context.Context) error) (why error, lost bool) {
	tctx, cancel := context.WithCancelCause(ctx)
	lostCh := ld.l.Lost()
	ld.cur.Store(&leaderTerm{n: ld.terms.Add(1), pid: ld.holdPID(), lost: lostCh})
	ld.leading.Store(true)
	ld.kicked()
	// The belief ends the moment the term's context does: at a loss, at
	// once, not when fn gets round to returning.
	var wg sync.WaitGroup
	wg.Go(func() {
		select {
		case <-lostCh:
			ld.leading.Store(false)
			cancel(ErrLockLost)
		case <-tctx.Done():
			ld.leading.Store(false)
		}
	})
	ld.logf(slog.LevelInfo, "pglock: elected leader", nil)
	defer func() {
		if v := recover(); v != nil {
			ld.stepDown(ctx, cancel, &wg)
			panic(v)
		}
	}()
	if ld.cfg.OnElected != nil {
		ld.cfg.OnElected(tctx)
	}
	ferr := fn(tctx)
	if context.Cause(tctx) == ErrLockLost {
		lost = true
	}
	rerr := ld.stepDown(ctx, cancel, &wg)
	switch {
	case lost || errors.Is(rerr, ErrLockLost):
		return join(ErrLockLost, rerr), true
	case ctx.Err() != nil:
		return ctx.Err(), false
	case ferr != nil:
		return ferr, false
	}
	return nil, false
}

// stepDown ends the term: the belief first, then the lock.
func (ld *Leader) stepDown(ctx context.Context, cancel context.CancelCauseFunc, wg *sync.WaitGroup) error {
	ld.leading.Store(false)
	cancel(nil)
	wg.Wait()
	err := ld.l.Release(context.WithoutCancel(ctx))
	ld.cur.Store(nil)
	ld.kicked()
	ld.logf(slog.LevelInfo, "pglock: stepped down as leader", err)
	return err
}

func (ld *Leader) logf(level slog.Level, msg string, err error) {
	if ld.l.log == nil {
		return
	}
	if err != nil {
		ld.l.log.Log(context.Background(), level, msg, slog.Any("error", err))
		return
	}
	ld.l.log.Log(context.Background(), level, msg)
}

// jitter returns d/2 plus a random part of d/2.
func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d/2+1)
}

// sleepCtx sleeps for d or until ctx ends; it reports whether it slept the
// whole time.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
