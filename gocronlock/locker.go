package gocronlock

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-co-op/gocron/v2"

	"github.com/pglockkit/kit/pglock"
)

// Locker is a gocron.Locker on a *pglock.Locker: give it to
// gocron.WithDistributedLocker (every job of the scheduler) or
// gocron.WithDistributedJobLocker (one job). At each run gocron calls
// [Locker.Lock] with the job's name; the replica that gets the lock runs the
// job, and the others skip the run (gocron counts it as skipped and calls
// the job's AfterLockError listener with an error matching [ErrBusy]).
//
// The locks are Session-scope, exclusive locks of the *pglock.Locker, held
// on its lock connections: a held lock costs no pool connection. A Locker is
// safe for concurrent use.
type Locker struct {
	locker    *pglock.Locker
	namespace string
	minHold   time.Duration
	log       logger
}

var _ gocron.Locker = (*Locker)(nil)

// NewLocker returns a gocron.Locker that takes the lock of the key
// [DefaultNamespace] + job name (see [WithNamespace]) on locker. Options:
// [WithNamespace], [WithMinHold], [WithLogger].
//
// locker must be on a pool (*pgxpool.Pool or *sql.DB; see
// pglock.Locker.Pooled): gocron runs jobs on goroutines of their own, and
// the runs of a Locker on one connection would take turns on it. A nil
// locker, a Locker on one connection or transaction, or a bad option is an
// error ([ErrNilLocker], [ErrInvalidOption], or pglock's error for a Locker
// that cannot make locks). NewLocker does not talk to the database.
func NewLocker(locker *pglock.Locker, opts ...Option) (*Locker, error) {
	if locker == nil {
		return nil, ErrNilLocker
	}
	cfg, err := newConfig(forLocker, opts)
	if err != nil {
		return nil, fmt.Errorf("gocronlock: NewLocker: %w", err)
	}
	if _, err := lockOf(locker, cfg.namespace+"check", pglock.WithScope(pglock.Session)); err != nil {
		return nil, fmt.Errorf("gocronlock: NewLocker: %w", err)
	}
	return &Locker{locker: locker, namespace: cfg.namespace, minHold: cfg.minHold, log: cfg.newLogger()}, nil
}

// lockOf makes the lock of key with opts on locker: pglock checks the
// Locker, the key and the scope against each other here. The Locker must be
// on a pool.
func lockOf(locker *pglock.Locker, key string, opts ...pglock.Option) (*pglock.Lock, error) {
	l, err := locker.NewLock(key, opts...)
	if err != nil {
		return nil, err
	}
	if !locker.Pooled() {
		// Runs happen on goroutines of their own: on one connection their
		// holds would take turns, each waiting for the others' jobs.
		return nil, fmt.Errorf("%w: %w: the *pglock.Locker is on one connection or transaction; give it a pool (*pgxpool.Pool or *sql.DB)",
			ErrInvalidOption, pglock.ErrInvalidOption)
	}
	return l, nil
}

// Key returns the lock key of the job named name, for finding it in
// pg_locks: the Locker's key for the namespace + name.
func (l *Locker) Key(name string) (pglock.Key, error) {
	return l.locker.Key(l.namespace + name)
}

// Lock is gocron's entry point: it tries the lock of the job named key
// (gocron's job name) and never waits for it, so that a run that another
// replica holds is skipped rather than run late.
//
//   - The lock is free: Lock returns a gocron.Lock that holds it until
//     gocron calls Unlock, when the job returns (see [WithMinHold]).
//   - Another session holds it (another replica, or another run of the
//     job here): the error matches [ErrBusy], and only it.
//   - The lock could not be tried: the error is pglock's (matching
//     pglock.ErrNotAcquired; pglock.ErrUnavailable when the database could
//     not be reached), never ErrBusy. A ctx that has ended is one case.
//   - An empty key is an error matching [ErrEmptyName]; a nil ctx one
//     matching pglock.ErrNotAcquired; a nil *Locker one matching
//     [ErrNilLocker].
//
// gocron passes the job's context, which it cancels at Shutdown, StopJobs
// and RemoveJob; the returned lock does not depend on it to be released.
// The key is the job's name: set it with gocron.WithName, the same on every
// replica. Without it gocron names a job after its function
// ("main.main.func1"), a name that changes when the code moves, so that two
// versions of a service during a rolling deploy would not exclude each
// other.
func (l *Locker) Lock(ctx context.Context, key string) (gocron.Lock, error) {
	if l == nil {
		return nil, fmt.Errorf("%w: Lock called on a nil *gocronlock.Locker", ErrNilLocker)
	}
	if key == "" {
		return nil, fmt.Errorf("%w: Lock was given an empty key (the gocron job's name)", ErrEmptyName)
	}
	if ctx == nil {
		return nil, fmt.Errorf("gocronlock: job %q: %w: nil context", key, pglock.ErrNotAcquired)
	}
	lk, err := l.locker.NewLock(l.namespace+key, pglock.WithScope(pglock.Session))
	if err != nil {
		return nil, fmt.Errorf("gocronlock: job %q: %w", key, err)
	}
	log := l.log.withKV("job", key, "key", lk.Key().String())
	start := time.Now()
	ok, err := lk.TryAcquire(ctx)
	if err != nil {
		err = fmt.Errorf("gocronlock: job %q: %w", key, err)
		log.error(err, "gocronlock: lock not acquired")
		return nil, err
	}
	if !ok {
		log.info("gocronlock: skip", "reason", "held elsewhere")
		return nil, fmt.Errorf("%w: job %q (key %s)", ErrBusy, key, lk.Key())
	}
	outer.add(lk.Key())
	return &hold{name: key, lk: lk, start: start, minHold: l.minHold, log: log}, nil
}

// hold is a gocron.Lock: one run's hold of a job's lock.
type hold struct {
	name    string
	lk      *pglock.Lock
	start   time.Time
	minHold time.Duration
	log     logger
	done    atomic.Bool
}

// Unlock releases the lock, once MinHold has passed since it was taken (or
// at once when ctx, the job's context, has ended: Shutdown, StopJobs,
// RemoveJob). The release runs even when ctx has ended (it uses
// context.WithoutCancel(ctx), bounded by the Locker's release timeout,
// pglock.WithReleaseTimeout), so that a scheduler's shutdown does not leave
// the lock held. A second Unlock returns nil. An error matching
// pglock.ErrLockLost means the lock's connection died during the run (the
// server had already let the lock go); gocron ignores Unlock's error, so
// errors are logged too (see [WithLogger]).
func (h *hold) Unlock(ctx context.Context) error {
	if !h.done.CompareAndSwap(false, true) {
		return nil
	}
	if ctx == nil {
		ctx = context.Background() // releasing matters more than the caller's mistake
	}
	if h.minHold > 0 {
		holdUntil(ctx, h.lk.Lost(), h.start.Add(h.minHold))
	}
	outer.remove(h.lk.Key())
	err := h.lk.Release(context.WithoutCancel(ctx))
	if err == nil {
		return nil
	}
	err = fmt.Errorf("gocronlock: job %q: %w", h.name, err)
	if errors.Is(err, pglock.ErrLockLost) {
		h.log.warn(err, "gocronlock: lock lost during run")
	} else {
		h.log.error(err, "gocronlock: unlock failed")
	}
	return err
}

// holdUntil waits until t, or until ctx ends or lost is closed.
func holdUntil(ctx context.Context, lost <-chan struct{}, t time.Time) {
	d := time.Until(t)
	if d <= 0 {
		return
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-ctx.Done():
	case <-lost:
	}
}

// outer counts the keys that Lockers of this process hold, so that a Func
// job that finds its key busy can tell a scheduler's Locker of this process
// (a job locked twice: ErrLockedTwice) from another replica.
var outer = heldKeys{m: map[pglock.Key]int{}}

type heldKeys struct {
	mu sync.Mutex
	m  map[pglock.Key]int
}

func (h *heldKeys) add(k pglock.Key) {
	h.mu.Lock()
	h.m[k]++
	h.mu.Unlock()
}

func (h *heldKeys) remove(k pglock.Key) {
	h.mu.Lock()
	if h.m[k]--; h.m[k] <= 0 {
		delete(h.m, k)
	}
	h.mu.Unlock()
}

func (h *heldKeys) has(k pglock.Key) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.m[k] > 0
}
