package echocore

import (
	"errors"
	"net/http"

	"github.com/pglockkit/kit/internal/holdwriter"
	"github.com/pglockkit/kit/pglock"
)

// Errors are an adapter's sentinel errors, which the middleware wraps with
// %w together with the cause.
type Errors struct {
	NilLocker       error // a nil Locker
	NilKeyExtractor error // a nil KeyExtractor
	InvalidConfig   error // a field out of range; a ModeFunc's bad mode
	Key             error // wraps a KeyExtractor's error
	Busy            error // the key was held elsewhere
	Database        error // the lock could not be taken, committed or released
	RequestEnded    error // the request's context ended while it waited
}

// Framework is what the middleware needs of one Echo major whose handlers
// take a C (echo.Context in v4, *echo.Context in v5). An adapter makes one,
// as a package variable, and passes it to [New].
type Framework[C any] struct {
	// Name is the adapter package's name: it prefixes log messages and the
	// error a rolled-back transaction is told with ("echolock").
	Name string

	// Errors are the adapter's sentinels.
	Errors Errors

	// Request and SetRequest read and replace the request of c.
	Request    func(c C) *http.Request
	SetRequest func(c C, r *http.Request)

	// Header is the header of c's response (Retry-After is set there).
	Header func(c C) http.Header

	// Hold makes c's response, for the handler, write to tw, a
	// holdwriter.Writer over the response c had, and returns tw and
	// restore, which gives c its response back.
	Hold func(c C) (tw *holdwriter.Writer, restore func())

	// Reset, when not nil, is called with c's response given back after
	// tw.Discard dropped what the handler wrote, so that an error handler
	// can write an answer on it (Echo v4 marks its *echo.Response
	// uncommitted again).
	Reset func(c C)

	// HTTPError returns the Echo major's HTTP error with code and message,
	// wrapping internal.
	HTTPError func(code int, message string, internal error) error
}

// DefaultDeny is the answer of the adapters' default DenyHandler: 409
// Conflict, wrapping err.
func (f *Framework[C]) DefaultDeny(err error) error {
	return f.HTTPError(http.StatusConflict, "another request holds the lock for this resource", err)
}

// DefaultError is the answer of the adapters' default ErrorHandler: 400 Bad
// Request for a KeyExtractor error (err matches Errors.Key), 503 Service
// Unavailable otherwise; it wraps err.
func (f *Framework[C]) DefaultError(err error) error {
	if errors.Is(err, f.Errors.Key) {
		return f.HTTPError(http.StatusBadRequest, "the request does not name a valid lock key", err)
	}
	return f.HTTPError(http.StatusServiceUnavailable, "the lock for this resource could not be taken", err)
}

// SharedForSafeMethods is the adapters' SharedForSafeMethods on the request
// r: GET, HEAD and OPTIONS take the key in pglock.Shared mode, every other
// method in pglock.Exclusive mode.
func SharedForSafeMethods(r *http.Request) pglock.Mode {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return pglock.Shared
	default:
		return pglock.Exclusive
	}
}
