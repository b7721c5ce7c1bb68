package pglock

import (
	"errors"
	"fmt"
	"strings"

	"github.com/pglockkit/kit/pglock/internal/pooler"
)

// Sentinel errors. Match them with errors.Is: errors returned by this package
// wrap them with %w, together with the context's error or the database's error
// (a *pgconn.PgError stays reachable with errors.As).
var (
	// ErrNotAcquired means the lock was not acquired: the context ended (the
	// error matches the context's error too), the wait timed out, or the
	// database failed. The lock is not held afterwards.
	ErrNotAcquired = errors.New("pglock: lock not acquired")

	// ErrLockLost means a lock that was held was lost: its connection died,
	// the server ended the session, or the server no longer had it at release.
	ErrLockLost = errors.New("pglock: lock lost")

	// ErrNotHeld means an operation needed the lock held and it was not, or
	// the server reported that this session did not hold the key.
	ErrNotHeld = errors.New("pglock: lock not held")

	// ErrAlreadyHeld is returned by Acquire and TryAcquire on a Lock that is
	// held already: a Lock is not re-entrant.
	ErrAlreadyHeld = errors.New("pglock: lock already held (a Lock is not re-entrant)")

	// ErrUnsupportedConn means the value given as the database is not one of
	// the supported types, or is nil, or is a zero value that its package's
	// constructor did not make (&pgxpool.Pool{}, &sql.DB{}...), or a released
	// *pgxpool.Conn. It is also what the methods of a nil or zero Lock,
	// Locker or Leader (one that NewLock, NewLocker or Locker.Leader did not
	// make) return, with [ErrNotAcquired] where they acquire.
	ErrUnsupportedConn = errors.New("pglock: unsupported connection")

	// ErrTransactionPooler means a Session-scope lock was refused because the
	// connection's statements do not all reach one server session of its
	// own: a transaction-pooling proxy (PgBouncer with pool_mode transaction
	// or statement, or a pooler like it) is between the client and the
	// server, and would let two clients hold the key at once. Use
	// Transaction scope (which works through transaction pooling), a session
	// pooling mode, or a direct connection. Through statement pooling, which
	// allows no transaction block, Transaction scope fails with it too. It
	// is a configuration error: trying again does not help. It also matches
	// ErrNotAcquired; the lock is not held. See the package documentation,
	// "Running in production".
	ErrTransactionPooler = pooler.ErrTransactionPooler

	// ErrUnavailable means the database could not be reached or its
	// connection failed (the server is down, restarting or refusing
	// connections, or the network is cut): the lock was not taken, and
	// nothing is known of whether another session holds it. It comes with
	// [ErrNotAcquired], so that a caller can tell "unavailable" (retry
	// later, alert) from "busy" (TryAcquire's false, or a wait that timed
	// out). A connection that was already dead before the lock's first
	// statement reached it (an idle pool connection after a server restart)
	// is destroyed and the acquire runs again on another, at most once per
	// idle connection of the pool and once more, before this is returned.
	// When the context of an acquire ends while a multiplexing Locker's
	// connection is still being opened, the error is ErrUnavailable too,
	// and does not match context.DeadlineExceeded (a deadline that passed
	// while connecting does not mean the key is busy); a cancelled context
	// is still matched by context.Canceled. So is a connection that the
	// pool's own connect timeout (pgxpool's ConnectTimeout, connect_timeout)
	// cut while the caller's context was alive, whatever the Lock runs on:
	// the error does not match context.DeadlineExceeded, which is the
	// caller's deadline only; errors.As still finds *pgconn.ConnectError.
	ErrUnavailable = errors.New("pglock: database unavailable")

	// ErrNotPrimary means the connection's server is a hot standby (in
	// recovery): advisory locks there are the standby's own, and exclude no
	// one who locks on the primary, so the library refuses to lock there.
	// It also matches [ErrUnavailable] (a failover may be under way: retry
	// later) and ErrNotAcquired; the lock is not held. A pool's connection
	// found on a standby is destroyed, so that the pool connects again; a
	// standby that is promoted is a primary at the next attempt.
	ErrNotPrimary = errors.New("pglock: not a primary")

	// ErrLeaderRunning is returned by [Leader.Run] when Run is already
	// running on the Leader: a Leader campaigns once at a time.
	ErrLeaderRunning = errors.New("pglock: leader is already running")

	// ErrInvalidKey means the key is not a supported type.
	ErrInvalidKey = errors.New("pglock: invalid key")

	// ErrInvalidOption means an option's value is out of range, or the
	// options do not fit the connection (Session scope on a transaction).
	ErrInvalidOption = errors.New("pglock: invalid option")

	// ErrNilFunc means Do or TryDo was given a nil function.
	ErrNilFunc = errors.New("pglock: nil function")

	// ErrLockerClosed means the Locker was closed (see [Locker.Close]): it
	// makes and takes no more locks.
	ErrLockerClosed = errors.New("pglock: locker closed")

	// ErrTooManyLocks means a multiplexing Locker already holds as many
	// session locks as its limit allows (see [WithMaxLocks]), or the
	// advisory locks of every session of the server reach three quarters of
	// its lock table (whatever made the Lock: see the lock-table guard in
	// the package documentation), or the table is full ("out of shared
	// memory" on the lock's statement: that acquire fails, nothing else).
	// Advisory locks live in the server's shared lock table; a full table
	// makes every session of the server fail, so the library refuses before
	// that. The message gives the figures. The lock is not held.
	ErrTooManyLocks = errors.New("pglock: too many locks held")

	// ErrInDo is returned by Release and HandleError while Do or TryDo runs
	// on the same Lock, called from its function or from another goroutine:
	// they change nothing, because Do ends the hold itself when the function
	// returns (committing, or rolling back on an error). To end the work
	// early, return from the function (with an error to roll back), or cancel
	// the context given to Do, which the function watches.
	ErrInDo = errors.New("pglock: Do is running on this lock (it ends the hold when its function returns)")

	// ErrTxEnded means the lock's own transaction (Transaction scope on a
	// pool or connection) was committed or rolled back by its user before
	// the lock ended it: by Commit or Rollback on the transaction from
	// [TxFromContext], [SQLTxFromContext], [Lock.Tx] or [Lock.SQLTx], or by a
	// COMMIT or ROLLBACK statement sent in it. The advisory lock ended with
	// that transaction, at that moment: work done after it ran without the
	// lock. Do and Release return it after sending nothing more (they commit
	// or roll back nothing), and the connection goes back to the pool (it is
	// destroyed when its state is in doubt).
	//
	// The error says what is known of the work. With pgx, after Commit or
	// Rollback on the lock's pgx.Tx, it says whether the work was committed
	// ("the work is committed", "the work is not committed", or, when Commit
	// failed on the way, that this is unknown). After a COMMIT or ROLLBACK
	// statement, and with database/sql, the lock cannot tell which it was
	// ("committed or rolled back"): check the work before doing it again.
	// With a database/sql driver other than pgx's, a COMMIT or ROLLBACK
	// statement is not seen at all.
	ErrTxEnded = errors.New("pglock: the lock's transaction was ended by its user, not by the lock (the lock ended with it)")
)

var (
	// A Lock, Locker or Leader that its constructor did not make.
	errNilLock    = fmt.Errorf("%w: nil *pglock.Lock (NewLock or Locker.NewLock returned an error)", ErrUnsupportedConn)
	errZeroLock   = fmt.Errorf("%w: zero pglock.Lock (make it with NewLock or Locker.NewLock)", ErrUnsupportedConn)
	errNilLocker  = fmt.Errorf("%w: nil *pglock.Locker", ErrUnsupportedConn)
	errZeroLocker = fmt.Errorf("%w: zero pglock.Locker (make one with NewLocker)", ErrUnsupportedConn)
	errNilLeader  = fmt.Errorf("%w: nil *pglock.Leader (Locker.Leader returned an error)", ErrUnsupportedConn)
	errZeroLeader = fmt.Errorf("%w: zero pglock.Leader (make it with Locker.Leader)", ErrUnsupportedConn)
	// errServerNotHeld: pg_advisory_unlock returned false.
	errServerNotHeld = fmt.Errorf("%w: %w: the server reports this session did not hold it"+
		" (a transaction-pooling proxy such as PgBouncer between the client and the server does this;"+
		" session locks need a session)", ErrLockLost, ErrNotHeld)
	// errUnlockFailed: an unlock whose outcome is unknown. On a pool the
	// connection is destroyed, which ends the lock with the session.
	errUnlockFailed = errors.New("pglock: unlock failed")
	// errTxEndedByStatement, errTxEndedSQL: the lock's own transaction was
	// found ended at release, by a statement or by database/sql's methods,
	// which leave no trace of which it was. (Commit and Rollback on the
	// lock's pgx.Tx are told apart: see givenTx.)
	errTxEndedByStatement = fmt.Errorf("%w: by a COMMIT or ROLLBACK statement:"+
		" committed or rolled back, the lock cannot tell which", ErrTxEnded)
	errTxEndedSQL = fmt.Errorf("%w: by Commit or Rollback on its *sql.Tx:"+
		" committed or rolled back, the lock cannot tell which", ErrTxEnded)
)

// join is errors.Join on one line: it drops nil errors, returns a single one
// as it is, and writes several as "a: b: c", so that a log line stays one
// line; errors.Is and errors.As see every one of them. A sentinel (an error
// that wraps nothing) that another of errs already carries is dropped, so
// that a chain names it once: join(ErrLockLost, err) of an err that matches
// ErrLockLost is err.
func join(errs ...error) error {
	var c chain
	for i, err := range errs {
		if err != nil && !carried(err, i, errs) {
			c = append(c, err)
		}
	}
	switch len(c) {
	case 0:
		return nil
	case 1:
		return c[0]
	}
	return c
}

// carried reports whether errs[i], a sentinel, is carried by another error
// of errs (the first of equal sentinels is kept).
func carried(err error, i int, errs []error) bool {
	switch err.(type) {
	case interface{ Unwrap() error }, interface{ Unwrap() []error }:
		return false
	}
	for j, other := range errs {
		// errors.Is, not ==: an error's type may not be comparable.
		if j != i && other != nil && errors.Is(other, err) && (j < i || !errors.Is(err, other)) {
			return true
		}
	}
	return false
}

// chain is join's result.
type chain []error

func (c chain) Error() string {
	var b strings.Builder
	for i, err := range c {
		if i > 0 {
			b.WriteString(": ")
		}
		b.WriteString(err.Error())
	}
	return b.String()
}

func (c chain) Unwrap() []error { return c }
