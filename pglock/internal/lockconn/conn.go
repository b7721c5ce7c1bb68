package lockconn

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/pglock/internal/connwatch"
	"github.com/pglockkit/kit/pglock/internal/keytable"
	"github.com/pglockkit/kit/pglock/internal/pooler"
)

// Conn is one PostgreSQL session that a multiplexing Locker opened for
// itself (a "lock connection"): it holds the session locks of many Locks at
// once. Lock and unlock requests of concurrent goroutines are combined: the
// goroutine that finds the connection free sends every queued request in one
// statement (one round trip), and hands the connection to the next queued
// goroutine when it is done, so no goroutine runs while the connection is
// idle except its watch. A waiting connection (slot < 0) is a Conn that
// one goroutine uses alone, to wait in the server's queue and then hold what
// it got.
//
// While it holds a lock and nobody uses it, the connection is watched (see
// connwatch.Conn); when it dies or goes silent every lock on it is lost at once.
//
// This file holds the queue of requests and the connection's life (open,
// lost, closed); batch.go the statement that runs a batch of requests and
// what its failure means; block.go the transaction block a connection
// holding many locks runs its statements in; group.go what the connections
// of one Locker share (its Owner, Config and sessions).
type Conn struct {
	g    *Group
	slot int // index among the Locker's lock connections, or -1 for a waiting connection
	// placed: a waiting connection that holds a place among WithWaitConns
	// (see Group.WaitConn, and pglock's mux.wait); guarded by g.setsMu.
	placed bool

	mu     sync.Mutex
	conn   *pgx.Conn // nil until the first use opens it
	connAt time.Time // when conn was opened
	// proof: conn goes through a pooler; its statements prove they run on
	// the server session it claimed (see pooler.Proof). Set with conn.
	proof *pooler.Proof
	// counted: conn's session is counted in the group's sessions, until the
	// goroutine that clears this closes it (see Group.WaitSessions).
	counted bool
	// dialing is closed when the connect under way is done (nil when none
	// is); dialErr is why the last one failed.
	dialing chan struct{}
	dialErr error
	queue   []*Op
	// queueBuf holds the queue while it is short: a request that finds the
	// connection free takes no allocation to queue (see Do).
	queueBuf [4]*Op
	active   bool  // a goroutine owns the connection (flushes or waits)
	dead     error // the connection was lost or closed: no new request is taken
	holds    int   // server locks held on it

	// watch watches the connection while it holds locks and nobody uses it,
	// and lastUsed is when it last ran a statement; only the goroutine that
	// owns the connection touches them. loseFn and pingFn are lose and
	// idlePing, made once for the watch's arms (see flush).
	watch    connwatch.Rewatch
	lastUsed time.Time
	loseFn   func(error)
	pingFn   func(context.Context) error
	// argv and pair hold the bind arguments of a statement (see argsOf);
	// only the goroutine that owns the connection touches them.
	argv [2]any
	pair [2]int32
	// idleTimer ends the session of a connection left idle (see armIdle);
	// idlePending: it is set. Guarded by mu.
	idleTimer   *time.Timer
	idlePending bool
	// d is the direct path's state (see one).
	d directState
	// blockAt is when the connection's open transaction block began (see
	// block); only the goroutine that owns the connection touches it.
	blockAt time.Time

	// kt is the key table's record of the connection: it is marked lost
	// (see keytable.Table.LoseConn) so that a grant recorded after the loss
	// is known to be lost too.
	kt keytable.ConnState
}

// KeyTableState returns the key table's record of c (see keytable.Conn).
func (c *Conn) KeyTableState() *keytable.ConnState { return &c.kt }

// Slot returns c's index among the Locker's lock connections, or -1 for a
// waiting connection.
func (c *Conn) Slot() int { return c.slot }

// Op is one request to a Conn: a non-blocking lock or an unlock of
// one key, or (Fn) a use of the connection alone. The caller sets the
// request's fields and reads its results (OK, Retaken, Err) once Do returns.
type Op struct {
	// Unlock gives the key back; a request with none of Unlock, Check,
	// Probe and Fn takes it with the non-blocking function.
	Unlock bool
	// Retake (with Unlock, exclusive) takes the key again with the
	// non-blocking function right after the unlock, in the same statement:
	// a hand-off to the next waiter of the process in one round trip, in
	// which a waiter of another session, queued in the server, is served
	// first (the unlock grants it the key, so the retake fails).
	Retake  bool
	Retaken bool // the retake's result
	// Key is the key: a bigint, or (Pair) two integers, Key's high and
	// low 32 bits; Shared is the mode (false: exclusive).
	Key    int64
	Pair   bool
	Shared bool
	// Fn is a use of the connection alone.
	Fn func(*pgx.Conn)
	// Bounded: Fn runs under the statement bound on a waiting connection
	// too (on a lock connection it always does).
	Bounded bool
	// Check (a request) proves that the session is still alive, by a
	// statement on it: the release of a shared co-holder, which unlocks
	// nothing, still learns whether the lock lived until then.
	Check bool
	// Probe (a request, Shared) asks whether a new shared request of
	// another session would be granted now: false when a session waits for
	// (or holds) the key in exclusive mode (see keytable.Config.Probes). It
	// takes nothing: what it takes it gives back in the same statement.
	Probe bool
	// closing closes the connection (for this reason) instead; idle ends
	// its session if it has been idle long enough (see endIdle).
	closing error
	idle    bool
	// Ctx bounds the connect, when the request is the first on a new
	// connection (nil: only the connect bound).
	Ctx context.Context
	// Member: the request is one of a key set's (see SetBatch), also when
	// Ctx does not say so (an unlock has no Ctx).
	Member *SetMember

	OK    bool  // the function's result
	Err   error // the request failed (see ErrGone)
	lead  bool  // handed the connection: the receiver flushes the queue
	retry bool  // put back in the queue after a connect cut short
	done  chan struct{}
}

// isRequest reports whether o is a lock or unlock request, which can share a
// statement with others.
func (o *Op) isRequest() bool { return o.Fn == nil && o.closing == nil && !o.idle }

// ErrGone means that a lock connection that is lost or closed took a
// request: the request was not sent, or was sent on a session that then
// ended, so it holds nothing.
var ErrGone = errors.New("pglock: lock connection gone")

// Do runs op on the connection and returns when op has its result.
func (c *Conn) Do(op *Op) {
	op.done, op.lead, op.retry = nil, false, false
	c.mu.Lock()
	if c.dead != nil {
		c.mu.Unlock()
		op.Err = fmt.Errorf("%w: %w", ErrGone, c.dead)
		return
	}
	member := op.setMember()
	if c.active {
		// Another goroutine owns the connection: wait to be served or handed
		// it. (A request that finds it free needs no channel.)
		op.done = make(chan struct{})
		c.queue = append(c.queue, op)
		c.mu.Unlock()
		member.Arrive()
		if !c.await(op) {
			return
		}
		c.mu.Lock()
	} else {
		c.active = true
		c.queue = append(c.queue, op)
		if member != nil && !member.Arrive() {
			// A request of a key set: the others of the set are on their
			// way; they queue behind this one and share its statement.
			c.mu.Unlock()
			member.linger()
			c.mu.Lock()
		}
	}
	// This goroutine owns the connection now, and op is first in the queue:
	// flush requests up to the first fn (or the fn alone).
	n := 1
	if c.queue[0].isRequest() {
		for n < len(c.queue) && c.queue[n].isRequest() {
			n++
		}
	}
	batch := c.queue[:n:n]
	c.queue = c.queue[n:]
	c.mu.Unlock()

	retry := c.flush(batch)

	c.mu.Lock()
	// Wake the batch's requests, but those put back (retry): read under
	// c.mu, since one of them may lead the next flush as soon as it is
	// handed the connection.
	for _, o := range batch {
		if o != op && !o.retry {
			close(o.done)
		}
	}
	if len(retry) > 0 {
		c.queue = append(retry, c.queue...)
	}
	if len(c.queue) > 0 {
		next := c.queue[0]
		next.lead = true
		close(next.done)
	} else {
		// Empty: the next requests queue in queueBuf again, once the
		// requests it held are forgotten (nobody reads them any more).
		c.active = false
		clear(c.queueBuf[:])
		c.queue = c.queueBuf[:0]
	}
	c.mu.Unlock()
}

// await waits until op is done, or is handed the connection (then it
// reports true). A request whose context ends while it is still queued, not
// yet sent, leaves the queue and fails with its context's error; one already
// sent is waited for: its result may be a lock to own.
func (c *Conn) await(op *Op) bool {
	var ended <-chan struct{}
	if op.Ctx != nil {
		ended = op.Ctx.Done()
	}
	select {
	case <-op.done:
		return op.lead
	case <-ended:
	}
	c.mu.Lock()
	for i, q := range c.queue {
		if q == op && !op.lead {
			c.queue = append(c.queue[:i], c.queue[i+1:]...)
			c.mu.Unlock()
			op.Err = op.Ctx.Err()
			return false
		}
	}
	c.mu.Unlock()
	<-op.done
	return op.lead
}

// flush runs batch on the connection, opening it first if needed. The
// calling goroutine owns the connection. When a connect was cut short by the
// context of the request it ran for, the requests whose contexts ended fail
// and the others are returned, marked retry, for another attempt.
func (c *Conn) flush(batch []*Op) (retry []*Op) {
	for _, o := range batch {
		o.retry = false // set again below if the connect is cut short again
	}
	if batch[0].idle {
		// Before the watch is stopped: a connection that holds locks
		// keeps its watch (endIdle leaves it alone).
		c.endIdle()
		return nil
	}
	c.watch.Stop()
	if why := batch[0].closing; why != nil {
		c.lose(why) // run by the goroutine that owns the connection
		return nil
	}
	if err := c.open(batch); err != nil {
		for _, o := range batch {
			switch {
			case !errors.Is(err, ErrConnectCut):
				o.Err = err
			case ContextEnded(o.Ctx) != nil:
				o.Err = ConnectingErr(c.g.cfg.Unavailable, ContextEnded(o.Ctx))
			case o == batch[0]: // the caller of flush does not wait again
				o.Err = err
			default:
				o.retry = true
				retry = append(retry, o)
			}
		}
		return retry
	}
	if o := batch[0]; o.Fn != nil {
		// On a lock connection, and for a bounded use of a waiting one (a
		// fencing token), the use is bounded like a statement (see exec):
		// a silent network is noticed within the same bound as when idle,
		// and the connection is lost then. A wait is not: it lasts as
		// long as its context allows (see pglock's interruptible).
		var dl time.Time
		if c.slot >= 0 || o.Bounded {
			dl = time.Now().Add(c.g.cfg.StatementBound)
		}
		_ = c.conn.PgConn().Conn().SetDeadline(dl)
		if err := c.endBlock(); err != nil {
			c.lose(err)
			return nil
		}
		o.Fn(c.conn)
		if c.conn.IsClosed() {
			c.lose(errors.New("pglock: the connection closed during a statement"))
			return nil
		}
	} else {
		c.exec(batch)
	}
	c.lastUsed = time.Now()
	c.mu.Lock()
	watch := c.dead == nil && c.holds > 0 && !c.conn.IsClosed()
	if c.dead == nil && c.holds == 0 {
		c.armIdle(c.g.cfg.AbandonBound / 2)
	}
	c.mu.Unlock()
	if watch {
		c.watch.Arm(c.conn, c.g.cfg.LostCheck, c.loseFn, c.pingFn)
	}
	return nil
}

// armIdle sets the idle timer to fire after d, unless it is set already: a
// connection left holding nothing is ended by the Locker once it has been
// idle for half the abandoned-session bound (endIdle), before the server's
// idle_session_timeout would, and whether or not the server ended it
// meanwhile, so that Stats stop counting it (nothing watches a connection
// that holds nothing). The timer is left set between uses: when it fires,
// endIdle looks at how long the connection has been idle. Called with c.mu
// held.
func (c *Conn) armIdle(d time.Duration) {
	if c.idlePending || d <= 0 {
		return
	}
	c.idlePending = true
	if c.idleTimer == nil {
		c.idleTimer = time.AfterFunc(d, c.idleFired)
		return
	}
	c.idleTimer.Reset(d)
}

// idleFired is the idle timer's function: endIdle, run as the goroutine
// that owns the connection. A connection in use is left alone: its use sets
// the timer again when it ends (see flush), and a wait on a waiting
// connection can last for hours.
func (c *Conn) idleFired() {
	c.mu.Lock()
	c.idlePending = false
	skip := c.dead != nil || c.active
	c.mu.Unlock()
	if !skip {
		c.Do(&Op{idle: true})
	}
}

// endIdle ends the session of a connection that holds nothing and has been
// idle for half the abandoned-session bound, as open does before a use (the
// connection stays: its next use opens a new session); one used since has
// its timer set for the rest.
func (c *Conn) endIdle() {
	c.mu.Lock()
	conn, holds := c.conn, c.holds
	c.mu.Unlock()
	if conn == nil || holds > 0 {
		return
	}
	if rest := c.g.cfg.AbandonBound/2 - time.Since(c.lastUsed); rest > 0 {
		c.mu.Lock()
		c.armIdle(rest)
		c.mu.Unlock()
		return
	}
	c.watch.Stop() // none runs on a connection that holds nothing
	c.endIdleSession(conn)
}

// endIdleSession ends conn, the session of c that holds nothing, and counts
// it out once the server has ended it (EndSession); c stays, without a
// session, and its next use opens a new one. Run by the goroutine that
// owns the connection.
func (c *Conn) endIdleSession(conn *pgx.Conn) {
	c.mu.Lock()
	c.conn = nil
	counted := c.counted
	c.counted = false
	c.mu.Unlock()
	EndSession(conn, min(c.g.cfg.StatementBound, MaxSessionEnd))
	if counted {
		c.g.sessionEnded()
	}
}

// ErrConnectCut means that the requests for which a connect runs all ended
// before it was done; the connection is not lost: the connect goes on, and
// other requests find it done (see Conn.open).
var ErrConnectCut = errors.New("pglock: no connection to the server yet, a connect is under way")

// ConnectingErr is the error of a request whose context ended (ctxErr)
// while the connection it needs was still being opened: unavailable (the
// Locker's sentinel, Config.Unavailable), not busy. A deadline is said in
// the text only, so that it does not read as a busy key; a cancel is kept
// (context.Canceled matches).
func ConnectingErr(unavailable, ctxErr error) error {
	if errors.Is(ctxErr, context.DeadlineExceeded) {
		return fmt.Errorf("%w: %w (%v)", unavailable, ErrConnectCut, ctxErr)
	}
	return fmt.Errorf("%w: %w: %w", unavailable, ErrConnectCut, ctxErr)
}

// connectContext returns the context for a connect on behalf of batch: that
// of the first request whose context has not ended (nil when one has none).
func connectContext(batch []*Op) (context.Context, bool) {
	for _, o := range batch {
		if ContextEnded(o.Ctx) == nil {
			return o.Ctx, true
		}
	}
	return nil, false
}

// ContextEnded returns ctx's error, or DeadlineExceeded once its deadline has
// passed (a dial cut by the deadline can return before ctx's timer fires);
// nil for a nil ctx.
func ContextEnded(ctx context.Context) error {
	if ctx == nil {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return nil
}

// open connects on first use; a connection that died since is gone. A
// connection that held nothing and ran nothing for half the
// abandoned-session bound is replaced before the server ends it as idle (see
// Owner.Connect).
//
// The connect is the Locker's, not the request's: it runs in a goroutine of
// its own, bounded by the connect timeout (the pool's ConnectTimeout, else
// the release timeout) and by the Locker's Close. open waits for it as long
// as the context of one request of batch allows; when they have all ended,
// it returns ErrConnectCut and the connect goes on, so that the next request
// finds it done (a cold Locker is not kept cold by callers with short
// deadlines).
func (c *Conn) open(batch []*Op) error {
	c.mu.Lock()
	dead, conn, holds, connAt := c.dead, c.conn, c.holds, c.connAt
	c.mu.Unlock()
	if conn != nil && c.lastUsed.Before(connAt) {
		c.lastUsed = connAt // connected in the background since
	}
	switch {
	case dead != nil:
		return fmt.Errorf("%w: %w", ErrGone, dead)
	case conn != nil && conn.IsClosed():
		c.lose(errors.New("connection closed"))
		return ErrGone
	case conn != nil && holds == 0 && time.Since(c.lastUsed) > c.g.cfg.AbandonBound/2:
		// Ended before the new one opens: the session budget holds as the
		// server counts it.
		c.endIdleSession(conn)
	case conn != nil:
		return nil
	}
	dialed := c.dial()
	for {
		ctx, ok := connectContext(batch)
		if !ok {
			return ErrConnectCut
		}
		var ended <-chan struct{}
		if ctx != nil {
			ended = ctx.Done()
		}
		select {
		case <-dialed:
			c.mu.Lock()
			conn, err := c.conn, c.dialErr
			c.mu.Unlock()
			if conn == nil {
				if err == nil {
					err = c.g.cfg.Closed
				}
				return fmt.Errorf("pglock: open a lock connection: %w", err)
			}
			c.lastUsed = time.Now()
			return nil
		case <-ended:
		}
	}
}

// dial starts connecting, unless a connect is under way, and returns a
// channel closed when it is done: then c.conn is the new connection, or c is
// dead and c.dialErr says why.
func (c *Conn) dial() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dialing != nil {
		return c.dialing
	}
	done := make(chan struct{})
	if !c.g.sessionStarted() {
		// The Locker is closed: no new session.
		c.dialErr = c.g.cfg.Closed
		if c.dead == nil {
			c.dead = c.g.cfg.Closed
		}
		close(done)
		return done
	}
	c.dialing = done
	go func() {
		// Not cut by the Locker's Close at once: Close waits for the
		// connect and ends its session (see Group.WaitSessions).
		conn, err := c.g.owner.Connect(c.g.dialing, c.slot >= 0)
		c.mu.Lock()
		c.dialing = nil
		switch {
		case err != nil:
			c.dialErr = err
			if c.dead == nil {
				c.dead = err
			}
			c.mu.Unlock()
			close(done)
			c.g.sessionEnded() // last: Close may return now
			return
		case c.dead != nil || c.g.cfg.Closing.Err() != nil:
			// Lost or closed meanwhile (the Locker's Close): the new
			// session ends before Close returns.
			if c.dead == nil {
				c.dead = c.g.cfg.Closed
			}
			c.dialErr = c.dead
			c.mu.Unlock()
			EndSession(conn, min(c.g.cfg.StatementBound, MaxSessionEnd))
			close(done)
			c.g.sessionEnded() // last: Close may return now
			return
		default:
			c.conn, c.connAt, c.proof, c.counted = conn, time.Now(), pooler.ProofOf(conn), true
		}
		c.mu.Unlock()
		close(done)
	}()
	return done
}

// markDead stops the connection taking requests.
func (c *Conn) markDead(err error) {
	c.mu.Lock()
	if c.dead == nil {
		c.dead = err
	}
	c.mu.Unlock()
}

// lose ends the connection after a loss (from the watch, or from the
// goroutine that owns it): it takes no more requests, is closed (which ends
// the server's session, and every lock on it, if it still lives), and every
// Lock held on it is told.
//
// A close the Locker chose (its Close, a waiting connection it gives up:
// why is Config.Closed or ErrGone itself) waits for the server to end
// the session (see EndSession), so that its locks are free and its place
// in the session budget is empty, as the server counts them, before the
// holders are told and another connection takes the place. A loss closes
// at once: the holders must hear of it without delay.
func (c *Conn) lose(err error) {
	c.markDead(err)
	c.mu.Lock()
	if c.idleTimer != nil && c.idleTimer.Stop() {
		c.idlePending = false
	}
	conn, proof, counted := c.conn, c.proof, c.counted
	c.counted = false
	c.mu.Unlock()
	if counted {
		if conn != nil && conn.IsClosed() {
			// pgx closed it, in a statement cut short (asyncClose: a
			// cancel request, Terminate, then reading until the server
			// ends the session), or an earlier close did: counted out
			// when that is done, without holding up the holders' news.
			c.g.sessionEndedWith(conn.PgConn().CleanupDone())
		} else {
			defer c.g.sessionEnded() // after the close below
		}
	}
	if conn != nil && !conn.IsClosed() {
		if err == ErrGone || errors.Is(err, c.g.cfg.Closed) {
			bound := min(c.g.cfg.StatementBound, MaxSessionEnd)
			if proof != nil {
				// Through a pooler the end of the socket is the pooler's,
				// which resets the server session only afterwards: the
				// locks are given back first, on the session itself.
				unlockAll(conn, bound)
			}
			EndSession(conn, bound)
		} else {
			ctx, cancel := context.WithTimeout(context.Background(), c.g.cfg.ReleaseTimeout)
			_ = conn.Close(ctx)
			cancel()
		}
	}
	c.g.owner.Lost(c, err)
}

// unlockAll gives back every session lock of conn, which nobody else uses,
// bounded by bound (a deadline on the socket: pgx closes the connection if
// it passes).
func unlockAll(conn *pgx.Conn, bound time.Duration) {
	if conn.PgConn().Conn().SetDeadline(time.Now().Add(bound)) != nil {
		return
	}
	_, _ = conn.PgConn().Exec(context.Background(), "SELECT pg_catalog.pg_advisory_unlock_all()").ReadAll()
}

// MaxSessionEnd bounds how long EndSession waits for the server.
const MaxSessionEnd = time.Second

// EndSession closes conn, which nobody else uses, and waits (at most bound)
// for the server to end its session. pgx's Close sends Terminate and
// returns at once, while the server's backend is still releasing its locks
// and leaving pg_stat_activity: a moment in which another session cannot
// take the keys yet, and the closed session still counts against
// max_connections and the Locker's budget. The server closes its end of
// the socket only once its backend has done both (PostgreSQL releases the
// locks and the activity entry in shmem_exit, before the on_proc_exit
// callback that closes the socket), so EndSession sends Terminate itself
// and reads until the server closes, then closes conn.
func EndSession(conn *pgx.Conn, bound time.Duration) {
	nc := conn.PgConn().Conn()
	if err := nc.SetDeadline(time.Now().Add(bound)); err == nil {
		if _, err := nc.Write([]byte{'X', 0, 0, 0, 4}); err == nil {
			_, _ = io.Copy(io.Discard, nc)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	_ = conn.Close(ctx)
}

// AwaitServerEnd reads nc, a connection whose server session has ended
// (FATAL), until the server closes its end, for at most bound: PostgreSQL
// closes a backend's socket last, once the backend has given back its locks
// and its places (pg_stat_activity, max_connections). What it reads is
// discarded.
func AwaitServerEnd(nc net.Conn, bound time.Duration) {
	if err := nc.SetReadDeadline(time.Now().Add(bound)); err != nil {
		return
	}
	_, _ = io.Copy(io.Discard, nc)
}

// AddHolds changes the count of server locks held (for a waiting
// connection's wait, which runs outside exec).
func (c *Conn) AddHolds(n int) {
	c.mu.Lock()
	c.holds += n
	c.mu.Unlock()
}

// HoldsAny reports whether the connection holds a server lock.
func (c *Conn) HoldsAny() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.holds > 0
}

// IsDead reports whether the connection takes no more requests.
func (c *Conn) IsDead() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dead != nil
}

// Close closes the connection once the goroutine using it is done: every
// lock on it is lost (the server ends them with the session). A connect
// still under way (its requests gave up on it) is waited for, at most
// MaxSessionEnd: it ends its new session itself (see dial), so that the
// session is gone when Close returns, as the session budget counts it (a
// Leader whose Run was stopped mid-connect has no session left).
func (c *Conn) Close(why error) {
	c.Do(&Op{closing: why})
	c.mu.Lock()
	dialing := c.dialing
	c.mu.Unlock()
	if dialing != nil {
		t := time.NewTimer(MaxSessionEnd)
		defer t.Stop()
		select {
		case <-dialing:
		case <-t.C:
		}
	}
}

// Busy reports whether a goroutine is using the connection (its requests
// would queue).
func (c *Conn) Busy() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.active
}

// Free reports whether the connection is open, not known to be lost, and
// unused: a request sent now runs at once. (The pgx connection itself is
// not asked: its watch may be using it.)
func (c *Conn) Free() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.active && c.dead == nil && c.conn != nil
}

// HasConn reports whether the lock connection has been opened.
func (c *Conn) HasConn() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conn != nil
}

// SessionPID returns the server pid of c's session: through a pooler the
// server's (see pooler.Proof), else the one the connection's startup
// reported; 0 when c is not open.
func (c *Conn) SessionPID() int64 {
	c.mu.Lock()
	conn, proof := c.conn, c.proof
	c.mu.Unlock()
	switch {
	case proof != nil:
		return int64(proof.PID()) // through a pooler: the server's pid
	case conn != nil:
		return int64(conn.PgConn().PID())
	}
	return 0
}
