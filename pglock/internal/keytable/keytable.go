package keytable

import (
	"context"
	"sync"
	"time"
)

// Mode is the mode of a hold or a request.
type Mode uint8

const (
	// Exclusive excludes every other holder (the zero value).
	Exclusive Mode = iota
	// Shared admits other shared holders and excludes exclusive ones.
	Shared
)

// Config is the behaviour of a table that its user chooses.
type Config struct {
	// SharedTries: a shared try (Enter with wait false) that finds a shared
	// try of the same key in flight waits for its answer instead of calling
	// the key busy (the multiplexer, whose tries never block, sets it).
	SharedTries bool
	// Probes: a shared hold that has let others join for SharedJoinRecheck
	// is checked for exclusive waiters of other sessions before more join
	// (see AdmitProbe); the multiplexer sets it. Without it, joins stop
	// after SharedJoinRecheck until the hold drains.
	Probes bool
	// Closed is the error of a wait that the table's Close ended.
	Closed error
}

// Table is a Locker's in-process table of keys. PostgreSQL stacks the
// locks of one session (a session that takes a key twice holds it twice), so
// when many Locks share a session, exclusion among them is the table's job:
// at most one goroutine at a time (the key's "turn") takes or gives back the
// server's lock on a key, the others queue behind it in FIFO order, and
// shared holders in the process share one server-side shared lock,
// reference counted.
//
// K is the key; C the connection a key is held on; H a holder that watches
// for the loss of its hold (see Watch); R the wait in the server's queue
// that a turn can be relayed with (see RelayTo).
//
// An entry exists while a key is held, taken or queued for; it is deleted
// when the last of them is gone.
type Table[K comparable, C Conn, H comparable, R any] struct {
	mu sync.Mutex
	m  map[K]*Entry[K, C, H, R]
	// closing is closed when the Locker closes: queued goroutines give up.
	closing chan struct{}
	// closedErr is the error of a wait that closing ended (Config.Closed).
	closedErr error
	// sharedTries: a shared TryAcquire that finds a shared try of the same
	// key in flight waits for its answer instead of calling the key busy
	// (the multiplexer, whose tries never block, sets it).
	sharedTries bool
	// probes: a shared hold that has let others join for SharedJoinRecheck
	// is checked for exclusive waiters of other sessions before more join
	// (see Entry.checked); the multiplexer sets it. Without it (or when
	// a probe cannot be made), joins stop after SharedJoinRecheck until the
	// hold drains.
	probes bool
	// now is the clock (time.Now; tests may set another).
	now func() time.Time
	// hot records the keys that a session of another process was seen to
	// hold or wait for lately (see MarkHot), with when.
	hot map[K]time.Time
}

// HotFor is how long a key counts as contended by another process after the
// last sign of it (see Table.MarkHot): a try or a wait that found it
// taken or waited for, or a retake that the server gave to another session.
// While it is hot, the multiplexer keeps the process in the server's queue
// for it as a process with a session per waiter would: a blocking acquire
// waits there at once, without trying first (pglock's mux.takeHot), and a
// holder that lets go queues the next goroutine's wait in the same write as
// its unlock (pglock's mux.relay). Past it, the next try, wait or retake
// looks again.
const HotFor = time.Second

// maxHot bounds the keys recorded as hot; past it the stale ones are
// dropped, and then all of them.
const maxHot = 1024

// SharedJoinRecheck is how long a shared hold lets other shared holders of
// the process join it without checking that no session of another process
// waits for the key in Exclusive mode. PostgreSQL queues a new shared request
// behind a waiting exclusive one, so that readers cannot starve a writer;
// local holders that join an existing hold bypass the server's queue, so the
// process checks it for them (pglock's mux.probe): an exclusive waiter
// elsewhere waits for at most about this long plus the holds under way.
const SharedJoinRecheck = 100 * time.Millisecond

// Entry is one key of a Table. Its fields are guarded by the table's
// mutex (the owner of the turn may read conn without it).
type Entry[K comparable, C Conn, H comparable, R any] struct {
	key     K
	holders int  // local holders of the server's lock (more than 1 only in Shared mode)
	mode    Mode // the holders' mode
	turn    bool // a goroutine is taking or giving back the server's lock
	// sharedTry: the owner of the turn is trying the key in Shared mode (the
	// non-blocking step): a shared try can wait for its answer.
	sharedTry bool
	queue     []*waiter

	// For a shared hold: when it was last known that no session of another
	// process waited for the key in Exclusive mode (its grant, or the last
	// probe); whether a probe is under way; and whether one found such a
	// waiter (draining: no one joins any more, the hold ends when its
	// holders leave, and the server's queue decides who is next).
	checked  time.Time
	probing  bool
	draining bool

	// Used by the multiplexer: where the server's lock lives, and whether
	// that connection was lost.
	conn    C
	lostErr error
	onLost  []hook[H] // one per holder watching for the loss
	// relay is the wait in the server's queue that the owner of the turn
	// was handed with it (AdmitRelay, see RelayTo).
	relay R
}

// Key returns the entry's key.
func (e *Entry[K, C, H, R]) Key() K { return e.key }

// waiter is a goroutine queued for a key. It is told once, on ch, that it
// now holds the key (AdmitJoined), that it has the turn (AdmitTurn), or, for
// a non-blocking acquire (try), that the key is busy (AdmitBusy).
type waiter struct {
	mode Mode
	try  bool
	// campaign: a Leader's wait, which holds no place among the waiting
	// connections; a hand-off respects it (see HandOff).
	campaign bool
	ch       chan Admission
}

// Admission is how Enter let a caller in.
type Admission int

const (
	// AdmitTurn: take the server's lock, then call Granted or PassTurn.
	AdmitTurn Admission = iota
	// AdmitJoined: holds the key as a shared co-holder: no statement needed.
	AdmitJoined
	// AdmitBusy: held by another Lock of the process (only when !wait).
	AdmitBusy
	// AdmitProbe: joined, as AdmitJoined, and the caller must now check for
	// exclusive waiters of other sessions (see SharedJoinRecheck) and call
	// Probed.
	AdmitProbe
	// AdmitRelay: the turn, with a wait for the key already in the server's
	// queue (see RelayTo): finish it (see Relayed), then call Granted or
	// PassTurn.
	AdmitRelay
)

// New returns an empty table.
func New[K comparable, C Conn, H comparable, R any](cfg Config) *Table[K, C, H, R] {
	return &Table[K, C, H, R]{
		m:           make(map[K]*Entry[K, C, H, R]),
		closing:     make(chan struct{}),
		closedErr:   cfg.Closed,
		sharedTries: cfg.SharedTries,
		probes:      cfg.Probes,
		now:         time.Now,
		hot:         make(map[K]time.Time),
	}
}

// Close ends every wait in the table (with Config.Closed), and every later
// one. It is called once.
func (t *Table[K, C, H, R]) Close() { close(t.closing) }

// MarkHot records that a session of another process holds or waits for k
// now (see HotFor).
func (t *Table[K, C, H, R]) MarkHot(k K) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	if _, ok := t.hot[k]; !ok && len(t.hot) >= maxHot {
		for h, at := range t.hot {
			if now.Sub(at) >= HotFor {
				delete(t.hot, h)
			}
		}
		if len(t.hot) >= maxHot {
			clear(t.hot)
		}
	}
	t.hot[k] = now
}

// IsHot reports whether a session of another process was seen to contend
// for k lately (see HotFor).
func (t *Table[K, C, H, R]) IsHot(k K) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	at, ok := t.hot[k]
	return ok && t.now().Sub(at) < HotFor
}

// relayable reports whether the first goroutine queued for e can be handed
// the turn with a wait in the server's queue (see Table.RelayTo): one that
// blocks for an exclusive hold and is not a Leader's campaign (whose wait
// holds no waiting place). t.mu must be held.
func (e *Entry[K, C, H, R]) relayable() bool {
	if len(e.queue) == 0 {
		return false
	}
	w := e.queue[0]
	return w.mode == Exclusive && !w.try && !w.campaign
}

// CanRelay reports whether the first goroutine queued for e can be handed
// the turn with a wait in the server's queue (see RelayTo): one that blocks
// for an exclusive hold and is not a Leader's campaign (whose wait holds no
// waiting place).
func (t *Table[K, C, H, R]) CanRelay(e *Entry[K, C, H, R]) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return e.relayable()
}

// RelayTo ends the caller's turn on e, which no one holds, as PassTurn does,
// but hands the next goroutine, with the turn, the wait for the key that
// the caller sent to the server as it let go (AdmitRelay; the goroutine
// reads it with Relayed). It reports false, and changes nothing, when that
// goroutine cannot take it (it left meanwhile) or the table is closing.
func (t *Table[K, C, H, R]) RelayTo(e *Entry[K, C, H, R], rw R) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !e.relayable() || t.isClosing() {
		return false
	}
	var noConn C
	w := e.queue[0]
	e.queue = e.queue[1:]
	e.conn, e.lostErr, e.onLost, e.sharedTry = noConn, nil, nil, false
	e.probing, e.draining = false, false
	e.relay = rw // e.turn stays true: it is w's now
	w.ch <- AdmitRelay
	t.settleTries(e)
	return true
}

// Relayed returns the wait that the owner of e's turn was handed with it
// (AdmitRelay), and forgets it.
func (t *Table[K, C, H, R]) Relayed(e *Entry[K, C, H, R]) R {
	t.mu.Lock()
	defer t.mu.Unlock()
	var none R
	rw := e.relay
	e.relay = none
	return rw
}

// joinable reports whether a shared request may join e's hold now. t.mu must
// be held.
func (t *Table[K, C, H, R]) joinable(e *Entry[K, C, H, R]) bool {
	return e.holders > 0 && !e.turn && e.mode == Shared && e.lostErr == nil && !e.draining
}

// Enter queues for key k, for a Leader's campaign (campaign true) or another
// acquire. With wait false it does not wait for a holder: a key that another
// Lock of the process holds, or is taking, is busy, except that a shared try
// waits for the answer of a shared try in flight (see Config.SharedTries).
// With wait true it blocks until the caller is let in or ctx ends (then the
// error is ctx's and nothing is held; but for a turn relayed to the caller
// just as ctx ended, returned as AdmitRelay with the error: the caller
// settles the wait that came with it, and passes the turn on). A wait that
// the table's Close ends fails with Config.Closed.
func (t *Table[K, C, H, R]) Enter(ctx context.Context, k K, mode Mode, wait, campaign bool) (*Entry[K, C, H, R], Admission, error) {
	t.mu.Lock()
	e := t.m[k]
	if e == nil {
		e = &Entry[K, C, H, R]{key: k, turn: true, sharedTry: t.sharedTries && mode == Shared}
		t.m[k] = e
		t.mu.Unlock()
		return e, AdmitTurn, nil
	}
	// Shared holders join a shared hold, unless someone queues before them
	// (an exclusive waiter must not starve).
	if mode == Shared && len(e.queue) == 0 && t.joinable(e) {
		adm := AdmitJoined
		if !e.probing && t.now().Sub(e.checked) >= SharedJoinRecheck {
			if t.probes {
				// This joiner checks the server's queue for the hold
				// (and joins meanwhile: a probe costs the holders nothing).
				e.probing, adm = true, AdmitProbe
			} else {
				e.draining = true
			}
		}
		if !e.draining {
			e.holders++
			t.mu.Unlock()
			return e, adm, nil
		}
	}
	if !wait && !(mode == Shared && e.sharedTry && onlyShared(e.queue)) {
		t.mu.Unlock()
		return e, AdmitBusy, nil
	}
	w := &waiter{mode: mode, try: !wait, campaign: campaign, ch: make(chan Admission, 1)}
	e.queue = append(e.queue, w)
	t.mu.Unlock()

	select {
	case adm := <-w.ch:
		return e, adm, nil
	case <-ctx.Done():
	case <-t.closing:
	}
	err := ctx.Err()
	if err == nil {
		err = t.closedErr
	}
	t.mu.Lock()
	for i, q := range e.queue {
		if q == w {
			e.queue = append(e.queue[:i], e.queue[i+1:]...)
			// Shared waiters queued behind w (an exclusive waiter that left)
			// join the shared hold they were kept out of; not once the
			// table closes (they are leaving too).
			if !t.isClosing() {
				t.admitShared(e)
			}
			t.dropIfIdle(e)
			t.mu.Unlock()
			return nil, 0, err
		}
	}
	t.mu.Unlock()
	// Let in just as ctx ended: a grant that came first stands; a turn is
	// passed on (a relayed one by the caller, which settles its wait).
	switch adm := <-w.ch; adm {
	case AdmitJoined, AdmitProbe:
		return e, adm, nil
	case AdmitTurn:
		t.PassTurn(e)
	case AdmitRelay:
		return e, adm, err
	}
	return nil, 0, err
}

func onlyShared(q []*waiter) bool {
	for _, w := range q {
		if w.mode != Shared {
			return false
		}
	}
	return true
}

// settleTries tells the tries queued on e that the key is busy, unless a
// shared try is in flight to answer them. t.mu must be held.
func (t *Table[K, C, H, R]) settleTries(e *Entry[K, C, H, R]) {
	if e.sharedTry {
		return
	}
	q := e.queue[:0]
	for _, w := range e.queue {
		if w.try {
			w.ch <- AdmitBusy
			continue
		}
		q = append(q, w)
	}
	clear(e.queue[len(q):])
	e.queue = q
}

// Tried records that the owner of e's turn did not get the key with the
// non-blocking function and goes on to wait for it in the server: the tries
// queued on e are answered busy.
func (t *Table[K, C, H, R]) Tried(e *Entry[K, C, H, R]) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e.sharedTry = false
	t.settleTries(e)
}

// Granted records that the owner of e's turn now holds the server's lock in
// mode, on conn (the zero C outside the multiplexer), and lets in the shared
// waiters at the head of the queue when mode is Shared. When conn was lost
// before the grant could be recorded, nothing is held: Granted reports false
// and the caller keeps the turn.
func (t *Table[K, C, H, R]) Granted(e *Entry[K, C, H, R], mode Mode, conn C) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if lost(conn) {
		return false
	}
	e.turn, e.holders, e.mode, e.conn, e.lostErr, e.sharedTry = false, 1, mode, conn, nil, false
	e.checked, e.probing, e.draining = t.now(), false, false
	t.admitShared(e)
	t.settleTries(e)
	return true
}

// admitShared lets the shared waiters at the head of e's queue join e's
// shared hold, if it may be joined, under the rule of a new joiner (see
// SharedJoinRecheck): past the recheck, the first one let in probes (or, with
// probes off, the hold starts draining and they stay queued). t.mu must be
// held.
func (t *Table[K, C, H, R]) admitShared(e *Entry[K, C, H, R]) {
	for len(e.queue) > 0 && e.queue[0].mode == Shared && t.joinable(e) {
		adm := AdmitJoined
		if !e.probing && t.now().Sub(e.checked) >= SharedJoinRecheck {
			if !t.probes {
				e.draining = true
				return
			}
			e.probing, adm = true, AdmitProbe
		}
		w := e.queue[0]
		e.queue = e.queue[1:]
		e.holders++
		w.ch <- adm
	}
}

// isClosing reports whether the table is closing. t.mu must be held.
func (t *Table[K, C, H, R]) isClosing() bool {
	select {
	case <-t.closing:
		return true
	default:
		return false
	}
}

// Probed records the answer of the probe that an AdmitProbe asked for:
// whether a session of another process waits for e's key in Exclusive mode
// (then the hold drains: no one joins it any more), or the probe could not
// tell (ok false: the next joiner probes again).
func (t *Table[K, C, H, R]) Probed(e *Entry[K, C, H, R], exclusiveWaits, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e.probing = false
	switch {
	case !ok:
	case exclusiveWaits:
		e.draining = true
	default:
		e.checked = t.now()
	}
}

// NextExclusive reports whether the first goroutine queued for e waits for
// an exclusive hold, and whether it is a Leader's campaign.
func (t *Table[K, C, H, R]) NextExclusive(e *Entry[K, C, H, R]) (exclusive, campaign bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(e.queue) == 0 || e.queue[0].mode != Exclusive {
		return false, false
	}
	return true, e.queue[0].campaign
}

// HandOff gives the exclusive hold that the owner of e's turn has (on conn)
// to the first goroutine queued, if it waits for an exclusive hold and
// accept(its campaign flag) says yes, and reports whether it did. It does
// not when conn was lost meanwhile (lost reports it): the hold is gone with
// the connection.
func (t *Table[K, C, H, R]) HandOff(e *Entry[K, C, H, R], conn C, accept func(campaign bool) bool) (handed, wasLost bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if lost(conn) {
		return false, true
	}
	if len(e.queue) == 0 || e.queue[0].mode != Exclusive || !accept(e.queue[0].campaign) {
		return false, false
	}
	w := e.queue[0]
	e.queue = e.queue[1:]
	e.turn, e.holders, e.mode, e.conn, e.lostErr, e.sharedTry = false, 1, Exclusive, conn, nil, false
	e.probing, e.draining = false, false
	w.ch <- AdmitJoined
	t.settleTries(e)
	return true, false
}

// Leave ends one local hold of e. It reports whether it was the last: then
// the caller owns e's turn, must give back the server's lock, and then call
// PassTurn.
func (t *Table[K, C, H, R]) Leave(e *Entry[K, C, H, R]) (last bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e.holders--
	if e.holders > 0 {
		return false
	}
	e.turn = true
	return true
}

// PassTurn ends the caller's turn on e, which no one holds: the next waiter
// gets the turn, or the entry is deleted.
func (t *Table[K, C, H, R]) PassTurn(e *Entry[K, C, H, R]) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var noConn C
	e.turn, e.conn, e.lostErr, e.onLost, e.sharedTry = false, noConn, nil, nil, false
	e.probing, e.draining = false, false
	if len(e.queue) > 0 {
		w := e.queue[0]
		e.queue = e.queue[1:]
		e.turn = true
		e.sharedTry = t.sharedTries && w.mode == Shared
		w.ch <- AdmitTurn
	}
	t.settleTries(e)
	t.dropIfIdle(e)
}

// dropIfIdle deletes e when nobody holds, takes or waits for it. t.mu must
// be held.
func (t *Table[K, C, H, R]) dropIfIdle(e *Entry[K, C, H, R]) {
	if e.holders == 0 && !e.turn && len(e.queue) == 0 && t.m[e.key] == e {
		delete(t.m, e.key)
	}
}

// Counts returns the number of keys held and of goroutines queued.
func (t *Table[K, C, H, R]) Counts() (held, queued int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, e := range t.m {
		if e.holders > 0 {
			held++
		}
		queued += len(e.queue)
	}
	return held, queued
}
