package keytable

// Where a key's server lock lives, and its loss: the side of an entry that
// the multiplexer uses (a table whose users hold no connection leaves it at
// the zero values).

// Conn is what the table needs of the connection a key is held on: its
// identity (the zero value of the type means "no connection") and the
// table's record of it (see ConnState).
type Conn interface {
	comparable
	// KeyTableState returns the table's record of the connection; it is the
	// same record at every call.
	KeyTableState() *ConnState
}

// ConnState is a table's record of one connection: whether it was lost (see
// Table.LoseConn), so that a grant recorded after the loss is known to be
// lost too. The connection type holds it (its zero value: not lost); only the
// table reads or writes it, with its mutex held.
type ConnState struct {
	lost error
}

// lost reports whether conn is a connection that was lost. t.mu must be
// held.
func lost[C Conn](conn C) bool {
	var none C
	return conn != none && conn.KeyTableState().lost != nil
}

// hook is a holder's function to call when its key is lost.
type hook[H comparable] struct {
	holder H
	fn     func(error)
}

// dropHook removes h's hook from e. t.mu must be held.
func (e *Entry[K, C, H, R]) dropHook(h H) {
	for i, k := range e.onLost {
		if k.holder == h {
			e.onLost = append(e.onLost[:i], e.onLost[i+1:]...)
			return
		}
	}
}

// LoseConn marks every key held on c as lost (with err, the first time) and
// calls the functions of their holders' watches (see Watch) with err, after
// letting go of the table's mutex. A grant on c recorded later is refused
// (see Granted and HandOff).
func (t *Table[K, C, H, R]) LoseConn(c C, err error) {
	var fns []func(error)
	t.mu.Lock()
	if s := c.KeyTableState(); s.lost == nil {
		s.lost = err
	}
	for _, e := range t.m {
		if e.conn != c || e.lostErr != nil {
			continue
		}
		e.lostErr = err
		for _, h := range e.onLost {
			fns = append(fns, h.fn)
		}
	}
	t.mu.Unlock()
	for _, f := range fns {
		f(err)
	}
}

// HeldOn returns the connection that holds e's server lock (the zero C
// while none does), and why it was lost (nil while it was not).
func (t *Table[K, C, H, R]) HeldOn(e *Entry[K, C, H, R]) (conn C, lostErr error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return e.conn, e.lostErr
}

// Watch registers fn, as holder h's, to be called when the connection that
// holds e's server lock is lost (see LoseConn). When it was lost already,
// Watch returns why, and fn is not called for it: the caller calls it.
func (t *Table[K, C, H, R]) Watch(e *Entry[K, C, H, R], h H, fn func(error)) (lostErr error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e.onLost = append(e.onLost, hook[H]{h, fn})
	return e.lostErr
}

// Unwatch removes holder h's watch of e (see Watch).
func (t *Table[K, C, H, R]) Unwatch(e *Entry[K, C, H, R], h H) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e.dropHook(h)
}

// Leaving is Unwatch for holder h that is about to leave e (see Leave):
// it also returns the connection that holds e's server lock, why it was lost
// (nil while it was not), and whether other holders of the process share the
// hold.
func (t *Table[K, C, H, R]) Leaving(e *Entry[K, C, H, R], h H) (conn C, lostErr error, others bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e.dropHook(h)
	return e.conn, e.lostErr, e.holders > 1
}

// Find returns k's entry, nil when k is not held, taken or queued for (for
// tests).
func (t *Table[K, C, H, R]) Find(k K) *Entry[K, C, H, R] {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.m[k]
}
