package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// Semaphore is a counted lock: at most Size holders of its name at once,
// across every process that uses the same name and size on the same
// database. Make it with [Locker.Semaphore].
//
// It is made of Size slot keys (the name followed by "#0", "#1"...), each an
// exclusive session lock, and a queue key (the name followed by "#queue"). A
// holder holds one slot. An acquire tries the slots, from a point that
// varies, and takes the first free one. When all are taken it queues on the
// queue key, in the server's FIFO queue across processes: only the head of
// that queue waits for a slot, and it waits for all of them at once, in the
// server (one waiting connection per slot), so it is granted the moment any
// slot frees; then it lets the queue key go to the next waiter. So no waiter
// starves, however often others take and give back slots, and nothing polls.
// A try that finds every slot taken returns at once. A cancelled acquire
// leaves nothing held.
//
// Locks, semaphores and key sets of one Locker use the Locker's lock and
// waiting connections ([WithWaitConns] bounds the waits: a head waiting on
// more slots than there are free waiting places polls the others).
// [WithWait] (the Locker's, or one given to [Locker.Semaphore]) bounds an
// acquire's whole wait (in the queue and as its head); a wait that passes it
// fails as Acquire's does.
// Semaphores are Session scope only, whatever the Locker's scope: the queue
// key must be let go before the work ends, which a transaction lock cannot
// do.
type Semaphore struct {
	lk    *Locker
	name  string
	slots []Key
	queue Key
	// opts are the options of its Locks (Semaphore's, then the ones that
	// make them exclusive Session-scope locks without tokens); wait bounds
	// a whole acquire (WithWait).
	opts []Option
	wait time.Duration
	// start is where this process tries the slots from next: a rotating
	// point, so that a process's holders spread over the slots.
	start atomic.Uint32
}

// maxSemaphoreSize bounds a Semaphore's slots: each is a lock of the
// server's lock table while held, and the head of the queue waits on each.
const maxSemaphoreSize = 1024

// Semaphore returns a Semaphore of n slots named name, with the Locker's
// namespace. n is 1 to 1024; every process must use the same n for a name.
// opts are options of a Lock, over the Locker's: [WithWait] bounds an
// acquire's whole wait (in the queue, then as its head: a wait that passes
// it fails as Acquire's does, and the bound does not reach the function),
// [WithNamespace] names the keys, and the others ([WithObserver],
// [WithLogger], [WithReleaseTimeout]...) apply to its locks; the slots are
// exclusive Session-scope locks without fencing tokens, whatever
// [WithScope], [WithMode] or [WithToken] say.
// Its slots are Session-scope locks whatever the Locker's scope (its
// function runs in no transaction of its own); a Locker on a transaction
// (pgx.Tx, *sql.Tx) cannot make one ([ErrInvalidOption]).
func (lk *Locker) Semaphore(name string, n int, opts ...Option) (*Semaphore, error) {
	if err := lk.unmade(); err != nil {
		return nil, err
	}
	cfg := lk.cfg
	cfg.errs = nil
	if err := cfg.apply(opts); err != nil {
		return nil, err
	}
	if err := cfg.lockOnly(); err != nil {
		return nil, err
	}
	switch {
	case name == "":
		return nil, fmt.Errorf("%w: Semaphore: empty name", ErrInvalidKey)
	case n < 1 || n > maxSemaphoreSize:
		return nil, fmt.Errorf("%w: Semaphore %q: size %d, want 1 to %d", ErrInvalidOption, name, n, maxSemaphoreSize)
	}
	switch lk.conn.(type) {
	case pgx.Tx, *sql.Tx:
		return nil, fmt.Errorf("%w: Semaphore %q: a Locker on a transaction cannot make one"+
			" (its slots are session locks, and the queue's lock must be let go before the work ends):"+
			" use a Locker on a pool", ErrInvalidOption, name)
	}
	s := &Semaphore{lk: lk, name: name, slots: make([]Key, n), wait: cfg.waitTimeout,
		opts: append(slices.Clip(opts), WithScope(Session), WithMode(Exclusive), WithWait(0), noToken)}
	for i := range s.slots {
		k, err := cfg.keyOf(fmt.Sprintf("%s#%d", name, i))
		if err != nil {
			return nil, err
		}
		s.slots[i] = k
	}
	q, err := cfg.keyOf(name + "#queue")
	if err != nil {
		return nil, err
	}
	s.queue = q
	s.start.Store(rand.Uint32())
	return s, nil
}

// Name returns the Semaphore's name, as given to [Locker.Semaphore].
func (s *Semaphore) Name() string { return s.name }

// Size returns the Semaphore's number of slots.
func (s *Semaphore) Size() int { return len(s.slots) }

// Do runs fn while holding a slot of the Semaphore: it waits (as
// [Lock.Acquire] does) until one is free, runs fn, and gives the slot back.
// fn's context is cancelled with cause [ErrLockLost] if the slot's hold is
// lost. A Do of the Semaphore inside fn (through its context) runs at once
// in the enclosing slot. A nil fn is an error ([ErrNilFunc]).
func (s *Semaphore) Do(ctx context.Context, fn func(ctx context.Context) error) error {
	_, err := s.do(ctx, fn, true)
	return err
}

// TryDo runs fn only if a slot of the Semaphore is free now, and reports
// whether fn ran; (false, nil) means every slot is taken.
func (s *Semaphore) TryDo(ctx context.Context, fn func(ctx context.Context) error) (bool, error) {
	return s.do(ctx, fn, false)
}

func (s *Semaphore) do(ctx context.Context, fn func(ctx context.Context) error, wait bool) (bool, error) {
	if s == nil || s.lk == nil {
		return false, fmt.Errorf("%w: %w: a Semaphore that Locker.Semaphore did not make", ErrNotAcquired, ErrUnsupportedConn)
	}
	if fn == nil {
		return false, fmt.Errorf("%w: Semaphore %q", ErrNilFunc, s.name)
	}
	if ctx == nil {
		return false, fmt.Errorf("%w: Semaphore %q: nil context", ErrNotAcquired, s.name)
	}
	if h := s.enclosed(ctx); h != nil {
		if err := ctx.Err(); err != nil {
			return false, fmt.Errorf("%w: Semaphore %q: the enclosing hold has ended: %w", ErrNotAcquired, s.name, context.Cause(ctx))
		}
		err := fn(ctx)
		if h.l.holdGen() != h.gen { // as a nested Lock's Do (see Lock.nested)
			err = join(err, fmt.Errorf("%w: Semaphore %q: the enclosing slot's hold ended while the nested function ran", ErrLockLost, s.name))
		}
		return true, err
	}
	l, err := s.acquire(ctx, wait)
	if err != nil || l == nil {
		return false, err
	}
	return true, runSet(ctx, []*Lock{l}, false, fn)
}

// enclosed returns the hold of one of the Semaphore's slots (on the
// Locker's database) that ctx is the context of, if any.
func (s *Semaphore) enclosed(ctx context.Context) *holdCtx {
	domain := domainOf(s.lk.conn)
	if domain == nil {
		return nil
	}
	h, _ := ctx.Value(holdsKey{}).(*holdCtx)
	for ; h != nil; h, _ = h.Context.Value(holdsKey{}).(*holdCtx) {
		if h.domain != domain || h.l.holdGen() != h.gen || h.gen == noHold {
			continue
		}
		for _, k := range s.slots {
			if h.key == k {
				return h
			}
		}
	}
	return nil
}

// slotLock returns a Lock on slot i: exclusive, with no wait bound of its
// own (acquire bounds the whole acquire).
func (s *Semaphore) slotLock(i int) (*Lock, error) {
	l, err := s.lk.NewLock(s.slots[i], s.opts...)
	if errors.Is(err, ErrLockerClosed) {
		err = fmt.Errorf("%w: %w", ErrNotAcquired, err)
	}
	return l, err
}

// tryAll tries each slot once, from a rotating point, and returns the
// first one held (nil when all are taken).
func (s *Semaphore) tryAll(ctx context.Context) (*Lock, error) {
	n := len(s.slots)
	from := int(s.start.Add(1) % uint32(n))
	for i := range n {
		l, err := s.slotLock((from + i) % n)
		if err != nil {
			return nil, err
		}
		ok, err := l.TryAcquire(ctx)
		if err != nil {
			return nil, err
		}
		if ok {
			return l, nil
		}
	}
	return nil, nil
}

// acquire returns the Lock of a slot it holds; nil, nil for a try that
// found every slot taken.
func (s *Semaphore) acquire(ctx context.Context, wait bool) (*Lock, error) {
	if l, err := s.tryAll(ctx); l != nil || err != nil || !wait {
		return l, err
	}
	// The wait bound (WithWait) bounds the whole wait: the queue, then the
	// head's.
	if d := s.wait; d > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d)
		defer cancel()
	}
	// Every slot is taken: queue for the head's place (FIFO across
	// processes), then wait as the head.
	q, err := s.lk.NewLock(s.queue, s.opts...)
	if err != nil {
		if errors.Is(err, ErrLockerClosed) {
			err = fmt.Errorf("%w: %w", ErrNotAcquired, err)
		}
		return nil, err
	}
	if err := q.Acquire(ctx); err != nil {
		return nil, err
	}
	for {
		// A slot may have freed while this process queued.
		l, err := s.tryAll(ctx)
		if l == nil && err == nil {
			l, err = s.waitAny(ctx)
		}
		switch {
		case l != nil:
			// The head's place goes to the next in the queue while the
			// function runs: its unlock need not delay the function.
			s.lk.background.Go(func() { _ = q.Release(context.WithoutCancel(ctx)) })
			return l, nil
		case err != nil:
			_ = q.Release(context.WithoutCancel(ctx))
			return nil, err
		}
	}
}

// waitAny waits for every slot at once and returns the first one granted,
// letting go of any other granted meanwhile; nil, nil when the waits ended
// without a grant (a slot lost as it was granted: try again).
func (s *Semaphore) waitAny(ctx context.Context) (*Lock, error) {
	// Granted when any slot frees: no one slot's wait can close a cycle of
	// waits on its own, so they are not waits of the context's holds (see
	// deadlock.go), which checks each wait alone.
	wctx, cancel := context.WithCancel(withoutHolds(ctx))
	defer cancel()
	n := len(s.slots)
	type result struct {
		l   *Lock
		err error
	}
	// Every Lock first: a failure to make one (a Close) must not leave a
	// wait already started, and perhaps granted, without its reader.
	locks := make([]*Lock, n)
	for i := range n {
		l, err := s.slotLock(i)
		if err != nil {
			return nil, err
		}
		locks[i] = l
	}
	results := make(chan result, n)
	var wg sync.WaitGroup
	for _, l := range locks {
		wg.Go(func() {
			err := l.Acquire(wctx)
			results <- result{l, err}
		})
	}
	var got *Lock
	var firstErr error
	for i := range n {
		r := <-results
		switch {
		case r.err == nil && got == nil:
			got = r.l
			cancel() // the others stop waiting
			// The function need not wait for their cancels (each a round
			// trip, or a connection of its own): they end, and a slot
			// granted as its cancel arrived is let go, in the background.
			rest := n - i - 1
			s.lk.background.Go(func() {
				for range rest {
					if r := <-results; r.err == nil {
						_ = r.l.Release(context.WithoutCancel(ctx))
					}
				}
				wg.Wait()
			})
			return got, nil
		case r.err == nil:
			_ = r.l.Release(context.WithoutCancel(ctx)) // granted as the cancel arrived
		case got == nil && firstErr == nil && wctx.Err() == nil:
			firstErr = r.err // a failure of its own, not the cancel
			cancel()
		}
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%w: Semaphore %q: %w", ErrNotAcquired, s.name, err)
	}
	return nil, firstErr
}
