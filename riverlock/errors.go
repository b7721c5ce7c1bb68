package riverlock

import "errors"

// Sentinel errors. Match them with errors.Is: errors returned by this package
// wrap them with %w, together with pglock's errors, the database's error or
// the error of a [KeyFunc].
var (
	// ErrInvalidConfig means NewMiddleware or WorkTx was given a nil
	// *pglock.Locker, a Locker on one connection or a transaction (see
	// pglock.Locker.Pooled), a nil function, or a busy Policy out of range.
	ErrInvalidConfig = errors.New("riverlock: invalid configuration")

	// ErrNilLocker means NewMiddleware or WorkTx was given a nil
	// *pglock.Locker; the error matches ErrInvalidConfig too.
	ErrNilLocker = errors.New("riverlock: nil *pglock.Locker")

	// ErrBusy means another job (on this node or another) held the job's
	// lock, or, under a Limit above 1 ([Config.Limit]), other jobs held
	// every slot of its key. Under the Snooze policy it wraps River's snooze error, under
	// Cancel River's cancel error, and under Wait it is the error of an
	// attempt whose wait for the lock ran out.
	ErrBusy = errors.New("riverlock: lock busy")

	// ErrKey means the job's key could not be computed: its KeyFunc failed,
	// or its args could not be decoded for [ArgsKey]. The job's attempt
	// fails with this error (and the KeyFunc's); it is not run without its
	// lock.
	ErrKey = errors.New("riverlock: job key")
)
