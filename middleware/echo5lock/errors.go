package echo5lock

import "errors"

// Sentinel errors. Match them with errors.Is: the *echo.HTTPError values the
// middleware returns wrap them (HTTPError.Wrap; HTTPError unwraps to them),
// joined with %w to the cause.
var (
	// ErrNilLocker is returned by New, WithConfig and Config.ToMiddleware
	// when the Locker is nil.
	ErrNilLocker = errors.New("echo5lock: nil *pglock.Locker")

	// ErrNilKeyExtractor is returned by New, WithConfig and
	// Config.ToMiddleware when the KeyExtractor is nil.
	ErrNilKeyExtractor = errors.New("echo5lock: nil KeyExtractor")

	// ErrInvalidConfig is returned by WithConfig and Config.ToMiddleware
	// when a Config field is out of range. At request time it is wrapped in
	// the 500 *echo.HTTPError answering a ModeFunc that returned neither
	// pglock.Exclusive nor pglock.Shared.
	ErrInvalidConfig = errors.New("echo5lock: invalid config")

	// ErrKey wraps the KeyExtractor's error. The default ErrorHandler answers
	// it with 400 Bad Request.
	ErrKey = errors.New("echo5lock: bad lock key")

	// ErrBusy means the key was held elsewhere and the request did not get
	// it, at once or within Config.Wait. The DenyHandler gets it (and it is
	// logged at Debug level); the default answers it with 409 Conflict.
	ErrBusy = errors.New("echo5lock: lock busy")

	// ErrDatabase wraps a failure to take, commit or release the lock that is
	// not a busy key. The default ErrorHandler answers it with 503 Service
	// Unavailable.
	ErrDatabase = errors.New("echo5lock: lock failed")

	// ErrRequestEnded wraps the lock error of a request whose context ended
	// while it waited (the client went away): it is returned in a 503
	// *echo.HTTPError that nobody is likely to read.
	ErrRequestEnded = errors.New("echo5lock: request ended while waiting for the lock")
)
