package pglocktest

import (
	"fmt"
	"sync/atomic"
	"time"

	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/pglock/internal/memlock"
)

// Server is an in-memory advisory lock table: one database as far as locks
// go. Lockers made on it with [NewLocker] are replicas of a service on that
// database: they exclude each other as processes on one PostgreSQL server
// do. Its methods inject faults and show its state; all are safe for
// concurrent use. Make it with [NewServer]; it needs no Close.
type Server struct {
	mem      *memlock.Server
	replicas atomic.Int64
}

// NewServer returns an empty lock table.
func NewServer() *Server { return &Server{mem: memlock.NewServer()} }

// NewLocker returns a Locker on s: one replica, with a session of its own
// named "replica-1", "replica-2"... in the order of the calls on s (see
// [Holder]). opts are [pglock.NewLocker]'s; the Locker's own connection
// settings ([pglock.WithLockConns]...) are accepted and change nothing.
// Transaction scope is an error matching [pglock.ErrUnsupportedConn]: the
// double has no transactions. Close the Locker when done: its holds are
// lost, as a real Locker's are.
func NewLocker(s *Server, opts ...pglock.Option) (*pglock.Locker, error) {
	if s == nil || s.mem == nil {
		return nil, fmt.Errorf("%w: a pglocktest.Server that NewServer did not make", pglock.ErrUnsupportedConn)
	}
	sess := s.mem.NewSession(fmt.Sprintf("replica-%d", s.replicas.Add(1)))
	lk, err := pglock.NewLocker(sess, opts...)
	if err != nil {
		sess.Close()
		return nil, err
	}
	return lk, nil
}

// Lose makes every hold of key lost now, as if the server had ended the
// holders' sessions: each holder's [pglock.Lock.Lost] is closed and the
// context of its Do (or of an adapter's handler, job or call) is cancelled
// with a cause matching [pglock.ErrLockLost], before Lose returns and before
// any waiter is granted the key (the double has no overlap window: the
// real lock has one, see pglock's documentation); then the key is free for
// the next in the queue. The holders' Release returns an error matching
// ErrLockLost. Lose returns the number of holds lost (0 when the key is
// free). key is the Key the Locker takes, namespace included: see
// [pglock.Locker.Key].
func (s *Server) Lose(key pglock.Key) int {
	return s.mem.Lose(memKey(key), fmt.Errorf("pglocktest: key %s: lost: Server.Lose was called", key))
}

// FailNext makes the next acquire of key, by any Locker on s (a try or a
// wait, from Acquire, Do or an adapter), fail with err, before it looks at
// the key: with [pglock.ErrUnavailable] the acquire fails as it does when
// the database is down (the error matches [pglock.ErrNotAcquired] and
// ErrUnavailable). Calls add up: each fails one acquire, in order.
func (s *Server) FailNext(key pglock.Key, err error) {
	s.mem.FailNext(memKey(key), err)
}

// BusyNext makes the next acquire of key, by any Locker on s, find it held
// by another replica, whatever the table says: a try reports busy, and a
// wait waits until its context (or wait bound) ends. Calls add up. To hold
// a key elsewhere for longer, and let the wait be granted, use
// [Server.HoldElsewhere].
func (s *Server) BusyNext(key pglock.Key) {
	s.mem.BusyNext(memKey(key))
}

// HoldElsewhere makes another replica (named "elsewhere") take key in
// Exclusive mode, without waiting: it holds it at once when the key is free,
// else it queues for it as an Acquire would, and holds it when its turn
// comes. release lets it go (or leaves the queue); it is safe to call more
// than once.
func (s *Server) HoldElsewhere(key pglock.Key) (release func()) {
	_, cancel := s.mem.NewSession("elsewhere").Enqueue(memKey(key), memlock.Exclusive, "")
	return cancel
}

// SetDown takes the whole server down (true) or brings it back up (false),
// as when the database stops and restarts. Going down:
//
//   - every hold, by every Locker on s (and [Server.HoldElsewhere]'s), is
//     lost, as with [Server.Lose]: Lost() closes and a Do's context is
//     cancelled with a cause matching [pglock.ErrLockLost], before SetDown
//     returns; the holders' Release returns an error matching ErrLockLost
//     and [pglock.ErrUnavailable];
//   - every waiting acquire ends with an error matching
//     [pglock.ErrNotAcquired] and ErrUnavailable, and nothing is held.
//
// While down, every acquire (a try or a wait) fails at once with an error
// matching ErrNotAcquired and ErrUnavailable, as when the database cannot
// be reached, before [Server.FailNext] and [Server.BusyNext] apply (they
// wait for the server to come up), and HoldElsewhere holds nothing. Coming
// up, the table is empty and acquires go through again. SetDown(true) on a
// server that is down, or SetDown(false) on one that is up, does nothing.
//
// While the server is down, [pglock.Locker.CheckHealth] of its Lockers
// reports an error matching [pglock.ErrUnavailable] (within its check
// interval: an answer is kept for one).
func (s *Server) SetDown(down bool) {
	if !down {
		s.mem.SetDown(nil)
		return
	}
	s.mem.SetDown(fmt.Errorf("%w: pglocktest: the server is down (Server.SetDown)", pglock.ErrUnavailable))
}

// SetDelay makes every acquire on s, by any Locker (a try or a wait), take
// d before it reaches the lock table, as a round trip to a slow or distant
// server would: a TryAcquire takes d, an Acquire at least d. The acquire's
// context bounds the delay: when it ends first, the acquire fails as a
// wait cut short does (its error matches [pglock.ErrNotAcquired] and the
// context's error) and nothing is held. Releases take no delay. 0 (or a
// negative d) removes the delay; acquires already on their way keep the
// delay they started with, unless the server goes down ([Server.SetDown]).
func (s *Server) SetDelay(d time.Duration) {
	s.mem.SetDelay(d)
}

// Holder is one hold, or one waiting acquire, of a key (see
// [Server.Holders] and [Server.Waiters]).
type Holder struct {
	// Replica names the Locker: "replica-N" for the Nth Locker made on
	// the Server, "elsewhere" for [Server.HoldElsewhere].
	Replica string
	// Mode is the hold's mode.
	Mode pglock.Mode
	// Leader is the identity of the [pglock.Leader] whose lock this is
	// ([pglock.LeaderConfig].Identity); "" for other locks.
	Leader string
}

// Holders returns the holds of key, in the order they were granted: one
// Exclusive holder, or Shared ones. nil when the key is free.
func (s *Server) Holders(key pglock.Key) []Holder {
	holds, _ := s.mem.Holders(memKey(key))
	return holders(holds)
}

// Waiters returns the acquires waiting for key, in queue order (the order
// they will be granted in, as far as their modes allow).
func (s *Server) Waiters(key pglock.Key) []Holder {
	_, waiters := s.mem.Holders(memKey(key))
	return holders(waiters)
}

// Keys returns the keys held or waited for now, in no order.
func (s *Server) Keys() []pglock.Key {
	mks := s.mem.Keys()
	keys := make([]pglock.Key, len(mks))
	for i, k := range mks {
		if k.Pair {
			keys[i] = pglock.Int32PairKey(int32(k.V>>32), int32(uint32(k.V)))
		} else {
			keys[i] = pglock.Int64Key(k.V)
		}
	}
	return keys
}

func holders(hs []memlock.Holder) []Holder {
	var out []Holder
	for _, h := range hs {
		out = append(out, Holder{Replica: h.Session, Mode: pglock.Mode(h.Mode), Leader: h.Label})
	}
	return out
}

func memKey(k pglock.Key) memlock.Key { return memlock.Key{V: k.Int64(), Pair: k.IsPair()} }
