package pglock

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
