package pglock

import (
	"fmt"
)

// slot returns the live lock connection of slot i, replacing a lost one;
// nil once the Locker is closed.
func (m *mux) slot(i int) *lockConn {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	c := m.slots[i]
	if c == nil || c.IsDead() {
		c = m.lc.New(i)
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
	if c == nil || m.conns == 1 || !c.Busy() {
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
		case o.Free():
			m.hints[hintOf(k)].Store(int32(j) + 1)
			return o
		}
	}
	if unopened >= 0 {
		// A slot no key has used yet: opened now, once (a connect instead
		// of the home's round trip).
		o := m.lc.New(unopened)
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
