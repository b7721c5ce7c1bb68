package pglock

import (
	"context"
	"database/sql/driver"
	"fmt"
	"math/rand/v2"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/pglock/internal/pooler"
)

// The exclusion self-test (issue 23). An engine that speaks PostgreSQL's
// protocol may have advisory lock functions that lock nothing (CockroachDB's
// pg_try_advisory_lock always returns true; see checkEngine for the one
// known by name). When a multiplexing Locker starts, it takes a key of its
// own on its first lock connection and tries the same key from a second
// session (a connection of the Locker's pool or *sql.DB, for a moment): on
// an engine whose locks exclude, the second try fails. One that succeeds
// makes the Locker refuse every lock with ErrUnsupportedConn. The first
// lock of the Locker waits for it (a few round trips, and the connect of a
// pool connection when none is idle). The key is let go at once, on both
// sessions.

// selfTestClass is the first half of the self-test's keys (two-integer
// keys): 'pglk' in ASCII. The second half is random.
const selfTestClass = 0x70676c6b

// selfTestSQL and selfTestUnlockSQL take and let go of the self-test's key.
const (
	selfTestSQL       = "SELECT pg_catalog.pg_try_advisory_lock($1::integer, $2::integer)"
	selfTestSecondSQL = "SELECT pg_catalog.pg_try_advisory_lock($1::integer, $2::integer), pg_catalog.pg_is_in_recovery()"
	selfTestUnlockSQL = "SELECT pg_catalog.pg_advisory_unlock($1::integer, $2::integer)"
)

// excludeVerdict decides the self-test from the two sessions' tries of one
// key: first is the first session's, second the other's while the first
// holds it. conclusive is false when the first did not get the key (someone
// holds it: nothing can be told).
func excludeVerdict(first, second bool) (conclusive bool, err error) {
	switch {
	case !first:
		return false, nil
	case second:
		return true, fmt.Errorf("%w: the server's advisory locks do not exclude: a second session got a key"+
			" that the first held (an engine that speaks PostgreSQL's protocol without its advisory locks?)", ErrUnsupportedConn)
	}
	return true, nil
}

// selfTest runs the self-test with c as the first session; tested reports
// whether both tries ran. A test that cannot run (the pool has no
// connection to spare in time, a statement fails, a pooler) proves nothing
// and refuses nothing.
func (m *mux) selfTest(ctx context.Context, c *lockConn) (tested bool, err error) {
	obj := rand.Int32()
	var first, pooled bool
	var ferr error
	op := connOp{Ctx: ctx, Fn: func(conn *pgx.Conn) {
		// Through a pooler the test proves nothing: a transaction pooler
		// that resets sessions (server_reset_query_always) lets go of the
		// first lock between two statements, and the lock statements'
		// proofs refuse it (ErrTransactionPooler) at the first lock.
		if pooled = pooler.ProofOf(conn) != nil; !pooled {
			ferr = conn.QueryRow(ctx, selfTestSQL, int32(selfTestClass), obj).Scan(&first)
		}
	}}
	c.Do(&op)
	if pooled || ferr != nil || op.Err != nil || !first {
		return false, nil
	}
	defer func() {
		op := connOp{Ctx: context.WithoutCancel(ctx), Fn: func(conn *pgx.Conn) {
			var ok bool
			_ = conn.QueryRow(context.WithoutCancel(ctx), selfTestUnlockSQL, int32(selfTestClass), obj).Scan(&ok)
		}}
		c.Do(&op)
	}()
	second, ok := m.secondTry(ctx, obj)
	if !ok {
		return false, nil
	}
	_, err = excludeVerdict(first, second)
	return true, err
}

// secondTry tries the self-test's key from a connection of the Locker's pool
// or *sql.DB, and lets it go if it got it (a connection that could not is
// destroyed, and so is one opened for the test). ok is false when the try
// could not run (every connection of the pool is checked out, or none came
// within pooler.MaxProbeTime) or ran on a standby: a pool on a host list may reach
// one, where the first session's lock is not (the Locker's own connections
// go to the primary), and its try tells nothing.
func (m *mux) secondTry(ctx context.Context, obj int32) (got, ok bool) {
	// A pool the caller keeps busy is not waited for long.
	ctx, cancel := context.WithTimeout(ctx, pooler.MaxProbeTime)
	defer cancel()
	switch {
	case m.pool != nil:
		// A pool whose every connection is checked out is not waited for:
		// the caller may hold the connections it would wait for. The pool
		// is left as it was found: a connection opened for the test (none
		// was idle) is closed after it, not kept.
		st := m.pool.Stat()
		if st.IdleConns() == 0 && st.TotalConns() >= st.MaxConns() {
			return false, false
		}
		opened := st.IdleConns() == 0
		pc, err := m.pool.Acquire(ctx)
		if err != nil {
			return false, false
		}
		got, ok, clean := tryOn(ctx, obj, func(ctx context.Context, sql string, args ...any) rowScanner {
			return pc.QueryRow(ctx, sql, args...)
		})
		if opened || !clean {
			endConnected(pc.Hijack())
		} else {
			pc.Release()
		}
		return got, ok
	case m.db != nil:
		st := m.db.Stats()
		if st.Idle == 0 && st.MaxOpenConnections > 0 && st.OpenConnections >= st.MaxOpenConnections {
			return false, false
		}
		opened := st.Idle == 0
		conn, err := m.db.Conn(ctx)
		if err != nil {
			return false, false
		}
		got, ok, clean := tryOn(ctx, obj, func(ctx context.Context, sql string, args ...any) rowScanner {
			return conn.QueryRowContext(ctx, sql, args...)
		})
		if opened || !clean {
			_ = conn.Raw(func(any) error { return driver.ErrBadConn }) // discarded, not kept
		}
		_ = conn.Close()
		return got, ok
	}
	return false, false
}

// tryOn is the second session's try on a connection (q runs a statement on
// it): whether it got the key, whether that tells anything (the statement
// ran, not on a standby), and whether the connection holds nothing after it
// (a key it got and could not let go of: clean false).
func tryOn(ctx context.Context, obj int32, q func(ctx context.Context, sql string, args ...any) rowScanner) (got, ok, clean bool) {
	args := []any{int32(selfTestClass), obj}
	var standby bool
	if err := q(ctx, selfTestSecondSQL, args...).Scan(&got, &standby); err != nil {
		return false, false, true
	}
	if got {
		var unlocked bool
		err := q(context.WithoutCancel(ctx), selfTestUnlockSQL, args...).Scan(&unlocked)
		clean = err == nil && unlocked
	} else {
		clean = true
	}
	return got, !standby, clean
}
