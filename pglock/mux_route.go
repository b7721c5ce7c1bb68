package pglock

import (
	"fmt"

	"github.com/pglockkit/kit/pglock/internal/lockconn"
)

// pick returns the lock connection for a try of k: its home slot, unless
// that one is busy while another lock connection is free (see
// lockconn.Group.Pick, which chooses by k's slot by hash and its bucket of
// hints). nil once the Locker is closed.
func (m *mux) pick(k Key) *lockConn {
	return m.lc.Pick(m.slotOf(k), hintOf(k))
}

// keyHash mixes a key's bits (Fibonacci hashing).
func keyHash(k Key) uint64 {
	h := uint64(k.v) * 0x9E3779B97F4A7C15
	if k.pair {
		h ^= 0xBF58476D1CE4E5B9
	}
	return h
}

// hintOf is k's bucket of hints (see lockconn.Group.Pick).
func hintOf(k Key) int { return int(keyHash(k)>>16) % lockconn.HintBuckets }

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
