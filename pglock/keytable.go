package pglock

import (
	"context"
	"sync"
	"time"
)

// keyTable is a Locker's in-process table of keys. PostgreSQL stacks the
// locks of one session (a session that takes a key twice holds it twice), so
// when many Locks share a session, exclusion among them is the table's job:
// at most one goroutine at a time (the key's "turn") takes or gives back the
// server's lock on a key, the others queue behind it in FIFO order, and
// shared holders in the process share one server-side shared lock,
// reference counted.
//
// An entry exists while a key is held, taken or queued for; it is deleted
// when the last of them is gone.
type keyTable struct {
	mu sync.Mutex
	m  map[Key]*keyEntry
	// closing is closed when the Locker closes: queued goroutines give up.
	closing chan struct{}
	// sharedTries: a shared TryAcquire that finds a shared try of the same
	// key in flight waits for its answer instead of calling the key busy
	// (the multiplexer, whose tries never block, sets it).
	sharedTries bool
	// probes: a shared hold that has let others join for sharedJoinRecheck
	// is checked for exclusive waiters of other sessions before more join
	// (see keyEntry.checked); the multiplexer sets it. Without it (or when
	// a probe cannot be made), joins stop after sharedJoinRecheck until the
	// hold drains.
	probes bool
	// now is the clock (time.Now; tests may set another).
	now func() time.Time
	// hot records the keys that a session of another process was seen to
	// hold or wait for lately (see markHot), with when.
	hot map[Key]time.Time
}

// hotFor is how long a key counts as contended by another process after the
// last sign of it (see keyTable.markHot): a try or a wait that found it
// taken or waited for, or a retake that the server gave to another session.
// While it is hot, the multiplexer keeps the process in the server's queue
// for it as a process with a session per waiter would: a blocking acquire
// waits there at once, without trying first (see mux.takeHot), and a holder
// that lets go queues the next goroutine's wait in the same write as its
// unlock (see mux.relay). Past it, the next try, wait or retake looks again.
const hotFor = time.Second

// maxHot bounds the keys recorded as hot; past it the stale ones are
// dropped, and then all of them.
const maxHot = 1024

// sharedJoinRecheck is how long a shared hold lets other shared holders of
// the process join it without checking that no session of another process
// waits for the key in Exclusive mode. PostgreSQL queues a new shared request
// behind a waiting exclusive one, so that readers cannot starve a writer;
// local holders that join an existing hold bypass the server's queue, so the
// process checks it for them (see mux.probe): an exclusive waiter elsewhere
// waits for at most about this long plus the holds under way.
const sharedJoinRecheck = 100 * time.Millisecond

// keyEntry is one key of a keyTable. Its fields are guarded by the table's
// mutex (the owner of the turn may read conn without it).
type keyEntry struct {
	key     Key
	holders int  // local holders of the server's lock (more than 1 only in Shared mode)
	mode    Mode // the holders' mode
	turn    bool // a goroutine is taking or giving back the server's lock
	// sharedTry: the owner of the turn is trying the key in Shared mode (the
	// non-blocking step): a shared try can wait for its answer.
	sharedTry bool
	queue     []*keyWaiter

	// For a shared hold: when it was last known that no session of another
	// process waited for the key in Exclusive mode (its grant, or the last
	// probe); whether a probe is under way; and whether one found such a
	// waiter (draining: no one joins any more, the hold ends when its
	// holders leave, and the server's queue decides who is next).
	checked  time.Time
	probing  bool
	draining bool

	// Used by the multiplexer (mux.go): where the server's lock lives, and
	// whether that connection was lost.
	conn    *lockConn
	lostErr error
	onLost  []lostHook // one per holder watching for the loss
	// relay is the wait in the server's queue that the owner of the turn
	// was handed with it (admitRelay, see relayTo).
	relay *relayWait
}

// lostHook is a holder's function to call when its key is lost.
type lostHook struct {
	b  *muxBackend
	fn func(error)
}

// dropHook removes b's hook from e. t.mu must be held.
func (e *keyEntry) dropHook(b *muxBackend) {
	for i, h := range e.onLost {
		if h.b == b {
			e.onLost = append(e.onLost[:i], e.onLost[i+1:]...)
			return
		}
	}
}

// keyWaiter is a goroutine queued for a key. It is told once, on ch, that it
// now holds the key (admitJoined), that it has the turn (admitTurn), or, for
// a non-blocking acquire (try), that the key is busy (admitBusy).
type keyWaiter struct {
	mode Mode
	try  bool
	// campaign: a Leader's wait (see config.campaign), which holds no place
	// among the waiting connections; a hand-off respects it (see handOff).
	campaign bool
	ch       chan admission
}

// admission is how enter let a caller in.
type admission int

const (
	admitTurn   admission = iota // take the server's lock, then call granted or passTurn
	admitJoined                  // holds the key as a shared co-holder: no statement needed
	admitBusy                    // held by another Lock of the process (only when !wait)
	// admitProbe: joined, as admitJoined, and the caller must now check for
	// exclusive waiters of other sessions (see sharedJoinRecheck) and call
	// probed.
	admitProbe
	// admitRelay: the turn, with a wait for the key already in the server's
	// queue (see relayTo): finish it (see relayed), then call granted or
	// passTurn.
	admitRelay
)

func newKeyTable() *keyTable {
	return &keyTable{m: make(map[Key]*keyEntry), closing: make(chan struct{}), now: time.Now, hot: make(map[Key]time.Time)}
}

// markHot records that a session of another process holds or waits for k
// now (see hotFor).
func (t *keyTable) markHot(k Key) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	if _, ok := t.hot[k]; !ok && len(t.hot) >= maxHot {
		for h, at := range t.hot {
			if now.Sub(at) >= hotFor {
				delete(t.hot, h)
			}
		}
		if len(t.hot) >= maxHot {
			clear(t.hot)
		}
	}
	t.hot[k] = now
}

// isHot reports whether a session of another process was seen to contend
// for k lately (see hotFor).
func (t *keyTable) isHot(k Key) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	at, ok := t.hot[k]
	return ok && t.now().Sub(at) < hotFor
}

// relayable reports whether the first goroutine queued for e can be handed
// the turn with a wait in the server's queue (see relayTo): one that blocks
// for an exclusive hold and is not a Leader's campaign (whose wait holds no
// waiting place). t.mu must be held.
func relayable(e *keyEntry) bool {
	if len(e.queue) == 0 {
		return false
	}
	w := e.queue[0]
	return w.mode == Exclusive && !w.try && !w.campaign
}

// canRelay is relayable for a caller that does not hold t.mu.
func (t *keyTable) canRelay(e *keyEntry) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return relayable(e)
}

// relayTo ends the caller's turn on e, which no one holds, as passTurn does,
// but hands the next goroutine, with the turn, the wait for the key that
// the caller sent to the server as it let go (admitRelay; the goroutine
// reads it with relayed). It reports false, and changes nothing, when that
// goroutine cannot take it (it left meanwhile) or the table is closing.
func (t *keyTable) relayTo(e *keyEntry, rw *relayWait) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !relayable(e) || t.isClosing() {
		return false
	}
	w := e.queue[0]
	e.queue = e.queue[1:]
	e.conn, e.lostErr, e.onLost, e.sharedTry = nil, nil, nil, false
	e.probing, e.draining = false, false
	e.relay = rw // e.turn stays true: it is w's now
	w.ch <- admitRelay
	t.settleTries(e)
	return true
}

// relayed returns the wait that the owner of e's turn was handed with it
// (admitRelay), and forgets it.
func (t *keyTable) relayed(e *keyEntry) *relayWait {
	t.mu.Lock()
	defer t.mu.Unlock()
	rw := e.relay
	e.relay = nil
	return rw
}

// joinable reports whether a shared request may join e's hold now. t.mu must
// be held.
func (t *keyTable) joinable(e *keyEntry) bool {
	return e.holders > 0 && !e.turn && e.mode == Shared && e.lostErr == nil && !e.draining
}

// enter queues for key k. With wait false it does not wait for a holder: a
// key that another Lock of the process holds, or is taking, is busy, except
// that a shared try waits for the answer of a shared try in flight (see
// keyTable.sharedTries). With wait true it blocks until the caller is let in
// or ctx ends (then the error is ctx's and nothing is held; but for a turn
// relayed to the caller just as ctx ended, returned as admitRelay with the
// error: the caller settles the wait that came with it, and passes the turn
// on).
func (t *keyTable) enter(ctx context.Context, k Key, mode Mode, wait bool) (*keyEntry, admission, error) {
	return t.enterAs(ctx, k, mode, wait, false)
}

// enterAs is enter for a Leader's campaign (campaign true) or another
// acquire.
func (t *keyTable) enterAs(ctx context.Context, k Key, mode Mode, wait, campaign bool) (*keyEntry, admission, error) {
	t.mu.Lock()
	e := t.m[k]
	if e == nil {
		e = &keyEntry{key: k, turn: true, sharedTry: t.sharedTries && mode == Shared}
		t.m[k] = e
		t.mu.Unlock()
		return e, admitTurn, nil
	}
	// Shared holders join a shared hold, unless someone queues before them
	// (an exclusive waiter must not starve).
	if mode == Shared && len(e.queue) == 0 && t.joinable(e) {
		adm := admitJoined
		if !e.probing && t.now().Sub(e.checked) >= sharedJoinRecheck {
			if t.probes {
				// This joiner checks the server's queue for the hold
				// (and joins meanwhile: a probe costs the holders nothing).
				e.probing, adm = true, admitProbe
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
		return e, admitBusy, nil
	}
	w := &keyWaiter{mode: mode, try: !wait, campaign: campaign, ch: make(chan admission, 1)}
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
		err = ErrLockerClosed
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
	case admitJoined, admitProbe:
		return e, adm, nil
	case admitTurn:
		t.passTurn(e)
	case admitRelay:
		return e, adm, err
	}
	return nil, 0, err
}

func onlyShared(q []*keyWaiter) bool {
	for _, w := range q {
		if w.mode != Shared {
			return false
		}
	}
	return true
}

// settleTries tells the tries queued on e that the key is busy, unless a
// shared try is in flight to answer them. t.mu must be held.
func (t *keyTable) settleTries(e *keyEntry) {
	if e.sharedTry {
		return
	}
	q := e.queue[:0]
	for _, w := range e.queue {
		if w.try {
			w.ch <- admitBusy
			continue
		}
		q = append(q, w)
	}
	clear(e.queue[len(q):])
	e.queue = q
}

// tried records that the owner of e's turn did not get the key with the
// non-blocking function and goes on to wait for it in the server: the tries
// queued on e are answered busy.
func (t *keyTable) tried(e *keyEntry) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e.sharedTry = false
	t.settleTries(e)
}

// granted records that the owner of e's turn now holds the server's lock in
// mode, on conn (nil outside the multiplexer), and lets in the shared
// waiters at the head of the queue when mode is Shared. When conn was lost
// before the grant could be recorded, nothing is held: granted reports false
// and the caller keeps the turn.
func (t *keyTable) granted(e *keyEntry, mode Mode, conn *lockConn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if conn != nil && conn.lost != nil {
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
// sharedJoinRecheck): past the recheck, the first one let in probes (or, with
// probes off, the hold starts draining and they stay queued). t.mu must be
// held.
func (t *keyTable) admitShared(e *keyEntry) {
	for len(e.queue) > 0 && e.queue[0].mode == Shared && t.joinable(e) {
		adm := admitJoined
		if !e.probing && t.now().Sub(e.checked) >= sharedJoinRecheck {
			if !t.probes {
				e.draining = true
				return
			}
			e.probing, adm = true, admitProbe
		}
		w := e.queue[0]
		e.queue = e.queue[1:]
		e.holders++
		w.ch <- adm
	}
}

// isClosing reports whether the table is closing. t.mu must be held.
func (t *keyTable) isClosing() bool {
	select {
	case <-t.closing:
		return true
	default:
		return false
	}
}

// probed records the answer of the probe that an admitProbe asked for:
// whether a session of another process waits for e's key in Exclusive mode
// (then the hold drains: no one joins it any more), or the probe could not
// tell (ok false: the next joiner probes again).
func (t *keyTable) probed(e *keyEntry, exclusiveWaits, ok bool) {
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

// nextExclusive reports whether the first goroutine queued for e waits for
// an exclusive hold, and whether it is a Leader's campaign.
func (t *keyTable) nextExclusive(e *keyEntry) (exclusive, campaign bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(e.queue) == 0 || e.queue[0].mode != Exclusive {
		return false, false
	}
	return true, e.queue[0].campaign
}

// handOff gives the exclusive hold that the owner of e's turn has (on conn)
// to the first goroutine queued, if it waits for an exclusive hold and
// accept(its campaign flag) says yes, and reports whether it did. It does
// not when conn was lost meanwhile (lost reports it): the hold is gone with
// the connection.
func (t *keyTable) handOff(e *keyEntry, conn *lockConn, accept func(campaign bool) bool) (handed, lost bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if conn != nil && conn.lost != nil {
		return false, true
	}
	if len(e.queue) == 0 || e.queue[0].mode != Exclusive || !accept(e.queue[0].campaign) {
		return false, false
	}
	w := e.queue[0]
	e.queue = e.queue[1:]
	e.turn, e.holders, e.mode, e.conn, e.lostErr, e.sharedTry = false, 1, Exclusive, conn, nil, false
	e.probing, e.draining = false, false
	w.ch <- admitJoined
	t.settleTries(e)
	return true, false
}

// leave ends one local hold of e. It reports whether it was the last: then
// the caller owns e's turn, must give back the server's lock, and then call
// passTurn.
func (t *keyTable) leave(e *keyEntry) (last bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e.holders--
	if e.holders > 0 {
		return false
	}
	e.turn = true
	return true
}

// passTurn ends the caller's turn on e, which no one holds: the next waiter
// gets the turn, or the entry is deleted.
func (t *keyTable) passTurn(e *keyEntry) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e.turn, e.conn, e.lostErr, e.onLost, e.sharedTry = false, nil, nil, nil, false
	e.probing, e.draining = false, false
	if len(e.queue) > 0 {
		w := e.queue[0]
		e.queue = e.queue[1:]
		e.turn = true
		e.sharedTry = t.sharedTries && w.mode == Shared
		w.ch <- admitTurn
	}
	t.settleTries(e)
	t.dropIfIdle(e)
}

// dropIfIdle deletes e when nobody holds, takes or waits for it. t.mu must
// be held.
func (t *keyTable) dropIfIdle(e *keyEntry) {
	if e.holders == 0 && !e.turn && len(e.queue) == 0 && t.m[e.key] == e {
		delete(t.m, e.key)
	}
}

// counts returns the number of keys held and of goroutines queued.
func (t *keyTable) counts() (held, queued int) {
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
