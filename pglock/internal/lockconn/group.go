package lockconn

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// Owner is what the lock connections need of the Locker that opened them
// (pglock's mux).
type Owner interface {
	// Connect opens a new session with the Locker's settings, for a lock
	// connection (lock true) or a waiting one, bounded by ctx and the
	// Locker's connect timeout. ctx ends when Close stops waiting for
	// connects (see Group.WaitSessions).
	Connect(ctx context.Context, lock bool) (*pgx.Conn, error)
	// Lost is told once that c was lost or closed, why being err: every
	// key held on c is lost (see keytable.Table.LoseConn). It is called by
	// the goroutine that owns c or by c's watch, with no lock held.
	Lost(c *Conn, err error)
	// Refuse makes every later connect fail with err: a statement found
	// that it did not run on the session its connection claimed
	// (pooler.ErrSessionMoved: a transaction pooler).
	Refuse(err error)
}

// Statements are the functions of one mode and key form (see
// Config.Statements).
type Statements struct {
	Try    string // the non-blocking lock: bool
	Unlock string // the unlock: bool
}

// Config is what the lock connections of one Locker are told when it is
// made; it does not change afterwards.
type Config struct {
	// LockConns is the number of lock connections (slots, see Group.Slot);
	// WaitConns the number of places among the waiting connections (see
	// Group.Places), WithWaitConns.
	LockConns, WaitConns int
	// LostCheck is the interval of the watch's checks of an idle
	// connection that holds locks.
	LostCheck time.Duration
	// ReleaseTimeout bounds a close, and the cleanup after a failed
	// statement.
	ReleaseTimeout time.Duration
	// StatementBound bounds each statement on a lock connection (a socket
	// deadline): a connection that goes silent is lost within it.
	StatementBound time.Duration
	// AbandonBound is how long the server keeps the session of a silent
	// client (see Owner.Connect); a connection idle for half of it, holding
	// nothing, is replaced.
	AbandonBound time.Duration
	// Closing ends when the Locker is closed: a connect that ends after it
	// ends its session at once.
	Closing context.Context
	// Closed, Unavailable and TooManyLocks are the Locker's sentinels
	// (pglock's ErrLockerClosed, ErrUnavailable, ErrTooManyLocks) that the
	// connections' errors wrap: of a closed Locker, of a request whose
	// context ended during a connect (see ConnectingErr), of a full lock
	// table (see LockFailed).
	Closed, Unavailable, TooManyLocks error
	// Join joins errors as the Locker writes them (pglock's join: one
	// line, each sentinel once).
	Join func(errs ...error) error
	// Statements are the session-scope statements of a key by
	// [shared][pair]: pg_try_advisory_lock[_shared] and
	// pg_advisory_unlock[_shared] of ($1::bigint) or ($1::integer,
	// $2::integer). Owner.Connect prepares the unlocks on a lock connection
	// (see Conn.cleanup).
	Statements [2][2]Statements
}

// Group is what the connections of one Locker share: the owner, the
// configuration, the sets of its connections (lock connections by slot,
// slots.go; waiting connections, waiting.go), the count of their sessions
// and of their statements.
//
// Lock order: the owner's mutex (pglock's mux.mu), then setsMu, then a
// Conn's mu, then sessMu; never the other way. Nothing here calls the owner
// with setsMu held (a connection is closed after it is let go).
type Group struct {
	owner Owner
	cfg   Config

	// hints are the homes of keys moved by Pick (slot+1; 0: the slot by
	// hash), by bucket of hints (see HintBuckets).
	hints [HintBuckets]atomic.Int32

	// places holds a token for each place among the waiting connections
	// taken (see Places).
	places chan struct{}

	// setsMu guards the sets of connections and Conn.placed.
	setsMu   sync.Mutex
	slots    []*Conn
	waitIdle []*Conn
	waitBusy map[*Conn]struct{}
	// placedConns counts the waiting connections that hold a place (see
	// pglock's mux.wait).
	placedConns int
	// shut: the Locker is closed; the sets take no connection and keep
	// none (see Shut).
	shut bool

	// statements counts the lock requests' statements on lock connections
	// (tests read it).
	statements atomic.Int64

	// The Locker's sessions, from the start of their connect (Conn.dial)
	// until closed (Conn.lose): Close waits until none is left (see
	// WaitSessions). sessMu is taken after a Conn's mu, never before.
	sessMu        sync.Mutex
	sessions      int
	sessionsShut  bool            // Close began: no new session
	sessionsGone  chan struct{}   // closed when sessions falls to 0 after Close began
	dialing       context.Context // ends when Close stops waiting for connects
	cancelDialing context.CancelFunc
}

// NewGroup returns the group of the connections that owner opens.
func NewGroup(owner Owner, cfg Config) *Group {
	dialing, cancelDialing := context.WithCancel(context.Background())
	return &Group{
		owner:         owner,
		cfg:           cfg,
		slots:         make([]*Conn, cfg.LockConns),
		places:        make(chan struct{}, cfg.WaitConns),
		waitBusy:      make(map[*Conn]struct{}),
		dialing:       dialing,
		cancelDialing: cancelDialing,
	}
}

// New returns a connection of g, not opened yet (its first request opens
// it): a lock connection with its index among the Locker's (slot), or a
// waiting connection (slot -1).
func (g *Group) New(slot int) *Conn {
	c := &Conn{g: g, slot: slot}
	c.loseFn, c.pingFn = c.lose, c.idlePing
	c.queue = c.queueBuf[:0]
	return c
}

// Statements returns how many statements of lock requests g's lock
// connections have sent.
func (g *Group) Statements() int64 { return g.statements.Load() }

// Counts are a Group's connections that are in use or kept, by role (see
// Group.Counts).
type Counts struct {
	// Lock: lock connections open, not known to be lost.
	Lock int
	// Waiting: waiting connections with a place that wait for their key;
	// Holding: those that hold it; Idle: those kept open for the next wait;
	// Leader: the connections of Leaders' campaigns (no place).
	Waiting, Holding, Idle, Leader int
}

// Counts counts the connections of g by role (for pglock's Stats).
func (g *Group) Counts() Counts {
	var n Counts
	g.setsMu.Lock()
	defer g.setsMu.Unlock()
	for _, c := range g.slots {
		if c != nil && !c.IsDead() && c.HasConn() {
			n.Lock++
		}
	}
	for c := range g.waitBusy {
		switch {
		case !c.placed:
			n.Leader++
		case c.HoldsAny():
			n.Holding++
		default:
			n.Waiting++
		}
	}
	for _, c := range g.waitIdle {
		if c.HasConn() {
			n.Idle++
		}
	}
	return n
}

// Shut closes the sets of connections: from now on Slot, Pick and WaitConn
// return nil and PutWaitConn keeps nothing. It returns the connections the
// sets had (lock connections, idle and busy waiting ones), which the caller
// closes (see CloseAll); nil when the sets were shut already.
func (g *Group) Shut() []*Conn {
	g.setsMu.Lock()
	defer g.setsMu.Unlock()
	if g.shut {
		return nil
	}
	g.shut = true
	var cs []*Conn
	for _, c := range g.slots {
		if c != nil {
			cs = append(cs, c)
		}
	}
	cs = append(cs, g.waitIdle...)
	g.waitIdle = nil
	for c := range g.waitBusy {
		cs = append(cs, c)
	}
	return cs
}

// CloseAll closes cs (see Shut), why being the reason their holders are
// told, and waits until every session of the Locker is closed (see
// WaitSessions).
func (g *Group) CloseAll(cs []*Conn, why error) {
	// Side by side: each close waits for the server to end its session
	// (see EndSession), up to its bound on a silent network; so do the
	// connects under way.
	var wg sync.WaitGroup
	for _, c := range cs {
		wg.Go(func() { c.Close(why) })
	}
	wg.Go(g.WaitSessions)
	wg.Wait()
}

// sessionStarted counts a session whose connect starts now, unless the
// Locker is closed; sessionEnded counts it out once closed (after
// EndSession for a close the Locker chose), exactly once.
func (g *Group) sessionStarted() bool {
	g.sessMu.Lock()
	defer g.sessMu.Unlock()
	if g.sessionsShut {
		return false
	}
	g.sessions++
	return true
}

// sessionEnded counts out a session counted by sessionStarted.
func (g *Group) sessionEnded() {
	g.sessMu.Lock()
	defer g.sessMu.Unlock()
	g.sessions--
	if g.sessions == 0 && g.sessionsGone != nil {
		close(g.sessionsGone)
		g.sessionsGone = nil
	}
}

// sessionEndedWith counts out a session counted by sessionStarted once done
// is closed, or after MaxSessionEnd.
func (g *Group) sessionEndedWith(done <-chan struct{}) {
	go func() {
		t := time.NewTimer(MaxSessionEnd)
		defer t.Stop()
		select {
		case <-done:
		case <-t.C:
		}
		g.sessionEnded()
	}()
}

// WaitSessions, run by the Locker's Close beside the closes of the
// connections it has, waits until every session of the Locker is closed:
// also those of connects under way, and of waiting connections a goroutine
// has taken out of the Locker's sets to close them itself. A connect cut
// mid-way leaves a session the server ends later, on its own (pgx closes
// the socket in the middle of the startup or of the connection's first
// statements); so connects are not cut at once: each finishes and is then
// ended by EndSession. Only those still connecting after MaxSessionEnd (a
// slow or silent network) are cut off, and waited for up to MaxSessionEnd
// more. The wait is bounded by twice MaxSessionEnd: a session that some
// goroutine is slow to close does not make Close hang. No session starts
// afterwards.
func (g *Group) WaitSessions() {
	g.sessMu.Lock()
	g.sessionsShut = true
	if g.sessions == 0 {
		g.sessMu.Unlock()
		g.cancelDialing()
		return
	}
	gone := make(chan struct{})
	g.sessionsGone = gone
	g.sessMu.Unlock()
	t := time.NewTimer(MaxSessionEnd)
	defer t.Stop()
	select {
	case <-gone:
	case <-t.C:
		g.cancelDialing()
		// A connect cut off ends its session as it can: pgx closes it
		// (a cancel request, Terminate, reading to the end), waited for
		// up to MaxSessionEnd by the Owner's Connect.
		t.Reset(MaxSessionEnd)
		select {
		case <-gone:
		case <-t.C:
		}
	}
	g.cancelDialing()
}
