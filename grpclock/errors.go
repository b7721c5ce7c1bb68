package grpclock

import "errors"

// Sentinel errors of the constructors. Match them with errors.Is. The
// errors that reach a client are gRPC status errors instead (see the
// package documentation for their codes).
var (
	// ErrNilLocker means UnaryServerInterceptor or StreamServerInterceptor
	// was given a nil *pglock.Locker.
	ErrNilLocker = errors.New("grpclock: nil *pglock.Locker")

	// ErrInvalidOption means an option's value is out of range (a nil key
	// function, a negative wait, busy code OK...), or the options do not fit
	// the Locker. The error names the option.
	ErrInvalidOption = errors.New("grpclock: invalid option")
)
