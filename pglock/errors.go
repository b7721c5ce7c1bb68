package pglock

import (
	"errors"
	"fmt"
	"strings"
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
	// the supported types, or is nil.
	ErrUnsupportedConn = errors.New("pglock: unsupported connection")

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
	// session locks as its limit allows (see [WithMaxLocks]). Advisory locks
	// live in the server's shared lock table; a full table makes every
	// session of the server fail ("out of shared memory"), so the Locker
	// refuses before that. The lock is not held.
	ErrTooManyLocks = errors.New("pglock: too many locks held")
)

var (
	// errServerNotHeld: pg_advisory_unlock returned false.
	errServerNotHeld = fmt.Errorf("%w: %w: the server reports this session did not hold it"+
		" (a transaction-pooling proxy such as PgBouncer between the client and the server does this;"+
		" session locks need a session)", ErrLockLost, ErrNotHeld)
	// errUnlockFailed: an unlock whose outcome is unknown. On a pool the
	// connection is destroyed, which ends the lock with the session.
	errUnlockFailed = errors.New("pglock: unlock failed")
)

// join is errors.Join on one line: it drops nil errors, returns a single one
// as it is, and writes several as "a: b: c", so that a log line stays one
// line; errors.Is and errors.As see every one of them.
func join(errs ...error) error {
	var c chain
	for _, err := range errs {
		if err != nil {
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
