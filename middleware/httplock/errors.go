package httplock

import "errors"

// Sentinel errors. Match them with errors.Is: the errors this package
// returns or hands to the error handlers wrap them with %w, together with the
// cause (a key function's error, a *pglock error, a context error).
var (
	// ErrNilLocker is returned by Middleware and Handler when the Locker is nil.
	ErrNilLocker = errors.New("httplock: nil *pglock.Locker")

	// ErrNilKeyFunc is returned by Middleware and Handler when the KeyFunc is nil.
	ErrNilKeyFunc = errors.New("httplock: nil KeyFunc")

	// ErrNilHandler is returned by Handler when the handler is nil.
	ErrNilHandler = errors.New("httplock: nil http.Handler")

	// ErrInvalidOption is returned by Middleware and Handler when an option's
	// value is out of range, or an option is nil. At request time it is the
	// logged error (Error level) of a mode func ([WithModeFunc]) that
	// returned neither pglock.Exclusive nor pglock.Shared, answered 500.
	ErrInvalidOption = errors.New("httplock: invalid option")

	// ErrKey wraps the error of a KeyFunc: the request names no usable key.
	// It is answered 400 Bad Request by default (see [WithKeyErrorHandler]).
	ErrKey = errors.New("httplock: bad lock key")

	// ErrBusy means the key was held elsewhere (with [WithLimit], its n
	// slots were) and the request did not get it: at once (fail fast) or
	// within the wait limit. Busy answers are
	// logged (Debug level, see [WithLogger]) with an error matching it; they
	// are 409 Conflict with Retry-After by default (see [WithOnBusy]).
	ErrBusy = errors.New("httplock: lock busy")

	// ErrDatabase wraps a failure to take, commit or release the lock that is
	// not a busy key: a database or connection error. It is answered 503
	// Service Unavailable by default (see [WithErrorHandler]).
	ErrDatabase = errors.New("httplock: lock failed")

	// ErrRequestEnded wraps the lock error of a request whose context ended
	// while it waited for the lock or for a pool connection: the client went
	// away, or an outer deadline (a timeout middleware) passed. It is logged
	// (Debug level) and the request is answered 503 Service Unavailable,
	// which a client that left does not read.
	ErrRequestEnded = errors.New("httplock: request ended while waiting for the lock")
)
