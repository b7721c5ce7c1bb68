package lockconn

// This file holds the Locker's lock connections by slot (Group.slots) and the
// choice of one for a key's try (Pick). The owner gives the key as two
// numbers of its hash: its slot (spread over the lock connections) and its
// bucket of hints (HintBuckets), so that no key type enters here.

// HintBuckets is the number of buckets of hints (see Group.Pick): keys that
// share a bucket share their home (a hint, not a rule: any lock connection
// may take any key).
const HintBuckets = 256

// Slot returns the live lock connection of slot i, replacing a lost one;
// nil once the Locker is closed (see Shut).
func (g *Group) Slot(i int) *Conn {
	g.setsMu.Lock()
	defer g.setsMu.Unlock()
	if g.shut {
		return nil
	}
	c := g.slots[i]
	if c == nil || c.IsDead() {
		c = g.New(i)
		g.slots[i] = c
	}
	return c
}

// Pick returns the lock connection for a try of a key whose slot by hash is
// slot and whose bucket of hints is hint: its home slot (homeOf), unless
// that one is running a statement while another lock connection is free
// (open and unused, or not opened yet), which then takes it at once rather
// than after the home's round trip, and becomes the home of the key's
// bucket of hints. The hold lives where it was taken (see keytable's
// Table.HeldOn): its unlock goes there, whatever the home. So a few
// goroutines on distinct keys use the lock connections side by side, as many
// raw sessions would, even when their keys hash to one slot (after one
// collision their keys live apart), and under load, when all are busy,
// requests queue at home and share its statements. nil once the Locker is
// closed.
func (g *Group) Pick(slot, hint int) *Conn {
	conns := len(g.slots)
	home := g.homeOf(slot, hint)
	c := g.Slot(home)
	if c == nil || conns == 1 || !c.Busy() {
		return c
	}
	g.setsMu.Lock()
	defer g.setsMu.Unlock()
	if g.shut {
		return nil
	}
	unopened := -1
	for i := 1; i < conns; i++ {
		j := (home + i) % conns
		switch o := g.slots[j]; {
		case o == nil:
			if unopened < 0 {
				unopened = j
			}
		case o.Free():
			g.hints[hint].Store(int32(j) + 1)
			return o
		}
	}
	if unopened >= 0 {
		// A slot no key has used yet: opened now, once (a connect instead
		// of the home's round trip).
		o := g.New(unopened)
		g.slots[unopened] = o
		g.hints[hint].Store(int32(unopened) + 1)
		return o
	}
	return c
}

// homeOf is the home lock connection of a key of slot and hint bucket (see
// Pick): where a try of its hint bucket last moved to, else its slot by
// hash.
func (g *Group) homeOf(slot, hint int) int {
	if h := int(g.hints[hint].Load()); h > 0 && h <= len(g.slots) {
		return h - 1
	}
	return slot
}

// Peek returns the lock connection of slot i as it is: nil when none was
// made, perhaps lost; it makes none.
func (g *Group) Peek(i int) *Conn {
	g.setsMu.Lock()
	defer g.setsMu.Unlock()
	return g.slots[i]
}

// OpenSlot returns an open lock connection, not known to be lost, or nil.
func (g *Group) OpenSlot() *Conn {
	g.setsMu.Lock()
	defer g.setsMu.Unlock()
	for _, s := range g.slots {
		if s != nil && !s.IsDead() && s.HasConn() {
			return s
		}
	}
	return nil
}
