package cronlock

import "errors"

// Sentinel errors. Match them with errors.Is. The constructors ([Func],
// [Wrap], [SkipIfLocked]) return the first four; a lock or database error
// from a run is pglock's (see [Job.RunContext]).
var (
	// ErrNilLocker means a constructor was given a nil *pglock.Locker.
	ErrNilLocker = errors.New("cronlock: nil *pglock.Locker")

	// ErrEmptyName means a constructor was given an empty job name. The
	// name is the lock's key: it is what makes the replicas' jobs the same.
	ErrEmptyName = errors.New("cronlock: empty job name")

	// ErrNilJob means Wrap was given a nil cron.Job, or Func a nil function.
	ErrNilJob = errors.New("cronlock: nil job")

	// ErrInvalidOption means an option's value is out of range (a negative
	// duration, an unknown scope, a nil context). The error names the
	// option. Options that do not fit the Locker (Session scope on a Locker
	// made on a transaction) are reported by pglock, as
	// pglock.ErrInvalidOption.
	ErrInvalidOption = errors.New("cronlock: invalid option")

	// ErrMaxRunExceeded is the cause (see context.Cause) of a [Func] job's
	// context when the job ran for longer than [WithMaxRun] allows. The
	// context's Err is then context.DeadlineExceeded.
	ErrMaxRunExceeded = errors.New("cronlock: job ran past its MaxRun")
)
