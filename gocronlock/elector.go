package gocronlock

import (
	"context"
	"errors"
	"fmt"

	"github.com/go-co-op/gocron/v2"

	"github.com/pglockkit/kit/pglock"
)

// Elector is a gocron.Elector on a pglock.Leader: give it to
// gocron.WithDistributedElector, and of all the schedulers whose Electors
// campaign in the same election, only the leader's runs jobs; the others
// skip every run until they lead. When the leader stops (Close, its
// context, its process or its connection ends), the next replica in the
// server's queue is elected at once.
//
// Make it with [NewElector], which starts campaigning in the background;
// [Elector.Close] stops, and lets the lock go. An Elector is safe for
// concurrent use.
type Elector struct {
	name      string
	leader    *pglock.Leader
	notLeader error
	cancel    context.CancelFunc
	done      chan struct{}
}

var _ gocron.Elector = (*Elector)(nil)

// NewElector returns an Elector for the election name on locker, and starts
// campaigning: a goroutine runs pglock.Leader.Run for the key
// [DefaultElectorNamespace] + name (see [WithNamespace]) until ctx ends or
// [Elector.Close] is called. Every replica must use the same name. Options:
// [WithNamespace], [WithLeaderConfig], [WithLogger].
//
// The lock is a Session-scope lock of locker; on a pool it rides on the
// Locker's lock connections and costs no pool connection. A Locker on one
// connection works too, but holds nothing else while it leads.
//
// A nil ctx, a nil locker, an empty name or a bad option is an error
// ([ErrInvalidOption], [ErrNilLocker], [ErrEmptyName], or pglock's error);
// then nothing is started.
func NewElector(ctx context.Context, locker *pglock.Locker, name string, opts ...Option) (*Elector, error) {
	if ctx == nil {
		return nil, fmt.Errorf("%w: NewElector was given a nil context", ErrInvalidOption)
	}
	if locker == nil {
		return nil, ErrNilLocker
	}
	if name == "" {
		return nil, fmt.Errorf("%w: NewElector was given an empty election name", ErrEmptyName)
	}
	cfg, err := newConfig(forElector, opts)
	if err != nil {
		return nil, fmt.Errorf("gocronlock: election %q: %w", name, err)
	}
	key, err := locker.Key(cfg.namespace + name)
	if err != nil {
		return nil, fmt.Errorf("gocronlock: election %q: %w", name, err)
	}
	log := cfg.newLogger("election", name, "key", key.String())
	lc := cfg.leader
	onElected, onDeposed := lc.OnElected, lc.OnDeposed
	lc.OnElected = func(ctx context.Context) {
		log.info("gocronlock: elected leader")
		if onElected != nil {
			onElected(ctx)
		}
	}
	lc.OnDeposed = func(why error) {
		switch {
		case errors.Is(why, pglock.ErrLockLost):
			log.warn(why, "gocronlock: leadership lost")
		default:
			log.info("gocronlock: stepped down as leader")
		}
		if onDeposed != nil {
			onDeposed(why)
		}
	}
	ld, err := locker.Leader(key, lc)
	if err != nil {
		return nil, fmt.Errorf("gocronlock: election %q: %w", name, err)
	}
	ctx, cancel := context.WithCancel(ctx)
	e := &Elector{
		name:      name,
		leader:    ld,
		notLeader: fmt.Errorf("%w: election %q (key %s)", ErrNotLeader, name, key),
		cancel:    cancel,
		done:      make(chan struct{}),
	}
	go e.campaign(ctx)
	return e, nil
}

// campaign runs the Leader until ctx ends. A term lasts until it is lost or
// ctx ends: the function returns only then, with a non-nil cause, so that
// Run campaigns again after a loss.
func (e *Elector) campaign(ctx context.Context) {
	defer close(e.done)
	_ = e.leader.Run(ctx, func(ctx context.Context) error {
		<-ctx.Done()
		return context.Cause(ctx)
	})
}

// IsLeader is gocron's entry point: it returns nil while this Elector leads,
// and an error matching [ErrNotLeader] otherwise (campaigning, stopped, the
// lock lost, or a nil *Elector), so that gocron skips the run. It answers from memory,
// without a round trip: a lost connection is seen within pglock's loss
// bound (see pglock.Leader). ctx is not used.
func (e *Elector) IsLeader(context.Context) error {
	if e == nil {
		return fmt.Errorf("%w: IsLeader called on a nil *gocronlock.Elector", ErrNotLeader)
	}
	if e.leader.IsLeader() {
		return nil
	}
	return e.notLeader
}

// Name returns the election's name.
func (e *Elector) Name() string { return e.name }

// Key returns the key of the election's lock, for finding the leader in
// pg_locks.
func (e *Elector) Key() pglock.Key { return e.leader.Key() }

// Close stops campaigning: a leader steps down (its lock is released, and
// the next replica is elected), a campaigning Elector leaves the server's
// queue. It returns when the campaign's goroutine has ended, and IsLeader
// fails from then on. Close is safe to call more than once and returns nil.
// Stop the scheduler first if its jobs must not run past the term: the
// Elector is asked only when a run starts, and does not stop a running job.
func (e *Elector) Close() error {
	if e == nil {
		return nil
	}
	e.cancel()
	<-e.done
	return nil
}
