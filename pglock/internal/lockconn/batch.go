package lockconn

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pglockkit/kit/pglock/internal/pooler"
)

// exec sends the lock and unlock requests of batch in one statement, bounded
// by a socket deadline (not by a context: see pglock's pgxBackend.detach) of
// Config.StatementBound, so that a connection that goes silent while requests
// keep it busy (and its watch stopped) is lost within the same bound as an
// idle one.
func (c *Conn) exec(batch []*Op) {
	c.g.statements.Add(1)
	conn := c.conn
	nc := conn.PgConn().Conn()
	_ = nc.SetDeadline(time.Now().Add(c.g.cfg.StatementBound))
	ctx := context.Background()
	err := c.block()
	switch {
	case err != nil:
	case c.proof != nil:
		err = execBatch(ctx, conn, batch, c.proof)
	case len(batch) == 1:
		o := batch[0]
		st := &c.g.cfg.Statements[o.sharedIndex()][o.pairIndex()]
		sql := st.Try
		switch {
		case o.Check:
			sql = CheckSQL
		case o.Probe:
			sql = sharedProbeSQL[o.pairIndex()]
		case o.Retake:
			sql = retakeSQL[o.pairIndex()]
		case o.Unlock:
			sql = st.Unlock
		}
		var r int32
		r, err = c.one(ctx, conn, sql, o)
		o.answer(r)
	case c.direct(conn):
		err = c.batch(ctx, conn, batch)
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
		case o.Check, o.Probe, o.Retaken:
		case o.Unlock:
			c.holds--
		case o.OK:
			c.holds++
		}
	}
	c.mu.Unlock()
}

// retakeSQL is the retake of a bigint and of a pair key: 0 when the unlock
// found the key not held, 1 when it was unlocked, 2 when it was unlocked and
// taken again.
// CheckSQL is a check request alone (see Op.Check).
const CheckSQL = `SELECT true`

// sharedProbeSQL is a probe request alone (see Op.Probe), of a bigint and of a
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
func execBatch(ctx context.Context, conn *pgx.Conn, batch []*Op, proof *pooler.Proof) error {
	ops := make([]int16, len(batch))
	ks := make([]int64, len(batch))
	as := make([]int32, len(batch))
	bs := make([]int32, len(batch))
	for i, o := range batch {
		ops[i] = o.batchOp()
		if o.Pair {
			as[i], bs[i] = o.halves()
		} else {
			ks[i] = o.Key
		}
	}
	var rows pgx.Rows
	var err error
	switch {
	case proof != nil:
		rows, err = conn.Query(ctx, provenBatchSQL, ops, ks, as, bs, int64(proof.PID()), proof.Token())
	default:
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
		batch[i-1].answer(r)
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

// batchOp is o's op in batchSQL.
func (o *Op) batchOp() int16 {
	if o.Check {
		return 16
	}
	var op int16
	if o.Shared {
		op |= 1
	}
	if o.Pair {
		op |= 2
	}
	if o.Unlock {
		op |= 4
	}
	if o.Retake {
		op |= 8
	}
	if o.Probe {
		op |= 32
	}
	return op
}

// answer records r, a row's result of batchSQL, as o's.
func (o *Op) answer(r int32) {
	o.OK, o.Retaken = r >= 1, o.Retake && r == 2
}

// failed handles a statement of batch that failed. Session locks ignore
// transactions: a statement that failed half way (the server's lock table
// full, say) keeps the locks it took before the error. So every key of the
// batch that this session holds is given back (looked up in pg_locks); when
// even that fails, or the connection died, the connection is lost, and with
// it every lock on it.
func (c *Conn) failed(batch []*Op, err error) {
	if errors.Is(err, pooler.ErrSessionMoved) {
		// Through a transaction pooler: nothing of the statement ran, and
		// the session that holds this connection's locks cannot be reached
		// for sure. The connection, and every later one, is refused.
		c.g.owner.Refuse(err)
		c.lose(err)
		for _, o := range batch {
			o.OK, o.Retaken, o.Err = false, false, err
		}
		return
	}
	if !c.conn.IsClosed() {
		if cerr := c.cleanup(batch); cerr == nil {
			c.mu.Lock()
			for _, o := range batch {
				if o.Check {
					o.OK = true // the session lives: the cleanup ran on it
					continue
				}
				if o.Probe { // inconclusive; nothing of it is held (cleanup)
					o.OK, o.Err = false, err
					continue
				}
				if o.Unlock {
					c.holds-- // given back by the cleanup
					o.OK, o.Retaken = true, false
				} else {
					o.OK, o.Err = false, LockFailed(c.g.cfg.TooManyLocks, err)
				}
			}
			c.mu.Unlock()
			return
		} else {
			err = c.g.cfg.Join(err, cerr)
		}
	}
	c.lose(err)
	for _, o := range batch {
		o.OK, o.Retaken = false, false
		o.Err = fmt.Errorf("%w: %w", ErrGone, err)
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
func (c *Conn) cleanup(batch []*Op) error {
	ctx := context.Background()
	nc := c.conn.PgConn().Conn()
	_ = nc.SetDeadline(time.Now().Add(c.g.cfg.ReleaseTimeout))
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
		if o.Check {
			continue
		}
		b.Queue(c.g.cfg.Statements[o.sharedIndex()][o.pairIndex()].Unlock, o.args()...)
	}
	return RetryCanceled(func() error { return c.conn.SendBatch(ctx, &b).Close() })
}

// LockFailed is the error of a lock request whose statement failed while the
// connection lives on: a full lock table (out of shared memory, 53200) is
// tooMany (pglock's ErrTooManyLocks, Config.TooManyLocks), which fails that
// acquire only.
func LockFailed(tooMany, err error) error {
	if OutOfSharedMemory(err) {
		return fmt.Errorf("%w: the server's lock table is full (max_locks_per_transaction * (max_connections + max_prepared_transactions) slots, shared by every session): %w",
			tooMany, err)
	}
	return err
}

// OutOfSharedMemory reports whether err is the server's "out of shared
// memory" (53200): a full lock table.
func OutOfSharedMemory(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "53200"
}

// pairIndex is 1 for a pair key, 0 for a bigint key.
func (o *Op) pairIndex() int {
	if o.Pair {
		return 1
	}
	return 0
}

// sharedIndex is 1 for a shared request, 0 for an exclusive one.
func (o *Op) sharedIndex() int {
	if o.Shared {
		return 1
	}
	return 0
}

// halves returns a pair key's two integers.
func (o *Op) halves() (int32, int32) { return int32(o.Key >> 32), int32(uint32(o.Key)) }

// argsOf is o.args in c's own slice, which the statement's bind reads
// before exec returns: the key is passed by pointer (the same bind value),
// so that a statement boxes no integer and allocates no slice. Only the
// goroutine that owns the connection calls it.
func (c *Conn) argsOf(o *Op) []any {
	if o.Pair {
		c.pair[0], c.pair[1] = o.halves()
		c.argv[0], c.argv[1] = &c.pair[0], &c.pair[1]
		return c.argv[:2]
	}
	c.argv[0] = &o.Key
	return c.argv[:1]
}

// args returns the bind arguments of the SQL functions for o's key.
func (o *Op) args() []any {
	if o.Pair {
		a, b := o.halves()
		return []any{a, b}
	}
	return []any{o.Key}
}

// queryCanceled is the SQLSTATE of a statement cancelled on request.
const queryCanceled = "57014"

// isCanceled reports whether err is the server's query_canceled.
func isCanceled(err error) bool {
	if err == nil {
		return false
	}
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == queryCanceled
}

// RetryCanceled runs f again once when it fails with query_canceled: a
// cancel request sent for an earlier wait can reach the server late and hit
// the statement after it.
func RetryCanceled(f func() error) error {
	err := f()
	if isCanceled(err) {
		err = f()
	}
	return err
}
