package pglock

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/pglock/internal/connwatch"
	"github.com/pglockkit/kit/pglock/internal/keytable"
	"github.com/pglockkit/kit/pglock/internal/pooler"
)

// lockConn is one PostgreSQL session that a multiplexing Locker opened for
// itself (a "lock connection"): it holds the session locks of many Locks at
// once. Lock and unlock requests of concurrent goroutines are combined: the
// goroutine that finds the connection free sends every queued request in one
// statement (one round trip), and hands the connection to the next queued
// goroutine when it is done, so no goroutine runs while the connection is
// idle except its watch. A waiting connection (slot < 0) is a lockConn that
// one goroutine uses alone, to wait in the server's queue and then hold what
// it got.
//
// While it holds a lock and nobody uses it, the connection is watched (see
// connwatch.Conn); when it dies or goes silent every lock on it is lost at once.
//
// This file holds the queue of requests and the connection's life (open,
// lost, closed); lockconn_batch.go the statement that runs a batch of
// requests and what its failure means; lockconn_block.go the transaction
// block a connection holding many locks runs its statements in.
type lockConn struct {
	m    *mux
	slot int // index in mux.conns, or -1 for a waiting connection
	// placed: a waiting connection that holds a place among WithWaitConns
	// (see mux.wait); guarded by the mux's mutex.
	placed bool

	mu     sync.Mutex
	conn   *pgx.Conn // nil until the first use opens it
	connAt time.Time // when conn was opened
	// proof: conn goes through a pooler; its statements prove they run on
	// the server session it claimed (see pooler.Proof). Set with conn.
	proof *pooler.Proof
	// counted: conn's session is counted in the mux's sessions, until the
	// goroutine that clears this closes it (see mux.waitSessions).
	counted bool
	// dialing is closed when the connect under way is done (nil when none
	// is); dialErr is why the last one failed.
	dialing chan struct{}
	dialErr error
	queue   []*connOp
	active  bool  // a goroutine owns the connection (flushes or waits)
	dead    error // the connection was lost or closed: no new request is taken
	holds   int   // server locks held on it

	// watch watches the connection while it holds locks and nobody uses it,
	// and lastUsed is when it last ran a statement; only the goroutine that
	// owns the connection touches them.
	watch    connwatch.Rewatch
	lastUsed time.Time
	// blockAt is when the connection's open transaction block began (see
	// block); only the goroutine that owns the connection touches it.
	blockAt time.Time

	// kt is the key table's record of the connection: it is marked lost
	// (see keyTable.LoseConn) so that a grant recorded after the loss is
	// known to be lost too.
	kt keytable.ConnState
}

// KeyTableState returns the key table's record of c (see keytable.Conn).
func (c *lockConn) KeyTableState() *keytable.ConnState { return &c.kt }

// connOp is one request to a lockConn: a non-blocking lock or an unlock of
// one key, or (fn) a use of the connection alone.
type connOp struct {
	unlock bool
	// retake (with unlock, Exclusive mode) takes the key again with the
	// non-blocking function right after the unlock, in the same statement:
	// a hand-off to the next waiter of the process in one round trip, in
	// which a waiter of another session, queued in the server, is served
	// first (the unlock grants it the key, so the retake fails).
	retake  bool
	retaken bool // the retake's result
	key     Key
	mode    Mode
	fn      func(*pgx.Conn)
	// bounded: fn runs under the statement bound on a waiting connection
	// too (on a lock connection it always does).
	bounded bool
	// check (a request) proves that the session is still alive, by a
	// statement on it: the release of a shared co-holder, which unlocks
	// nothing, still learns whether the lock lived until then.
	check bool
	// probe (a request, Shared mode) asks whether a new shared request of
	// another session would be granted now: false when a session waits for
	// (or holds) the key in Exclusive mode (see keytable.Config.Probes). It
	// takes nothing: what it takes it gives back in the same statement.
	probe bool
	// closing closes the connection (for this reason) instead.
	closing error
	// ctx bounds the connect, when the request is the first on a new
	// connection (nil: only the connect bound).
	ctx context.Context
	// member: the request is one of a key set's (see setBatch), also when
	// ctx does not say so (an unlock has no ctx).
	member *setMember

	ok    bool  // the function's result
	err   error // the request failed (see errConnGone)
	lead  bool  // handed the connection: the receiver flushes the queue
	retry bool  // put back in the queue after a connect cut short
	done  chan struct{}
}

// isRequest reports whether o is a lock or unlock request, which can share a
// statement with others.
func (o *connOp) isRequest() bool { return o.fn == nil && o.closing == nil }

// errConnGone: a lock connection that is lost or closed took a request; the
// request was not sent, or was sent on a session that then ended, so it holds
// nothing.
var errConnGone = errors.New("pglock: lock connection gone")

// do runs op on the connection and returns when op has its result.
func (c *lockConn) do(op *connOp) {
	op.done, op.lead, op.retry = nil, false, false
	c.mu.Lock()
	if c.dead != nil {
		c.mu.Unlock()
		op.err = fmt.Errorf("%w: %w", errConnGone, c.dead)
		return
	}
	member := op.setMember()
	if c.active {
		// Another goroutine owns the connection: wait to be served or handed
		// it. (A request that finds it free needs no channel.)
		op.done = make(chan struct{})
		c.queue = append(c.queue, op)
		c.mu.Unlock()
		member.arrive()
		if !c.await(op) {
			return
		}
		c.mu.Lock()
	} else {
		c.active = true
		c.queue = append(c.queue, op)
		if member != nil && !member.arrive() {
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
		c.active = false
		c.queue = nil
	}
	c.mu.Unlock()
}

// await waits until op is done, or is handed the connection (then it
// reports true). A request whose context ends while it is still queued, not
// yet sent, leaves the queue and fails with its context's error; one already
// sent is waited for: its result may be a lock to own.
func (c *lockConn) await(op *connOp) bool {
	var ended <-chan struct{}
	if op.ctx != nil {
		ended = op.ctx.Done()
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
			op.err = op.ctx.Err()
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
func (c *lockConn) flush(batch []*connOp) (retry []*connOp) {
	for _, o := range batch {
		o.retry = false // set again below if the connect is cut short again
	}
	c.watch.Stop()
	if why := batch[0].closing; why != nil {
		c.lose(why) // run by the goroutine that owns the connection
		return nil
	}
	if err := c.open(batch); err != nil {
		for _, o := range batch {
			switch {
			case !errors.Is(err, errConnectCut):
				o.err = err
			case ctxEnded(o.ctx) != nil:
				o.err = connectingErr(ctxEnded(o.ctx))
			case o == batch[0]: // the caller of flush does not wait again
				o.err = err
			default:
				o.retry = true
				retry = append(retry, o)
			}
		}
		return retry
	}
	if o := batch[0]; o.fn != nil {
		// On a lock connection, and for a bounded use of a waiting one (a
		// fencing token), the use is bounded like a statement (see exec):
		// a silent network is noticed within the same bound as when idle,
		// and the connection is lost then. A wait is not: it lasts as
		// long as its context allows (see interruptible).
		var dl time.Time
		if c.slot >= 0 || o.bounded {
			dl = time.Now().Add(c.m.statementBound())
		}
		_ = c.conn.PgConn().Conn().SetDeadline(dl)
		if err := c.endBlock(); err != nil {
			c.lose(err)
			return nil
		}
		o.fn(c.conn)
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
	c.mu.Unlock()
	if watch {
		c.watch.Arm(c.conn, c.m.lostCheck, c.lose, c.idlePing)
	}
	return nil
}

// errConnectCut: the requests for which a connect runs all ended before it
// was done; the connection is not lost: the connect goes on, and other
// requests find it done (see lockConn.open).
var errConnectCut = errors.New("pglock: no connection to the server yet, a connect is under way")

// connectContext returns the context for a connect on behalf of batch: that
// of the first request whose context has not ended (nil when one has none).
func connectContext(batch []*connOp) (context.Context, bool) {
	for _, o := range batch {
		if ctxEnded(o.ctx) == nil {
			return o.ctx, true
		}
	}
	return nil, false
}

// ctxEnded returns ctx's error, or DeadlineExceeded once its deadline has
// passed (a dial cut by the deadline can return before ctx's timer fires);
// nil for a nil ctx.
func ctxEnded(ctx context.Context) error {
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
// mux.connect).
//
// The connect is the Locker's, not the request's: it runs in a goroutine of
// its own, bounded by the connect timeout (the pool's ConnectTimeout, else
// the release timeout) and by the Locker's Close. open waits for it as long
// as the context of one request of batch allows; when they have all ended,
// it returns errConnectCut and the connect goes on, so that the next request
// finds it done (a cold Locker is not kept cold by callers with short
// deadlines).
func (c *lockConn) open(batch []*connOp) error {
	c.mu.Lock()
	dead, conn, holds, connAt := c.dead, c.conn, c.holds, c.connAt
	c.mu.Unlock()
	if conn != nil && c.lastUsed.Before(connAt) {
		c.lastUsed = connAt // connected in the background since
	}
	switch {
	case dead != nil:
		return fmt.Errorf("%w: %w", errConnGone, dead)
	case conn != nil && conn.IsClosed():
		c.lose(errors.New("connection closed"))
		return errConnGone
	case conn != nil && holds == 0 && time.Since(c.lastUsed) > c.m.abandonBound()/2:
		c.mu.Lock()
		c.conn = nil
		counted := c.counted
		c.counted = false
		c.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), c.m.releaseTimeout)
		_ = conn.Close(ctx)
		cancel()
		if counted {
			c.m.sessionEnded()
		}
	case conn != nil:
		return nil
	}
	dialed := c.dial()
	for {
		ctx, ok := connectContext(batch)
		if !ok {
			return errConnectCut
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
					err = ErrLockerClosed
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
func (c *lockConn) dial() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dialing != nil {
		return c.dialing
	}
	done := make(chan struct{})
	if !c.m.sessionStarted() {
		// The Locker is closed: no new session.
		c.dialErr = ErrLockerClosed
		if c.dead == nil {
			c.dead = ErrLockerClosed
		}
		close(done)
		return done
	}
	c.dialing = done
	go func() {
		// Not cut by the Locker's Close at once: Close waits for the
		// connect and ends its session (see mux.waitSessions).
		conn, err := c.m.connect(c.m.dialing, c.slot >= 0)
		c.mu.Lock()
		c.dialing = nil
		switch {
		case err != nil:
			c.dialErr = err
			if c.dead == nil {
				c.dead = err
			}
			c.m.sessionEnded()
		case c.dead != nil || c.m.closing.Err() != nil:
			// Lost or closed meanwhile (the Locker's Close): the new
			// session ends before Close returns.
			if c.dead == nil {
				c.dead = ErrLockerClosed
			}
			c.dialErr = c.dead
			c.mu.Unlock()
			endSession(conn, min(c.m.statementBound(), maxSessionEnd))
			c.m.sessionEnded()
			close(done)
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
func (c *lockConn) markDead(err error) {
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
// why is ErrLockerClosed or errConnGone itself) waits for the server to end
// the session (see endSession), so that its locks are free and its place
// in the session budget is empty, as the server counts them, before the
// holders are told and another connection takes the place. A loss closes
// at once: the holders must hear of it without delay.
func (c *lockConn) lose(err error) {
	c.markDead(err)
	c.mu.Lock()
	conn, proof, counted := c.conn, c.proof, c.counted
	c.counted = false
	c.mu.Unlock()
	if counted {
		if conn != nil && conn.IsClosed() {
			// pgx closed it, in a statement cut short (asyncClose: a
			// cancel request, Terminate, then reading until the server
			// ends the session), or an earlier close did: counted out
			// when that is done, without holding up the holders' news.
			c.m.sessionEndedWith(conn.PgConn().CleanupDone())
		} else {
			defer c.m.sessionEnded() // after the close below
		}
	}
	if conn != nil && !conn.IsClosed() {
		if err == errConnGone || errors.Is(err, ErrLockerClosed) {
			bound := min(c.m.statementBound(), maxSessionEnd)
			if proof != nil {
				// Through a pooler the end of the socket is the pooler's,
				// which resets the server session only afterwards: the
				// locks are given back first, on the session itself.
				unlockAll(conn, bound)
			}
			endSession(conn, bound)
		} else {
			ctx, cancel := context.WithTimeout(context.Background(), c.m.releaseTimeout)
			_ = conn.Close(ctx)
			cancel()
		}
	}
	c.m.connLost(c, err)
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

// maxSessionEnd bounds how long endSession waits for the server.
const maxSessionEnd = time.Second

// endSession closes conn, which nobody else uses, and waits (at most bound)
// for the server to end its session. pgx's Close sends Terminate and
// returns at once, while the server's backend is still releasing its locks
// and leaving pg_stat_activity: a moment in which another session cannot
// take the keys yet, and the closed session still counts against
// max_connections and the Locker's budget. The server closes its end of
// the socket only once its backend has done both (PostgreSQL releases the
// locks and the activity entry in shmem_exit, before the on_proc_exit
// callback that closes the socket), so endSession sends Terminate itself
// and reads until the server closes, then closes conn.
func endSession(conn *pgx.Conn, bound time.Duration) {
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

// addHolds changes the count of server locks held (for a waiting
// connection's wait, which runs outside exec).
func (c *lockConn) addHolds(n int) {
	c.mu.Lock()
	c.holds += n
	c.mu.Unlock()
}

// holdsAny reports whether the connection holds a server lock.
func (c *lockConn) holdsAny() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.holds > 0
}

// isDead reports whether the connection takes no more requests.
func (c *lockConn) isDead() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dead != nil
}

// close closes the connection once the goroutine using it is done: every
// lock on it is lost (the server ends them with the session).
func (c *lockConn) close(why error) {
	c.do(&connOp{closing: why})
}

// busy reports whether a goroutine is using the connection (its requests
// would queue).
func (c *lockConn) busy() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.active
}

// free reports whether the connection is open, not known to be lost, and
// unused: a request sent now runs at once. (The pgx connection itself is
// not asked: its watch may be using it.)
func (c *lockConn) free() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.active && c.dead == nil && c.conn != nil
}

// hasConn reports whether the lock connection has been opened.
func (c *lockConn) hasConn() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conn != nil
}
