package pglock

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

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
		ctx, cancel := context.WithTimeout(context.Background(), c.m.releaseTimeout)
		_ = conn.Close(ctx)
		cancel()
		c.mu.Lock()
		c.conn = nil
		c.mu.Unlock()
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
	c.dialing = done
	go func() {
		conn, err := c.m.connect(c.m.closing, c.slot >= 0)
		c.mu.Lock()
		defer c.mu.Unlock()
		c.dialing = nil
		defer close(done)
		switch {
		case err != nil:
			c.dialErr = err
			if c.dead == nil {
				c.dead = err
			}
		case c.dead != nil: // lost or closed meanwhile (the Locker's Close)
			ctx, cancel := context.WithTimeout(context.Background(), c.m.releaseTimeout)
			_ = conn.Close(ctx)
			cancel()
		default:
			c.conn, c.connAt, c.proof = conn, time.Now(), pooler.ProofOf(conn)
		}
	}()
	return done
}

// exec sends the lock and unlock requests of batch in one statement, bounded
// by a socket deadline (not by a context: see pgxBackend.detach) of
// mux.statementBound, so that a connection that goes silent while requests
// keep it busy (and its watch stopped) is lost within the same bound as an
// idle one.
func (c *lockConn) exec(batch []*connOp) {
	c.m.statements.Add(1)
	conn := c.conn
	nc := conn.PgConn().Conn()
	_ = nc.SetDeadline(time.Now().Add(c.m.statementBound()))
	ctx := context.Background()
	err := c.block()
	switch {
	case err != nil:
	case c.proof != nil:
		err = execBatch(ctx, conn, batch, c.proof)
	case len(batch) == 1:
		o := batch[0]
		st := &fixed[Session][o.mode][pairIndex(o.key)]
		switch {
		case o.check:
			err = conn.QueryRow(ctx, checkSQL).Scan(&o.ok)
		case o.probe:
			err = conn.QueryRow(ctx, sharedProbeSQL[pairIndex(o.key)], o.key.args()...).Scan(&o.ok)
		case o.retake:
			var r int32
			err = conn.QueryRow(ctx, retakeSQL[pairIndex(o.key)], o.key.args()...).Scan(&r)
			o.ok, o.retaken = r >= 1, r == 2
		case o.unlock:
			err = conn.QueryRow(ctx, st.unlock, o.key.args()...).Scan(&o.ok)
		default:
			err = conn.QueryRow(ctx, st.try, o.key.args()...).Scan(&o.ok)
		}
	default:
		err = execBatch(ctx, conn, batch, nil)
	}
	// The deadline is left in place (one timer change less per statement):
	// the next statement sets its own, and the watch and the connection's
	// other uses clear it first (see flush and connwatch.Conn.Run).
	if err != nil {
		c.failed(batch, err)
		return
	}
	c.mu.Lock()
	for _, o := range batch {
		switch {
		case o.check, o.probe, o.retaken:
		case o.unlock:
			c.holds--
		case o.ok:
			c.holds++
		}
	}
	c.mu.Unlock()
}

// A lock connection that holds many locks runs its statements inside an
// open transaction block. PostgreSQL walks a session's whole local lock table
// at the end of every transaction, the implicit one of each statement
// included, so outside a block every statement on a connection holding N
// locks pays for N (about 55 ns each: 0.7 ms at 10,000 held); inside one it
// pays nothing, and session locks ignore the block (they survive its commit
// and rollback, and an unlock frees the key at once). A block opens once
// the connection holds blockFrom locks; it ends when the connection holds
// fewer than half of that, before any other use of the connection (a
// fencing token writes, and must commit), after a failed statement (rolled
// back), when the connection goes idle (the watch's first ping, after a
// quiet check interval, commits instead: see idlePing), and it is renewed
// after blockMaxAge of constant use. So no transaction stays open for long:
// the block writes nothing (no transaction ID); between its statements it
// keeps the snapshot of the last one (the unnamed portal of the extended
// protocol), which a busy connection renews with every statement and an
// idle one drops within a check interval; pg_stat_activity shows it "idle
// in transaction" only between statements. The server ends a silent
// client's session as before (idle_in_transaction_session_timeout, set with
// idle_session_timeout: see mux.connect). Through a pooler (proof) the
// connection never opens a block.
const (
	blockFrom   = 64
	blockMaxAge = 5 * time.Second
)

// block opens, renews or ends the connection's transaction block before a
// statement (see blockFrom), in one extra round trip when it does.
func (c *lockConn) block() error {
	if c.slot < 0 || c.proof != nil {
		return nil
	}
	c.mu.Lock()
	holds := c.holds
	c.mu.Unlock()
	var q string
	switch st := c.conn.PgConn().TxStatus(); {
	case st == 'E' && holds >= blockFrom:
		q = "ROLLBACK; BEGIN"
	case st == 'E':
		q = "ROLLBACK"
	case st == 'I' && holds >= blockFrom:
		q = "BEGIN"
	case st == 'T' && holds < blockFrom/2:
		q = "COMMIT"
	case st == 'T' && time.Since(c.blockAt) >= blockMaxAge:
		q = "COMMIT; BEGIN"
	default:
		return nil
	}
	if _, err := c.conn.PgConn().Exec(context.Background(), q).ReadAll(); err != nil {
		return err
	}
	c.blockAt = time.Now()
	return nil
}

// idlePing is the watch's ping of an idle lock connection: it ends an open
// transaction block instead (a round trip too, off the callers' path), so
// that an idle connection keeps no snapshot (that of its last statement's
// portal) and is not left idle in transaction; the next lock request opens
// a new one. The watch runs only while the goroutine that owns the
// connection leaves it alone.
func (c *lockConn) idlePing(ctx context.Context) error {
	if c.conn.PgConn().TxStatus() != 'I' {
		return c.conn.PgConn().Exec(ctx, "COMMIT").Close()
	}
	return c.conn.Ping(ctx)
}

// endBlock ends the connection's transaction block, if one is open, before
// a use of the connection that is not a lock request (see blockFrom).
func (c *lockConn) endBlock() error {
	if c.conn == nil {
		return nil
	}
	q := "COMMIT"
	switch c.conn.PgConn().TxStatus() {
	case 'I':
		return nil
	case 'E':
		q = "ROLLBACK"
	}
	_, err := c.conn.PgConn().Exec(context.Background(), q).ReadAll()
	return err
}

// retakeSQL is the retake of a bigint and of a pair key: 0 when the unlock
// found the key not held, 1 when it was unlocked, 2 when it was unlocked and
// taken again.
// checkSQL is a check request alone (see connOp.check).
const checkSQL = `SELECT true`

// sharedProbeSQL is a probe request alone (see connOp.probe), of a bigint and of a
// pair key.
var sharedProbeSQL = [2]string{
	`SELECT CASE WHEN pg_try_advisory_lock_shared($1::bigint) THEN pg_advisory_unlock_shared($1::bigint) ELSE false END`,
	`SELECT CASE WHEN pg_try_advisory_lock_shared($1::integer, $2::integer) THEN pg_advisory_unlock_shared($1::integer, $2::integer) ELSE false END`,
}

var retakeSQL = [2]string{
	`SELECT CASE WHEN pg_advisory_unlock($1::bigint) THEN CASE WHEN pg_try_advisory_lock($1::bigint) THEN 2 ELSE 1 END ELSE 0 END`,
	`SELECT CASE WHEN pg_advisory_unlock($1::integer, $2::integer) THEN CASE WHEN pg_try_advisory_lock($1::integer, $2::integer) THEN 2 ELSE 1 END ELSE 0 END`,
}

// batchSQL takes and gives back many keys in one statement: each row of the
// arrays is one request (op: bit 0 shared, bit 1 pair key, bit 2 unlock, bit
// 3 retake, bit 5 probe; 16 a check, which answers 1), answered by its ordinal and the function's result as 1 or 0
// (a retake as retakeSQL answers).
const batchSQL = `SELECT t.i, ` + batchOps + `
FROM unnest($1::int2[], $2::int8[], $3::int4[], $4::int4[]) WITH ORDINALITY AS t(op, k, a, b, i)`

// provenBatchSQL is batchSQL on a connection through a pooler: the requests
// run only when the statement runs on the server session the connection
// claimed ($5 its pid, $6 the claim's token), in the same statement, else
// every row answers -1 and nothing is taken or given back (see
// pooler.Proof).
const provenBatchSQL = `SELECT t.i, CASE WHEN pg_backend_pid() = $5::int8 AND current_setting('` + pooler.Setting +
	`', true) IS NOT DISTINCT FROM $6::text THEN ` + batchOps + ` ELSE -1 END
FROM unnest($1::int2[], $2::int8[], $3::int4[], $4::int4[]) WITH ORDINALITY AS t(op, k, a, b, i)`

// batchOps is the request of one row of batchSQL.
const batchOps = `CASE t.op
 WHEN 0 THEN pg_try_advisory_lock(t.k)::int WHEN 1 THEN pg_try_advisory_lock_shared(t.k)::int
 WHEN 2 THEN pg_try_advisory_lock(t.a, t.b)::int WHEN 3 THEN pg_try_advisory_lock_shared(t.a, t.b)::int
 WHEN 4 THEN pg_advisory_unlock(t.k)::int WHEN 5 THEN pg_advisory_unlock_shared(t.k)::int
 WHEN 6 THEN pg_advisory_unlock(t.a, t.b)::int WHEN 7 THEN pg_advisory_unlock_shared(t.a, t.b)::int
 WHEN 12 THEN CASE WHEN pg_advisory_unlock(t.k) THEN CASE WHEN pg_try_advisory_lock(t.k) THEN 2 ELSE 1 END ELSE 0 END
 WHEN 14 THEN CASE WHEN pg_advisory_unlock(t.a, t.b) THEN CASE WHEN pg_try_advisory_lock(t.a, t.b) THEN 2 ELSE 1 END ELSE 0 END
 WHEN 16 THEN 1
 WHEN 33 THEN CASE WHEN pg_try_advisory_lock_shared(t.k) THEN pg_advisory_unlock_shared(t.k)::int ELSE 0 END
 WHEN 35 THEN CASE WHEN pg_try_advisory_lock_shared(t.a, t.b) THEN pg_advisory_unlock_shared(t.a, t.b)::int ELSE 0 END
 END::int`

// execBatch runs batch in one statement; with proof (a connection through
// a pooler), only on the session the connection claimed: elsewhere it takes
// nothing and returns pooler.ErrSessionMoved.
func execBatch(ctx context.Context, conn *pgx.Conn, batch []*connOp, proof *pooler.Proof) error {
	ops := make([]int16, len(batch))
	ks := make([]int64, len(batch))
	as := make([]int32, len(batch))
	bs := make([]int32, len(batch))
	for i, o := range batch {
		var op int16
		if o.mode == Shared {
			op |= 1
		}
		if o.key.pair {
			op |= 2
			as[i], bs[i] = o.key.halves()
		} else {
			ks[i] = o.key.v
		}
		if o.unlock {
			op |= 4
		}
		if o.retake {
			op |= 8
		}
		if o.probe {
			op |= 32
		}
		if o.check {
			op = 16
		}
		ops[i] = op
	}
	var rows pgx.Rows
	var err error
	if proof != nil {
		rows, err = conn.Query(ctx, provenBatchSQL, ops, ks, as, bs, int64(proof.PID()), proof.Token())
	} else {
		rows, err = conn.Query(ctx, batchSQL, ops, ks, as, bs)
	}
	if err != nil {
		return err
	}
	n, moved := 0, false
	for rows.Next() {
		var i int64
		var r int32
		if err := rows.Scan(&i, &r); err != nil {
			rows.Close()
			return err
		}
		if i < 1 || int(i) > len(batch) {
			rows.Close()
			return fmt.Errorf("pglock: batch answered row %d of %d", i, len(batch))
		}
		o := batch[i-1]
		o.ok, o.retaken = r >= 1, o.retake && r == 2
		moved = moved || r < 0
		n++
	}
	if err := rows.Err(); err != nil {
		return err
	}
	if moved {
		return pooler.ErrSessionMoved
	}
	if n != len(batch) {
		return fmt.Errorf("pglock: batch answered %d rows of %d", n, len(batch))
	}
	return nil
}

// failed handles a statement of batch that failed. Session locks ignore
// transactions: a statement that failed half way (the server's lock table
// full, say) keeps the locks it took before the error. So every key of the
// batch that this session holds is given back (looked up in pg_locks); when
// even that fails, or the connection died, the connection is lost, and with
// it every lock on it.
func (c *lockConn) failed(batch []*connOp, err error) {
	if errors.Is(err, pooler.ErrSessionMoved) {
		// Through a transaction pooler: nothing of the statement ran, and
		// the session that holds this connection's locks cannot be reached
		// for sure. The connection, and every later one, is refused.
		c.m.refused.Store(&err)
		c.lose(err)
		for _, o := range batch {
			o.ok, o.retaken, o.err = false, false, err
		}
		return
	}
	if !c.conn.IsClosed() {
		if cerr := c.cleanup(batch); cerr == nil {
			c.mu.Lock()
			for _, o := range batch {
				if o.check {
					o.ok = true // the session lives: the cleanup ran on it
					continue
				}
				if o.probe { // inconclusive; nothing of it is held (cleanup)
					o.ok, o.err = false, err
					continue
				}
				if o.unlock {
					c.holds-- // given back by the cleanup
					o.ok, o.retaken = true, false
				} else {
					o.ok, o.err = false, lockFailed(err)
				}
			}
			c.mu.Unlock()
			return
		} else {
			err = join(err, cerr)
		}
	}
	c.lose(err)
	for _, o := range batch {
		o.ok, o.retaken = false, false
		o.err = fmt.Errorf("%w: %w", errConnGone, err)
	}
}

// cleanup gives back every key of batch that this session holds, with one
// unlock each: the key table sends a lock request only for a key that no
// Lock of the Locker holds (so this session holds it once at most, taken by
// the failed statement itself), and an unlock or retake only for a key held
// once, so one unlock leaves it not held whatever the statement did before
// it failed (an unlock of a key not held just answers false). Plain unlocks
// need no slot of the server's lock table: they work when it is full, where
// a look-up in pg_locks would fail too.
func (c *lockConn) cleanup(batch []*connOp) error {
	ctx := context.Background()
	nc := c.conn.PgConn().Conn()
	_ = nc.SetDeadline(time.Now().Add(c.m.releaseTimeout))
	defer func() {
		if !c.conn.IsClosed() {
			_ = nc.SetDeadline(time.Time{})
		}
	}()
	if err := c.endBlock(); err != nil { // a failed block is rolled back
		return err
	}
	var b pgx.Batch
	for _, o := range batch {
		if o.check {
			continue
		}
		b.Queue(fixed[Session][o.mode][pairIndex(o.key)].unlock, o.key.args()...)
	}
	return retryCanceled(func() error { return c.conn.SendBatch(ctx, &b).Close() })
}

// lockFailed is the error of a lock request whose statement failed while the
// connection lives on: a full lock table (out of shared memory, 53200) is
// ErrTooManyLocks, which fails that acquire only.
func lockFailed(err error) error {
	if outOfSharedMemory(err) {
		return fmt.Errorf("%w: the server's lock table is full (max_locks_per_transaction * (max_connections + max_prepared_transactions) slots, shared by every session): %w",
			ErrTooManyLocks, err)
	}
	return err
}

// outOfSharedMemory reports whether err is the server's "out of shared
// memory" (53200): a full lock table.
func outOfSharedMemory(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "53200"
}

func pairIndex(k Key) int {
	if k.pair {
		return 1
	}
	return 0
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
func (c *lockConn) lose(err error) {
	c.markDead(err)
	c.mu.Lock()
	conn := c.conn
	c.mu.Unlock()
	if conn != nil && !conn.IsClosed() {
		ctx, cancel := context.WithTimeout(context.Background(), c.m.releaseTimeout)
		_ = conn.Close(ctx)
		cancel()
	}
	c.m.connLost(c, err)
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
