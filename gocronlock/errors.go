package gocronlock

import "errors"

// Sentinel errors. Match them with errors.Is. A lock or database error is
// pglock's (it matches pglock.ErrNotAcquired, and pglock.ErrUnavailable when
// the database could not be reached), wrapped with the job's name; it never
// matches [ErrBusy], so that a gocron.AfterLockError listener can tell a tick
// that another replica runs from a database that is down.
var (
	// ErrBusy means the job's lock is held elsewhere: another replica (or
	// another run on this one) runs the tick. [Locker.Lock] returns it, and
	// gocron hands it to the job's AfterLockError listener and skips the
	// run on this replica.
	ErrBusy = errors.New("gocronlock: lock held elsewhere")

	// ErrNotLeader is what [Elector.IsLeader] returns while this process
	// does not lead: gocron then skips the run.
	ErrNotLeader = errors.New("gocronlock: not the leader")

	// ErrNilLocker means a constructor was given a nil *pglock.Locker.
	ErrNilLocker = errors.New("gocronlock: nil *pglock.Locker")

	// ErrEmptyName means an empty job name (the lock's key) was given to
	// [Func] or to [Locker.Lock], or an empty election name to
	// [NewElector]. Every replica must name its lock the same way.
	ErrEmptyName = errors.New("gocronlock: empty name")

	// ErrNilFunc means Func was given a nil function.
	ErrNilFunc = errors.New("gocronlock: nil function")

	// ErrInvalidOption means an option's value is out of range (a negative
	// duration, an unknown scope), an option was given to a constructor it
	// does not apply to (WithScope to NewLocker), or the *pglock.Locker does
	// not fit (a Locker on one connection, where concurrent runs would
	// stack rather than exclude). The error names the option. Options that
	// pglock refuses (Session scope on a Locker made on a transaction) are
	// reported as pglock.ErrInvalidOption.
	ErrInvalidOption = errors.New("gocronlock: invalid option")

	// ErrMaxRunExceeded is the cause (see context.Cause) of a [Func] job's
	// context when the job ran for longer than [WithMaxRun] allows. The
	// context's Err is then context.DeadlineExceeded.
	ErrMaxRunExceeded = errors.New("gocronlock: job ran past its MaxRun")

	// ErrLockedTwice means a [Func] job found its own lock held by a
	// [Locker] of this process: the job was given both to a scheduler with
	// a gocronlock Locker (gocron.WithDistributedLocker or
	// WithDistributedJobLocker) and wrapped with Func, under the same name.
	// The run is refused, and reported at every tick, rather than skipped
	// as "held elsewhere" forever. A Func job takes its own lock: add
	// gocron.WithDisabledDistributedJobLocker(true) to it.
	ErrLockedTwice = errors.New("gocronlock: job locked twice (a Func job under a scheduler's gocronlock Locker;" +
		" add gocron.WithDisabledDistributedJobLocker(true) to the job)")

	// ErrNoTick means a run of a [Func] job made [WithTicks] found no
	// scheduled time to record: gocron did not report one to the job's
	// [Ticks] (the scheduler was not given it with
	// gocron.WithSchedulerMonitor, or the gocron job is not named
	// job.Name()), or [Job.TryRun] was called by hand (use
	// [Job.TryRunTick]). The function does not run; Run returns the error at
	// every run, to be seen, and the first such run of a Job logs it at
	// Error, saying which of the two it is (the later ones at Debug).
	ErrNoTick = errors.New("gocronlock: no scheduled time for the run (give the scheduler the job's Ticks:" +
		" gocron.WithSchedulerMonitor, and name the gocron job job.Name())")
)
