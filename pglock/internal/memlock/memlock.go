// Package memlock is an in-memory advisory lock table: the server side of
// the test double in package pglocktest, which pglock runs its Locks on
// when given a *Session (see pglock's memSource). It does not import pglock:
// pglock imports it.
//
// A Server is one database's lock table: keys, each with its granted holds
// (exclusive, or any number of shared ones) and a FIFO queue of waiters. A
// Session is one client (one replica's Locker). The rules are PostgreSQL's
// for advisory locks, as pglock presents them through a Locker:
//
//   - Exclusive conflicts with every hold; Shared with Exclusive only.
//   - Every hold is its own: two holds of one session exclude each other as
//     two sessions' do (a Locker's key table makes them do so on a real
//     server; PostgreSQL itself would stack them).
//   - A request is granted at once when it conflicts with no granted hold and
//     with no waiter queued before it (no barging: a Shared request does not
//     pass an Exclusive waiter); otherwise a try fails and a wait queues.
//   - When a hold ends, the queue is walked in order and every waiter that
//     conflicts with no granted hold and no waiter still ahead of it is
//     granted (PostgreSQL's ProcLockWakeup).
//
// Faults are injected by the Server's hooks: Lose ends holds now and tells
// their watchers before a waiter is granted; FailNext and BusyNext shape the
// next request of a key; SetDown takes the whole table down (every hold
// lost, every wait and request refused) and back up; SetDelay makes every
// request take a while before it reaches the table.
package memlock

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"
)

// Key is an advisory key: V is the bigint key, or the pair's two halves
// (high, low) when Pair.
type Key struct {
	V    int64
	Pair bool
}

// Mode is Exclusive or Shared.
type Mode int

// The modes, as pglock numbers them.
const (
	Exclusive Mode = iota
	Shared
)

func (m Mode) conflicts(o Mode) bool { return m == Exclusive || o == Exclusive }

// ErrClosed is the error of a request on a closed Session, and of a wait
// that its Session's Close ended.
var ErrClosed = errors.New("memlock: session closed")

// ErrLost is the error of Release on a hold that was lost (Lose, or its
// Session closed).
var ErrLost = errors.New("memlock: hold lost")

type state int

const (
	waiting state = iota
	held
	ended
)

// Hold is one request of a key: waiting, held, then ended.
type Hold struct {
	sess  *Session
	key   Key
	mode  Mode
	label string
	ready chan struct{} // closed when a queued request is granted, or refused
	// refused is why a queued request was refused (the Server went down);
	// written before ready is closed, nil when it was granted.
	refused error

	// Under the Server's mu.
	state state
	lost  error // why the hold was lost; nil if it was not

	// cbMu guards the watcher: Lose calls it under cbMu, so that the stop
	// of Watch waits for a call under way.
	cbMu    sync.Mutex
	lostErr error
	onLost  func(error)
}

type entry struct {
	holds []*Hold // granted
	queue []*Hold // waiting, in order
}

type fault struct {
	err  error // the request fails with err
	busy bool  // the request finds the key busy
}

// Server is an in-memory advisory lock table. The zero value is not usable:
// make one with NewServer.
type Server struct {
	mu       sync.Mutex
	keys     map[Key]*entry
	faults   map[Key][]fault
	tokens   map[Key]int64
	sessions int64
	down     error         // why requests fail; nil while the Server is up
	up       *uptime       // the current (or the last) time up
	delay    time.Duration // what each request takes before it reaches the table
}

// uptime is a time the Server is up: ended is closed when it goes down, and
// why, written before, says why requests fail from then on.
type uptime struct {
	ended chan struct{}
	why   error
}

// NewServer returns an empty lock table.
func NewServer() *Server {
	return &Server{keys: map[Key]*entry{}, faults: map[Key][]fault{}, tokens: map[Key]int64{}, up: &uptime{ended: make(chan struct{})}}
}

// Session is one client of a Server, named for introspection.
type Session struct {
	srv     *Server
	id      int64
	name    string
	closing chan struct{}
	// Under the Server's mu.
	closed bool
	holds  map[*Hold]struct{} // held and waiting
}

// NewSession returns a new client of s named name ("" names it
// "session-<id>"). Its id is unique on s, from 1.
func (s *Server) NewSession(name string) *Session {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sessions++
	if name == "" {
		name = fmt.Sprintf("session-%d", s.sessions)
	}
	return &Session{srv: s, id: s.sessions, name: name, closing: make(chan struct{}), holds: map[*Hold]struct{}{}}
}

// Server returns the Server of the Session.
func (c *Session) Server() *Server { return c.srv }

// ID returns the Session's id.
func (c *Session) ID() int64 { return c.id }

// Name returns the Session's name.
func (c *Session) Name() string { return c.name }

// Acquire requests key in mode for the Session: held at once when it can
// be (nil error), else busy (nil, nil) when !wait, else queued until it is
// granted, ctx ends (ctx's error) or the Session closes (ErrClosed). A
// grant that arrives as the wait ends is given back: on an error nothing is
// held. label names the hold in introspection ("" for the Session's name).
// The request takes the Server's delay (SetDelay) first, or less when ctx
// ends (ctx's error), the Session closes or the Server goes down. While the
// Server is down (SetDown) it fails with the reason given there, and a wait
// under way when it goes down ends with that reason. Then an injected fault
// (FailNext, BusyNext) applies, before the key is looked at.
func (c *Session) Acquire(ctx context.Context, key Key, mode Mode, wait bool, label string) (*Hold, error) {
	s := c.srv
	if err := c.travel(ctx); err != nil {
		return nil, err
	}
	s.mu.Lock()
	if c.closed {
		s.mu.Unlock()
		return nil, ErrClosed
	}
	if s.down != nil {
		err := s.down
		s.mu.Unlock()
		return nil, err
	}
	if f, ok := s.popFault(key); ok {
		up := s.up
		s.mu.Unlock()
		switch {
		case f.err != nil:
			return nil, f.err
		case !wait:
			return nil, nil
		}
		// Busy for this wait: it waits as for a holder that never lets go,
		// until the Server goes down.
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-c.closing:
			return nil, ErrClosed
		case <-up.ended:
			return nil, up.why
		}
	}
	h := &Hold{sess: c, key: key, mode: mode, label: label}
	e := s.entry(key)
	if e.admits(mode, len(e.queue)) {
		s.grant(e, h)
		s.mu.Unlock()
		return h, nil
	}
	if !wait {
		s.dropEmpty(key, e)
		s.mu.Unlock()
		return nil, nil
	}
	h.ready = make(chan struct{})
	e.queue = append(e.queue, h)
	c.holds[h] = struct{}{}
	s.mu.Unlock()

	var err error
	select {
	case <-h.ready:
		if h.refused != nil {
			return nil, h.refused // SetDown took it out of the queue
		}
		return h, nil
	case <-ctx.Done():
		err = ctx.Err()
	case <-c.closing:
		err = ErrClosed
	}
	s.mu.Lock()
	switch h.state {
	case waiting:
		s.unqueue(h)
	case held:
		s.unhold(h) // granted as the wait ended: given back
	}
	s.wake(key)
	s.mu.Unlock()
	return nil, err
}

// Enqueue requests key in mode for the Session without waiting for it: the
// hold is granted now or when its turn in the queue comes. cancel ends it:
// it releases the hold or leaves the queue. It takes no delay and no fault;
// while the Server is down the request is refused (h is never held), and a
// hold or a place in the queue ends when it goes down.
func (c *Session) Enqueue(key Key, mode Mode, label string) (h *Hold, cancel func()) {
	s := c.srv
	s.mu.Lock()
	defer s.mu.Unlock()
	h = &Hold{sess: c, key: key, mode: mode, label: label}
	if s.down != nil {
		h.state = ended
		return h, func() {}
	}
	e := s.entry(key)
	if e.admits(mode, len(e.queue)) {
		s.grant(e, h)
	} else {
		h.ready = make(chan struct{})
		e.queue = append(e.queue, h)
		c.holds[h] = struct{}{}
	}
	return h, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		switch h.state {
		case waiting:
			s.unqueue(h)
		case held:
			s.unhold(h)
		}
		s.wake(key)
	}
}

// Close closes the Session: its holds are lost (each watcher is told, with
// an error matching ErrClosed), its waits end with ErrClosed, and its
// requests fail. Close is safe to call more than once.
func (c *Session) Close() {
	s := c.srv
	s.mu.Lock()
	if c.closed {
		s.mu.Unlock()
		return
	}
	c.closed = true
	close(c.closing)
	why := fmt.Errorf("%w: session %q", ErrClosed, c.name)
	var lost []*Hold
	keys := map[Key]struct{}{}
	for h := range c.holds {
		switch h.state {
		case held:
			h.lost = why // it blocks others until its watcher is told
			lost = append(lost, h)
		case waiting:
			s.unqueue(h) // an Acquire waiting on it returns ErrClosed
		}
		keys[h.key] = struct{}{}
	}
	s.mu.Unlock()
	s.tell(lost, why)
	s.mu.Lock()
	for _, h := range lost {
		if h.state == held {
			s.unhold(h)
		}
	}
	for k := range keys {
		s.wake(k)
	}
	s.mu.Unlock()
}

// Stats returns the number of keys the Session holds and of its requests
// waiting.
func (c *Session) Stats() (heldKeys, queued int) {
	c.srv.mu.Lock()
	defer c.srv.mu.Unlock()
	keys := map[Key]struct{}{}
	for h := range c.holds {
		switch h.state {
		case held:
			keys[h.key] = struct{}{}
		case waiting:
			queued++
		}
	}
	return len(keys), queued
}

// Session returns the Session of the hold.
func (h *Hold) Session() *Session { return h.sess }

// Release ends the hold, letting waiters in. On a lost hold it returns an
// error matching ErrLost (and the reason); on one already ended, nil.
func (h *Hold) Release() error {
	s := h.sess.srv
	s.mu.Lock()
	defer s.mu.Unlock()
	if h.lost != nil {
		return fmt.Errorf("%w: %w", ErrLost, h.lost)
	}
	if h.state != held {
		return nil
	}
	s.unhold(h)
	s.wake(h.key)
	return nil
}

// Watch calls lost once, with the reason, when the hold is lost (at once if
// it was lost already). stop ends the watch, waiting for a call under way.
func (h *Hold) Watch(lost func(error)) (stop func()) {
	h.cbMu.Lock()
	if h.lostErr != nil {
		lost(h.lostErr)
	} else {
		h.onLost = lost
	}
	h.cbMu.Unlock()
	return func() {
		h.cbMu.Lock()
		h.onLost = nil
		h.cbMu.Unlock()
	}
}

// Token returns the next fencing token of the hold's key on the Server:
// 1, 2, 3... per key.
func (h *Hold) Token() int64 {
	s := h.sess.srv
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokens[h.key]++
	return s.tokens[h.key]
}

// Lose ends every hold of key now, as a server ending their sessions would:
// each watcher is told, with why, before any waiter is granted the key; the
// holds' Release returns an error matching ErrLost. It returns the number
// of holds lost.
func (s *Server) Lose(key Key, why error) int {
	s.mu.Lock()
	var lost []*Hold
	if e := s.keys[key]; e != nil {
		lost = slices.Clone(e.holds)
		for _, h := range lost {
			h.lost = why // its Release now says so; it still blocks others
		}
	}
	s.mu.Unlock()
	// The lost holds stay in the table, and go on blocking every request,
	// until their watchers are told: no overlap window.
	s.tell(lost, why)
	s.mu.Lock()
	for _, h := range lost {
		if h.state == held {
			s.unhold(h)
		}
	}
	s.wake(key)
	s.mu.Unlock()
	return len(lost)
}

// FailNext makes the next request of key (by any Session) fail with err.
// Calls add up: each makes one request fail, in order.
func (s *Server) FailNext(key Key, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults[key] = append(s.faults[key], fault{err: err})
}

// BusyNext makes the next request of key (by any Session) find it busy: a
// try fails, and a wait waits until its context ends. Calls add up.
func (s *Server) BusyNext(key Key) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults[key] = append(s.faults[key], fault{busy: true})
}

// SetDown takes the Server down (why non-nil) or brings it back up (nil),
// as a database that stops and restarts would. Going down, every hold of
// every Session is lost, as Lose loses them (each watcher is told, with
// why, before SetDown returns; their Release returns an error matching
// ErrLost and why), every queued request ends with why, and from then on
// every request (Acquire, after its delay) fails with why, before any fault
// applies; Enqueue holds nothing. Coming up, the table is empty and
// requests go through again. It returns the number of holds lost: 0 when
// the Server was down already (its first reason stays) or comes up.
func (s *Server) SetDown(why error) int {
	s.mu.Lock()
	if why == nil || s.down != nil {
		if why == nil && s.down != nil {
			s.down, s.up = nil, &uptime{ended: make(chan struct{})}
		}
		s.mu.Unlock()
		return 0
	}
	s.down, s.up.why = why, why
	close(s.up.ended)
	var lost []*Hold
	for _, e := range s.keys {
		for _, h := range e.holds {
			if h.lost == nil { // else a Lose or Close under way ends it
				h.lost = why // it still blocks others until its watcher is told
				lost = append(lost, h)
			}
		}
		for _, h := range e.queue {
			h.state = ended
			delete(h.sess.holds, h)
			h.refused = why
			close(h.ready)
		}
		e.queue = nil
	}
	s.mu.Unlock()
	s.tell(lost, why)
	s.mu.Lock()
	for _, h := range lost {
		if h.state == held {
			s.unhold(h)
		}
	}
	for k := range s.keys {
		s.wake(k) // requests made after a SetDown(nil) under way may wait
	}
	s.mu.Unlock()
	return len(lost)
}

// Down returns why requests fail while the Server is down (see SetDown),
// nil while it is up.
func (s *Server) Down() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.down
}

// SetDelay makes every request (Acquire, a try or a wait) take d before it
// reaches the table, as a round trip to a slow or distant server would; 0
// (or a negative d) removes the delay. Requests already on their way keep
// the delay they started with.
func (s *Server) SetDelay(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.delay = max(d, 0)
}

// travel is a request's way to the table: the Server's delay, cut short
// when ctx ends (ctx's error), the Session closes (ErrClosed) or the Server
// goes down (then the request goes on, to be refused).
func (c *Session) travel(ctx context.Context) error {
	s := c.srv
	s.mu.Lock()
	d, up := s.delay, s.up
	s.mu.Unlock()
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-up.ended:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.closing:
		return ErrClosed
	}
	return nil
}

// Holder is a hold or a waiting request as introspection shows it.
type Holder struct {
	Session   string // the Session's name
	SessionID int64
	Label     string // the request's label ("" for none)
	Mode      Mode
}

// Holders returns the holds of key, in the order they were granted, and its
// waiters, in queue order.
func (s *Server) Holders(key Key) (holds, waiters []Holder) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.keys[key]
	if e == nil {
		return nil, nil
	}
	info := func(h *Hold) Holder {
		return Holder{Session: h.sess.name, SessionID: h.sess.id, Label: h.label, Mode: h.mode}
	}
	for _, h := range e.holds {
		holds = append(holds, info(h))
	}
	for _, h := range e.queue {
		waiters = append(waiters, info(h))
	}
	return holds, waiters
}

// Keys returns the keys held or waited for, in no order.
func (s *Server) Keys() []Key {
	s.mu.Lock()
	defer s.mu.Unlock()
	keys := make([]Key, 0, len(s.keys))
	for k := range s.keys {
		keys = append(keys, k)
	}
	return keys
}

// tell tells the watchers of lost holds why; s.mu must not be held (a
// watcher may call back).
func (s *Server) tell(lost []*Hold, why error) {
	for _, h := range lost {
		h.cbMu.Lock()
		if h.lostErr == nil {
			h.lostErr = why
			if f := h.onLost; f != nil {
				h.onLost = nil
				f(why)
			}
		}
		h.cbMu.Unlock()
	}
}

func (s *Server) popFault(key Key) (fault, bool) {
	fs := s.faults[key]
	if len(fs) == 0 {
		return fault{}, false
	}
	if len(fs) == 1 {
		delete(s.faults, key)
	} else {
		s.faults[key] = fs[1:]
	}
	return fs[0], true
}

func (s *Server) entry(key Key) *entry {
	e := s.keys[key]
	if e == nil {
		e = &entry{}
		s.keys[key] = e
	}
	return e
}

func (s *Server) dropEmpty(key Key, e *entry) {
	if len(e.holds) == 0 && len(e.queue) == 0 {
		delete(s.keys, key)
	}
}

// admits reports whether a request in mode, with the first ahead waiters
// of the queue before it, can be granted now.
func (e *entry) admits(mode Mode, ahead int) bool {
	for _, h := range e.holds {
		if mode.conflicts(h.mode) {
			return false
		}
	}
	for _, h := range e.queue[:ahead] {
		if mode.conflicts(h.mode) {
			return false
		}
	}
	return true
}

// grant makes h a hold of e. s.mu must be held.
func (s *Server) grant(e *entry, h *Hold) {
	h.state = held
	e.holds = append(e.holds, h)
	h.sess.holds[h] = struct{}{}
}

// unhold takes the held h out of the table. s.mu must be held.
func (s *Server) unhold(h *Hold) {
	h.state = ended
	delete(h.sess.holds, h)
	if e := s.keys[h.key]; e != nil {
		e.holds = slices.DeleteFunc(e.holds, func(x *Hold) bool { return x == h })
	}
}

// unqueue takes the waiting h out of its queue. s.mu must be held.
func (s *Server) unqueue(h *Hold) {
	h.state = ended
	delete(h.sess.holds, h)
	if e := s.keys[h.key]; e != nil {
		e.queue = slices.DeleteFunc(e.queue, func(x *Hold) bool { return x == h })
	}
}

// wake grants, in queue order, every waiter of key that conflicts with no
// hold and no waiter left ahead of it. s.mu must be held.
func (s *Server) wake(key Key) {
	e := s.keys[key]
	if e == nil {
		return
	}
	i := 0
	for i < len(e.queue) {
		h := e.queue[i]
		if !e.admits(h.mode, i) {
			i++
			continue
		}
		e.queue = slices.Delete(e.queue, i, i+1)
		s.grant(e, h)
		close(h.ready)
	}
	s.dropEmpty(key, e)
}
