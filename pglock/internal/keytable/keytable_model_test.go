package keytable

// A model-based randomized test of Table (keytable.go, conn.go): simulated actors
// enter, take, hold, hand off and give back a few keys, in random order, each
// blocking enter in its own goroutine, and after every step the table is
// compared with a plain reference model (mState) and checked for invariants.
//
// A step is one operation of the driver (an enter, a turn owner's granted,
// tried, passTurn or handOff, a leave, a probed, a cancelled context, a lost
// hold, the fake clock moving on, Close), or a cancellation together with an
// operation that may let the cancelled waiter in at the same time. After it
// the driver waits until every enter under way has returned or waits in its
// key's queue, then checks the table's own invariants (no turn and holders at
// once, one exclusive holder, no idle entry, no shared waiter at the head of
// a joinable shared hold) and looks for an outcome of the model, among every
// order in which the woken enters and the driver's calls may have run, that
// matches the table (holders, mode, turn, queue in FIFO order, probe state,
// loss) and what each enter and call returned. The model's outcome becomes
// the next step's starting point.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

const (
	mKeys   = 3
	mActors = 5
)

// What an actor is doing, in the model.
const (
	stIdle      = iota
	stWaiting   // queued in enter
	stDelivered // woken (ctx or Close) and let in at the same time: its enter decides
	stRacePass  // woken and given the turn: its enter passes the turn on, then fails
	stTurn      // owns its key's turn
	stHolding   // holds its key
)

// The phases of a turn.
const (
	phTry  = iota // the non-blocking step
	phWait        // after tried: waiting in the server
	phGive        // after the last leave: giving the server's lock back
)

type mActor struct {
	st, phase, key int
	mode           Mode
	wait           bool
	probeDue       bool   // joined with AdmitProbe, has not called Probed yet
	cancelled      bool   // the ctx of its enter ended
	woken          bool   // its enter was woken by ctx or Close
	adm            string // stDelivered: what it was let in with
}

type mEntry struct {
	holders           int
	mode              Mode
	turn, sharedTry   bool
	queue             []int // actors
	checked           int64 // on the fake clock
	probing, draining bool
	conn              int // the hold's connection (0: nil)
	lost              bool
}

// mOp is one operation of the driver.
type mOp struct {
	kind     string
	a, k     int
	mode     Mode
	wait     bool
	conn     int  // grant: the connection (0: nil)
	lostConn bool // grant: the connection was lost before the grant was recorded
	excl, ok bool // probed
	d        time.Duration
}

func (op mOp) String() string {
	switch op.kind {
	case "enter":
		w := "wait"
		if !op.wait {
			w = "try"
		}
		return fmt.Sprintf("a%d enter k%d %s %s", op.a, op.k, modeName(op.mode), w)
	case "grant":
		return fmt.Sprintf("a%d granted conn=%d lostConn=%v", op.a, op.conn, op.lostConn)
	case "probed":
		return fmt.Sprintf("a%d probed exclusiveWaits=%v ok=%v", op.a, op.excl, op.ok)
	case "lose":
		return fmt.Sprintf("lose k%d", op.k)
	case "clock":
		return fmt.Sprintf("clock +%v", op.d)
	case "close":
		return "close"
	}
	return fmt.Sprintf("a%d %s", op.a, op.kind)
}

func modeName(m Mode) string {
	if m == Shared {
		return "S"
	}
	return "X"
}

// mState is the reference model: the table's keys, the actors, and what this
// step told whom.
type mState struct {
	sharedTries, probes bool
	now                 int64
	closed              bool
	keys                [mKeys]*mEntry
	act                 [mActors]mActor
	out                 [mActors]string // this step: what enter returned
	ret                 string          // this step: what the driver's call returned
	ops                 []mOp           // this step's driver operations
	next                int             // the next of ops to apply
	// Woken enters that were let in at the same time (the race path).
	raced int
}

func (s *mState) clone() *mState {
	c := *s
	for k, e := range s.keys {
		if e != nil {
			ce := *e
			ce.queue = append([]int(nil), e.queue...)
			c.keys[k] = &ce
		}
	}
	return &c
}

func (s *mState) joinable(e *mEntry) bool {
	return e.holders > 0 && !e.turn && e.mode == Shared && !e.lost && !e.draining
}

func (s *mState) errName(a int) string {
	if s.act[a].cancelled {
		return "err:canceled"
	}
	return "err:closed"
}

// admit tells actor a, queued, that it is let in.
func (s *mState) admit(a int, adm string) {
	x := &s.act[a]
	if x.woken {
		x.st, x.adm = stDelivered, adm
		return
	}
	s.out[a] = adm
	switch adm {
	case "turn":
		x.st, x.phase = stTurn, phTry
	case "joined":
		x.st = stHolding
	case "probe":
		x.st, x.probeDue = stHolding, true
	case "busy":
		x.st = stIdle
	}
}

func (s *mState) enter(a, k int, mode Mode, wait bool) {
	s.act[a] = mActor{st: stIdle, key: k, mode: mode, wait: wait}
	e := s.keys[k]
	if e == nil {
		s.keys[k] = &mEntry{turn: true, sharedTry: s.sharedTries && mode == Shared}
		s.admit(a, "turn")
		return
	}
	if mode == Shared && len(e.queue) == 0 && s.joinable(e) {
		adm := "joined"
		if !e.probing && s.now-e.checked >= int64(SharedJoinRecheck) {
			if s.probes {
				e.probing, adm = true, "probe"
			} else {
				e.draining = true
			}
		}
		if !e.draining {
			e.holders++
			s.out[a] = adm
			s.act[a].st, s.act[a].probeDue = stHolding, adm == "probe"
			return
		}
	}
	if !wait && !(mode == Shared && e.sharedTry && s.onlyShared(e.queue)) {
		s.out[a] = "busy"
		return
	}
	e.queue = append(e.queue, a)
	s.act[a].st, s.act[a].woken = stWaiting, s.closed
}

func (s *mState) onlyShared(q []int) bool {
	for _, a := range q {
		if s.act[a].mode != Shared {
			return false
		}
	}
	return true
}

func (s *mState) admitShared(k int) {
	e := s.keys[k]
	for len(e.queue) > 0 && s.act[e.queue[0]].mode == Shared && s.joinable(e) {
		adm := "joined"
		if !e.probing && s.now-e.checked >= int64(SharedJoinRecheck) {
			if !s.probes {
				e.draining = true
				return
			}
			e.probing, adm = true, "probe"
		}
		a := e.queue[0]
		e.queue = e.queue[1:]
		e.holders++
		s.admit(a, adm)
	}
}

func (s *mState) settleTries(k int) {
	e := s.keys[k]
	if e.sharedTry {
		return
	}
	var q []int
	for _, a := range e.queue {
		if !s.act[a].wait {
			s.admit(a, "busy")
			continue
		}
		q = append(q, a)
	}
	e.queue = q
}

func (s *mState) dropIfIdle(k int) {
	if e := s.keys[k]; e.holders == 0 && !e.turn && len(e.queue) == 0 {
		s.keys[k] = nil
	}
}

func (s *mState) passTurn(k int) {
	e := s.keys[k]
	e.turn, e.conn, e.lost, e.sharedTry, e.probing, e.draining = false, 0, false, false, false, false
	if len(e.queue) > 0 {
		a := e.queue[0]
		e.queue = e.queue[1:]
		e.turn, e.sharedTry = true, s.sharedTries && s.act[a].mode == Shared
		s.admit(a, "turn")
	}
	s.settleTries(k)
	s.dropIfIdle(k)
}

// leaveQueue: a woken actor takes itself out of the queue.
func (s *mState) leaveQueue(a int) {
	k := s.act[a].key
	e := s.keys[k]
	for i, q := range e.queue {
		if q == a {
			e.queue = append(e.queue[:i:i], e.queue[i+1:]...)
		}
	}
	s.out[a], s.act[a].st = s.errName(a), stIdle
	if !s.closed {
		s.admitShared(k)
	}
	s.dropIfIdle(k)
}

// apply applies one driver operation.
func (s *mState) apply(op mOp) {
	x := &s.act[op.a]
	var e *mEntry
	switch op.kind {
	case "grant", "tried", "pass", "leave", "handOff", "probed":
		e = s.keys[x.key]
	}
	switch op.kind {
	case "enter":
		s.enter(op.a, op.k, op.mode, op.wait)
	case "grant":
		if op.lostConn {
			s.ret = "false"
			return
		}
		s.ret = "true"
		e.turn, e.holders, e.mode, e.conn, e.lost, e.sharedTry = false, 1, x.mode, op.conn, false, false
		e.checked, e.probing, e.draining = s.now, false, false
		x.st = stHolding
		s.admitShared(x.key)
		s.settleTries(x.key)
	case "tried":
		e.sharedTry = false
		x.phase = phWait
		s.settleTries(x.key)
	case "pass":
		x.st = stIdle
		s.passTurn(x.key)
	case "leave":
		e.holders--
		if e.holders > 0 {
			s.ret, x.st = "more", stIdle
			return
		}
		s.ret, e.turn, x.st, x.phase = "last", true, stTurn, phGive
	case "handOff":
		switch {
		case e.conn != 0 && e.lost:
			s.ret = "lost"
		case len(e.queue) == 0 || s.act[e.queue[0]].mode != Exclusive:
			s.ret = "no"
		default:
			s.ret = "handed"
			a := e.queue[0]
			e.queue = e.queue[1:]
			e.turn, e.holders, e.mode, e.lost, e.sharedTry = false, 1, Exclusive, false, false
			e.probing, e.draining = false, false
			x.st = stIdle
			s.admit(a, "joined")
			s.settleTries(x.key)
		}
	case "probed":
		x.probeDue = false
		e.probing = false
		switch {
		case !op.ok:
		case op.excl:
			e.draining = true
		default:
			e.checked = s.now
		}
	case "lose":
		s.keys[op.k].lost = true
	case "clock":
		s.now += int64(op.d)
	case "close":
		s.closed = true
		for a := range s.act {
			if s.act[a].st == stWaiting {
				s.act[a].woken = true
			}
		}
	case "cancel":
		x.cancelled, x.woken = true, true
	}
}

// expand settles the enters that were woken and let in at once: either
// outcome of their select may happen.
func (s *mState) expand() []*mState {
	for a := range s.act {
		x := &s.act[a]
		if x.st != stDelivered {
			continue
		}
		var out []*mState
		s.raced++
		switch x.adm {
		case "joined", "probe":
			s.out[a], x.st, x.probeDue = x.adm, stHolding, x.adm == "probe"
			return s.expand()
		case "turn": // returns the turn, or passes it on and fails
			c := s.clone()
			c.out[a], c.act[a].st, c.act[a].phase = "turn", stTurn, phTry
			out = append(out, c.expand()...)
			c = s.clone()
			c.act[a].st = stRacePass
			out = append(out, c.expand()...)
		case "busy":
			c := s.clone()
			c.out[a], c.act[a].st = "busy", stIdle
			out = append(out, c.expand()...)
			c = s.clone()
			c.out[a], c.act[a].st = c.errName(a), stIdle
			out = append(out, c.expand()...)
		}
		return out
	}
	return []*mState{s}
}

// events lists what may happen next: the next driver operation, or a woken
// enter's own step (-1-a: leave the queue; -100-a: pass the turn on).
func (s *mState) events() []int {
	var ev []int
	if s.next < len(s.ops) {
		ev = append(ev, s.next)
	}
	for a := range s.act {
		switch x := s.act[a]; {
		case x.st == stWaiting && x.woken:
			ev = append(ev, -1-a)
		case x.st == stRacePass:
			ev = append(ev, -100-a)
		}
	}
	return ev
}

func (s *mState) event(ev int) {
	switch {
	case ev >= 0:
		s.next++
		s.apply(s.ops[ev])
	case ev > -100:
		s.leaveQueue(-1 - ev)
	default:
		a := -100 - ev
		s.out[a], s.act[a].st = s.errName(a), stIdle
		s.passTurn(s.act[a].key)
	}
}

// explore runs every interleaving of this step's events and calls fin with
// each final state until it returns true.
func (s *mState) explore(fin func(*mState) bool) bool {
	for _, st := range s.expand() {
		evs := st.events()
		if len(evs) == 0 {
			if fin(st) {
				return true
			}
			continue
		}
		for i, ev := range evs {
			c := st
			if i < len(evs)-1 {
				c = st.clone()
			}
			c.event(ev)
			if c.explore(fin) {
				return true
			}
		}
	}
	return false
}

func (s *mState) dump() string {
	var b strings.Builder
	fmt.Fprintf(&b, "now=%v closed=%v next=%d ret=%q\n", time.Duration(s.now), s.closed, s.next, s.ret)
	for k, e := range s.keys {
		if e != nil {
			fmt.Fprintf(&b, "  k%d: %+v\n", k, *e)
		}
	}
	for a, x := range s.act {
		fmt.Fprintf(&b, "  a%d: %+v out=%q\n", a, x, s.out[a])
	}
	return b.String()
}

// kSnap is what is compared of one key.
type kSnap struct {
	exists            bool
	holders           int
	mode              Mode
	turn, sharedTry   bool
	queue             string
	checked           int64
	probing, draining bool
	conn              int
	lost              bool
}

type snap struct {
	keys [mKeys]kSnap
	out  [mActors]string
	ret  string
}

func (s *snap) String() string {
	var b strings.Builder
	for k, e := range s.keys {
		fmt.Fprintf(&b, "  k%d: %+v\n", k, e)
	}
	fmt.Fprintf(&b, "  out=%q ret=%q", s.out, s.ret)
	return b.String()
}

func queueName(a int, mode Mode, try bool) string {
	t := ""
	if try {
		t = "t"
	}
	return fmt.Sprintf("a%d%s%s ", a, modeName(mode), t)
}

func (s *mState) snap() snap {
	var p snap
	p.out, p.ret = s.out, s.ret
	for k, e := range s.keys {
		if e == nil {
			continue
		}
		ks := kSnap{exists: true, holders: e.holders, mode: e.mode, turn: e.turn, sharedTry: e.sharedTry,
			probing: e.probing, draining: e.draining, conn: e.conn, lost: e.lost}
		for _, a := range e.queue {
			ks.queue += queueName(a, s.act[a].mode, !s.act[a].wait)
		}
		if e.holders > 0 && e.mode == Shared {
			ks.checked = e.checked
		}
		p.keys[k] = ks
	}
	return p
}

// The driver: the real table and actors.

type rActor struct {
	cancel    context.CancelFunc
	done      chan struct{}
	running   bool
	cancelled bool
	w         *waiter // its waiter, once seen in a queue
	e         *rEntry // the entry it holds or has the turn of
	// enter's results, set before done is closed
	re   *rEntry
	radm Admission
	rerr error
}

type mSource interface {
	pick(n int) int
	exhausted() bool
}

type randSource struct{ r *rand.Rand }

func (s randSource) pick(n int) int   { return s.r.IntN(n) }
func (s randSource) exhausted() bool  { return false }
func (s *byteSource) exhausted() bool { return s.i >= len(s.b) }

type byteSource struct {
	b []byte
	i int
}

func (s *byteSource) pick(n int) int {
	if s.i >= len(s.b) {
		return 0
	}
	v := int(s.b[s.i]) % n
	s.i++
	return v
}

type mRun struct {
	src      mSource
	kt       *rTable
	keys     [mKeys]int64
	base     time.Time
	clock    atomic.Int64
	conns    map[*mConn]int
	nextConn int
	act      [mActors]rActor
	waiterOf map[*waiter]int
	fresh    int // the actor whose enter started this step, or -1
	closed   bool
	model    *mState
	hist     []mStep
	list     []mOp // gen's
}

// mStep is a step of the history: its operations and what they returned.
type mStep struct {
	i   int
	ops []mOp
	out [mActors]string
	ret string
}

var (
	errModelLost   = errors.New("model: connection lost")
	errModelClosed = errors.New("model: table closed")
)

// mConn is a connection of the driver's grants.
type mConn struct{ state ConnState }

func (c *mConn) KeyTableState() *ConnState { return &c.state }

// The table under test: int64 keys, mConn connections; the model neither
// watches holds nor relays turns (holders and relays are ints, unused).
type (
	rTable = Table[int64, *mConn, int, int]
	rEntry = Entry[int64, *mConn, int, int]
)

func newMRun(src mSource) *mRun {
	r := &mRun{src: src, kt: New[int64, *mConn, int, int](Config{Closed: errModelClosed}), base: time.Unix(1_000_000, 0),
		conns: make(map[*mConn]int), waiterOf: make(map[*waiter]int), fresh: -1}
	for k := range r.keys {
		r.keys[k] = int64(1000 + k)
	}
	r.kt.now = func() time.Time { return r.base.Add(time.Duration(r.clock.Load())) }
	r.kt.sharedTries = src.pick(4) != 0
	r.kt.probes = src.pick(2) == 0
	r.model = &mState{sharedTries: r.kt.sharedTries, probes: r.kt.probes}
	return r
}

// gen picks a driver operation that the model's state allows (racy: one to
// run concurrently with a cancellation).
func (r *mRun) gen(racy bool) (mOp, bool) {
	s := r.model
	list := r.list[:0]
	defer func() { r.list = list[:0] }()
	add := func(op mOp, weight int) {
		for range weight {
			list = append(list, op)
		}
	}
	for a, x := range s.act {
		switch x.st {
		case stIdle:
			if !racy {
				add(mOp{kind: "enter", a: a}, 3)
			}
		case stWaiting:
			if !racy {
				add(mOp{kind: "cancel", a: a}, 1)
			}
		case stTurn:
			add(mOp{kind: "pass", a: a}, 1)
			switch {
			case x.phase == phGive:
				e := s.keys[x.key]
				if x.mode == Exclusive && (e.conn != 0 || !e.lost) {
					add(mOp{kind: "handOff", a: a}, 3)
				}
			default:
				add(mOp{kind: "grant", a: a}, 3)
				if x.phase == phTry && x.wait {
					add(mOp{kind: "tried", a: a}, 1)
				}
			}
		case stHolding:
			if x.probeDue {
				add(mOp{kind: "probed", a: a}, 2)
			} else {
				add(mOp{kind: "leave", a: a}, 2)
			}
		}
	}
	for k, e := range s.keys {
		if e != nil && e.conn != 0 && !e.lost {
			add(mOp{kind: "lose", k: k}, 1)
		}
	}
	if !racy {
		add(mOp{kind: "clock"}, 1)
	}
	if len(list) == 0 {
		return mOp{}, false
	}
	op := list[r.src.pick(len(list))]
	switch op.kind {
	case "enter":
		op.k, op.mode, op.wait = r.src.pick(mKeys), Mode(r.src.pick(2)), r.src.pick(4) != 0
	case "grant":
		switch r.src.pick(8) {
		case 0:
		case 1:
			r.nextConn++
			op.conn, op.lostConn = r.nextConn, true
		default:
			r.nextConn++
			op.conn = r.nextConn
		}
	case "probed":
		v := r.src.pick(3)
		op.ok, op.excl = v != 0, v == 1
	case "clock":
		op.d = []time.Duration{time.Millisecond, 40 * time.Millisecond, SharedJoinRecheck - time.Nanosecond, SharedJoinRecheck}[r.src.pick(4)]
	}
	return op, true
}

// do runs op on the real table.
func (r *mRun) do(op mOp) string {
	ra := &r.act[op.a]
	kt := r.kt
	switch op.kind {
	case "enter":
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		*ra = rActor{cancel: cancel, done: done, running: true}
		r.fresh = op.a
		key := r.keys[op.k]
		go func() {
			e, adm, err := kt.Enter(ctx, key, op.mode, op.wait, false)
			ra.re, ra.radm, ra.rerr = e, adm, err
			close(done)
		}()
	case "grant":
		var c *mConn
		if op.conn != 0 {
			c = &mConn{}
			r.conns[c] = op.conn
			if op.lostConn {
				kt.mu.Lock()
				c.state.lost = errModelLost
				kt.mu.Unlock()
			}
		}
		return fmt.Sprint(kt.Granted(ra.e, r.model.act[op.a].mode, c))
	case "tried":
		kt.Tried(ra.e)
	case "pass":
		kt.PassTurn(ra.e)
		ra.e = nil
	case "leave":
		if kt.Leave(ra.e) {
			return "last"
		}
		ra.e = nil
		return "more"
	case "handOff":
		kt.mu.Lock()
		c := ra.e.conn
		kt.mu.Unlock()
		handed, lost := kt.HandOff(ra.e, c, func(bool) bool { return true })
		switch {
		case handed:
			ra.e = nil
			return "handed"
		case lost:
			return "lost"
		}
		return "no"
	case "probed":
		kt.Probed(ra.e, op.excl, op.ok)
	case "lose":
		kt.mu.Lock()
		c := kt.m[r.keys[op.k]].conn
		kt.mu.Unlock()
		kt.LoseConn(c, errModelLost)
	case "clock":
		r.clock.Add(int64(op.d))
	case "close":
		r.closed = true
		kt.Close()
	case "cancel":
		ra.cancelled = true
		ra.cancel()
	}
	return ""
}

// quiet reports whether every enter under way has returned or waits in its
// key's queue, not woken.
func (r *mRun) quiet() (bool, error) {
	if !r.kt.mu.TryLock() {
		return false, nil
	}
	var inQueue [mActors]bool
	for _, e := range r.kt.m {
		for _, w := range e.queue {
			a, ok := r.waiterOf[w]
			if !ok {
				if r.fresh < 0 || r.act[r.fresh].w != nil {
					r.kt.mu.Unlock()
					return false, fmt.Errorf("a waiter of no enter under way is queued")
				}
				a = r.fresh
				r.waiterOf[w], r.act[a].w = a, w
			}
			inQueue[a] = true
		}
	}
	r.kt.mu.Unlock()
	for a := range r.act {
		ra := &r.act[a]
		if !ra.running {
			continue
		}
		select {
		case <-ra.done:
			continue
		default:
		}
		if inQueue[a] && !ra.cancelled && !r.closed {
			continue
		}
		return false, nil
	}
	return true, nil
}

func (r *mRun) settle() error {
	deadline := time.Now().Add(10 * time.Second)
	for spins := 0; ; spins++ {
		ok, err := r.quiet()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not quiescent after 10s: an enter hangs, or the table's mutex is held")
		}
		if spins < 200 {
			runtime.Gosched()
		} else {
			time.Sleep(10 * time.Microsecond)
		}
	}
}

// observe collects what the enters that returned said, and the table.
func (r *mRun) observe(ret string) (snap, []string) {
	var p snap
	var bad []string
	p.ret = ret
	for a := range r.act {
		ra := &r.act[a]
		if !ra.running {
			continue
		}
		select {
		case <-ra.done:
		default:
			continue
		}
		ra.running = false
		if ra.w != nil {
			delete(r.waiterOf, ra.w)
			ra.w = nil
		}
		switch {
		case errors.Is(ra.rerr, context.Canceled):
			p.out[a] = "err:canceled"
		case errors.Is(ra.rerr, errModelClosed):
			p.out[a] = "err:closed"
		case ra.rerr != nil:
			p.out[a] = "err:" + ra.rerr.Error()
		default:
			p.out[a] = [...]string{AdmitTurn: "turn", AdmitJoined: "joined", AdmitBusy: "busy", AdmitProbe: "probe"}[ra.radm]
			if ra.radm != AdmitBusy {
				ra.e = ra.re
			}
		}
		if ra.rerr != nil && ra.re != nil {
			bad = append(bad, fmt.Sprintf("a%d: enter returned an entry with its error", a))
		}
	}
	kt := r.kt
	kt.mu.Lock()
	defer kt.mu.Unlock()
	if len(kt.m) > mKeys {
		bad = append(bad, "the table has entries of unknown keys")
	}
	for k, key := range r.keys {
		e := kt.m[key]
		if e == nil {
			continue
		}
		ks := kSnap{exists: true, holders: e.holders, mode: e.mode, turn: e.turn, sharedTry: e.sharedTry,
			probing: e.probing, draining: e.draining, lost: e.lostErr != nil}
		if e.conn != nil {
			c, ok := r.conns[e.conn]
			if !ok {
				c = -1
			}
			ks.conn = c
		}
		for _, w := range e.queue {
			a, ok := r.waiterOf[w]
			if !ok {
				a = -1
			}
			ks.queue += queueName(a, w.mode, w.try)
		}
		if e.holders > 0 && e.mode == Shared {
			ks.checked = int64(e.checked.Sub(r.base))
		}
		p.keys[k] = ks
		// Invariants of the table itself.
		switch {
		case e.key != key:
			bad = append(bad, fmt.Sprintf("k%d: entry of another key", k))
		case e.turn && e.holders > 0:
			bad = append(bad, fmt.Sprintf("k%d: a turn and %d holders", k, e.holders))
		case e.holders < 0:
			bad = append(bad, fmt.Sprintf("k%d: %d holders", k, e.holders))
		case e.holders > 0 && e.mode != Shared && e.mode != Exclusive:
			bad = append(bad, fmt.Sprintf("k%d: held in mode %d", k, e.mode))
		case e.holders > 1 && e.mode == Exclusive:
			bad = append(bad, fmt.Sprintf("k%d: %d exclusive holders", k, e.holders))
		case e.holders == 0 && !e.turn && len(e.queue) == 0:
			bad = append(bad, fmt.Sprintf("k%d: idle entry not deleted", k))
		case kt.joinable(e) && len(e.queue) > 0 && e.queue[0].mode == Shared:
			bad = append(bad, fmt.Sprintf("k%d: lost wakeup: a shared waiter heads the queue of a joinable shared hold", k))
		}
	}
	return p, bad
}

// check verifies the model state adopted after a step against the actors'
// view of the table.
func (r *mRun) check(s *mState) []string {
	var bad []string
	r.kt.mu.Lock()
	defer r.kt.mu.Unlock()
	for k, e := range s.keys {
		turns, holders := 0, 0
		for a, x := range s.act {
			if x.key != k {
				continue
			}
			switch x.st {
			case stTurn:
				turns++
			case stHolding:
				holders++
			}
			if (x.st == stTurn || x.st == stHolding) && (r.act[a].e == nil || r.act[a].e != r.kt.m[r.keys[k]]) {
				bad = append(bad, fmt.Sprintf("a%d holds or has the turn of k%d, but not of its entry in the table", a, k))
			}
			if x.st == stWaiting && !r.act[a].running {
				bad = append(bad, fmt.Sprintf("a%d should wait, its enter returned", a))
			}
		}
		switch {
		case e == nil && turns+holders > 0:
			bad = append(bad, fmt.Sprintf("k%d: no entry, %d turns, %d holders", k, turns, holders))
		case e == nil:
		case turns > 1:
			bad = append(bad, fmt.Sprintf("k%d: %d actors have the turn", k, turns))
		case (turns == 1) != e.turn || holders != e.holders:
			bad = append(bad, fmt.Sprintf("k%d: actors: %d turns, %d holders; model: turn %v, %d holders", k, turns, holders, e.turn, e.holders))
		}
	}
	for a, x := range s.act {
		if x.st != stWaiting && r.act[a].running {
			bad = append(bad, fmt.Sprintf("a%d: its enter has not returned", a))
		}
	}
	return bad
}

// step runs one step; it returns false when the source is exhausted.
func (r *mRun) step(i int) (bool, error) {
	if r.src.exhausted() {
		return false, nil
	}
	var ops []mOp
	if !r.model.closed && r.src.pick(400) == 0 {
		ops = append(ops, mOp{kind: "close"})
	} else if op, ok := r.gen(false); ok {
		ops = append(ops, op)
		if op.kind == "cancel" && r.src.pick(2) == 0 {
			// Something that may let the cancelled waiter in at the same time.
			r.model.apply(op) // so that gen sees the actor as it will be
			op2, ok := r.gen(true)
			r.model.act[op.a].cancelled, r.model.act[op.a].woken = false, false
			if ok {
				ops = append(ops, op2)
			}
		}
	} else {
		return false, nil
	}
	return true, r.run(i, ops)
}

func (r *mRun) run(i int, ops []mOp) error {
	r.fresh = -1
	var ret string
	for _, op := range ops {
		if v := r.do(op); v != "" {
			ret = v
		}
	}
	r.hist = append(r.hist, mStep{i: i, ops: ops})
	if err := r.settle(); err != nil {
		return err
	}
	obs, bad := r.observe(ret)
	r.hist[len(r.hist)-1].out, r.hist[len(r.hist)-1].ret = obs.out, ret
	if len(bad) > 0 {
		return fmt.Errorf("table invariants: %s", strings.Join(bad, "; "))
	}
	start := r.model.clone()
	start.out, start.ret, start.ops, start.next = [mActors]string{}, "", ops, 0
	var match *mState
	var outcomes []string
	start.clone().explore(func(s *mState) bool {
		if p := s.snap(); p == obs {
			match = s
			return true
		} else if len(outcomes) < 4 {
			outcomes = append(outcomes, p.String())
		}
		return false
	})
	if match == nil {
		return fmt.Errorf("the table and the model disagree:\ntable:\n%s\nmodel's outcomes:\n%s\nmodel before the step:\n%s",
			obs.String(), strings.Join(outcomes, "\n  or\n"), r.model.dump())
	}
	match.ops = nil
	r.model = match
	if bad := r.check(match); len(bad) > 0 {
		return fmt.Errorf("actors: %s", strings.Join(bad, "; "))
	}
	return nil
}

func nonEmpty(out [mActors]string) []string {
	var s []string
	for a, o := range out {
		if o != "" {
			s = append(s, fmt.Sprintf("a%d:%s", a, o))
		}
	}
	return s
}

// finish closes the table (if not yet) and checks that every waiter gave up.
func (r *mRun) finish(i int) error {
	if !r.closed {
		if err := r.run(i, []mOp{{kind: "close"}}); err != nil {
			return err
		}
	}
	for a := range r.act {
		if r.act[a].running {
			return fmt.Errorf("a%d still waits after Close", a)
		}
		if r.act[a].cancel != nil {
			r.act[a].cancel()
		}
	}
	return nil
}

func (r *mRun) history() string {
	var b strings.Builder
	fmt.Fprintf(&b, "sharedTries=%v probes=%v", r.kt.sharedTries, r.kt.probes)
	for _, h := range r.hist {
		var desc []string
		for _, op := range h.ops {
			desc = append(desc, op.String())
		}
		fmt.Fprintf(&b, "\n%4d: %s -> out=%q ret=%q", h.i, strings.Join(desc, " || "), nonEmpty(h.out), h.ret)
	}
	return b.String()
}

// runModel runs one sequence of at most steps steps.
func runModel(src mSource, steps int) (*mRun, error) {
	r := newMRun(src)
	i := 0
	for ; i < steps; i++ {
		more, err := r.step(i)
		if err != nil {
			r.finishQuietly()
			return r, fmt.Errorf("step %d: %w", i, err)
		}
		if !more {
			break
		}
	}
	if err := r.finish(i); err != nil {
		r.finishQuietly()
		return r, fmt.Errorf("finish: %w", err)
	}
	return r, nil
}

// finishQuietly lets the goroutines of a failed run end, if they can.
func (r *mRun) finishQuietly() {
	for a := range r.act {
		if r.act[a].cancel != nil {
			r.act[a].cancel()
		}
	}
	if !r.closed {
		r.closed = true
		r.kt.Close()
	}
}

func TestKeyTableModel(t *testing.T) {
	sequences, steps := 2000, 200
	if raceEnabled() {
		sequences = 1000 // the race detector makes a step about 8 times slower
	}
	if testing.Short() {
		sequences = 200
	}
	var raced, total int
	start := time.Now()
	for seed := uint64(1); seed <= uint64(sequences); seed++ {
		r, err := runModel(randSource{rand.New(rand.NewPCG(seed, 0x6b6579))}, steps)
		if err != nil {
			t.Fatalf("seed %d: %v\nhistory (seed %d):\n%s", seed, err, seed, r.history())
		}
		raced += r.model.raced
		total += len(r.hist)
	}
	t.Logf("seeds 1..%d, %d steps each (%d run), in %v; woken enters let in at once (race path): %d",
		sequences, steps, total, time.Since(start).Round(time.Millisecond), raced)
}

func raceEnabled() bool {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "-race" {
				return s.Value == "true"
			}
		}
	}
	return false
}

func FuzzKeyTable(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte("\x01\x00" + strings.Repeat("\x05\x01\x02\x03\x00\x07", 40)))
	f.Add([]byte("\x02\x01" + strings.Repeat("\x01\x09\x01\x01\x03\x11\x04\x02\x06", 40)))
	seeds := rand.New(rand.NewPCG(7, 7))
	for range 8 {
		b := make([]byte, 600)
		for i := range b {
			b[i] = byte(seeds.IntN(256))
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := runModel(&byteSource{b: b}, 400)
		if err != nil {
			t.Fatalf("input %x: %v\nhistory:\n%s", b, err, r.history())
		}
	})
}
