// Package cronlock makes robfig/cron v3 jobs cluster-wide singletons on
// PostgreSQL advisory locks: every replica schedules the job, and at each
// tick only the replica that holds the job's lock runs it. No leader
// election, no extra service: the database the replicas share is enough.
//
// # The model
//
// At each tick a [Job] tries its lock without waiting ([pglock.Lock.TryDo]
// through the replica's *pglock.Locker). The replica that gets it runs the
// work and releases the lock when the work returns; the others skip the
// tick and log why ("held elsewhere"). A tick that comes while this
// replica's previous run is still going is skipped too ("still running
// here"), as cron.SkipIfStillRunning does, without a trip to the database.
// A skipped tick is not run later: this is cron's skip, cluster-wide.
//
// There are three ways in:
//
//   - [Func] wraps func(ctx) error, and is the one to prefer: its context is
//     cancelled when the lock is lost or the run's time is up, and its error
//     is logged.
//   - [Wrap] wraps an existing cron.Job.
//   - [SkipIfLocked] is a cron.JobWrapper, the twin of
//     cron.SkipIfStillRunning, for cron.NewChain and cron.WithChain.
//
// # Construction errors
//
// cron's own wrappers cannot fail, and a cron.Job cannot return an error, so
// a bad argument would surface as a panic or a silent no-op at the first
// tick, possibly at night. The constructors here therefore return an error
// next to the cron type they build, in the manner of cron.AddJob: a nil
// Locker ([ErrNilLocker]), an empty name ([ErrEmptyName]), a nil job
// ([ErrNilJob]), a bad option ([ErrInvalidOption]) or options that do not
// fit the Locker (pglock's error) are reported before anything is
// scheduled. There are no Must variants; nothing here panics.
//
// # Keys
//
// A job's lock key is the Locker's key for [DefaultNamespace] + name:
// "cron:billing" for the job "billing" (with the Locker's own namespace in
// front, if it has one). Every replica must use the same name and
// namespace; [Job.Key] gives the key to look for in pg_locks. Change the
// namespace with [WithNamespace].
//
// # Scopes
//
// In Session scope (the Locker's default) the lock is held on one of the
// Locker's lock connections for the run, which takes no pool connection (with
// [pglock.WithMultiplexing](false), on a pool connection of its own). In
// Transaction scope
// ([WithScope]) the lock is taken in a transaction of its own, which a
// [Func] job reaches with [pglock.TxFromContext] ([pglock.SQLTxFromContext] on
// database/sql): the job's writes commit together with the lock when it
// returns nil, and roll back when it returns an error or panics. That fences
// the job's writes: they cannot commit without the lock, even when the
// connection dies mid-run.
//
// With a Locker made [pglock.WithToken], a [Func] job's context carries the
// lock's fencing token in either scope: [pglock.TokenFromContext] returns
// it, to pass to outside systems with the job's writes or to
// [pglock.CheckFence] in the job's transaction.
//
// # Clock skew and MinHold
//
// Replicas fire "the same" tick at slightly different instants: their
// clocks differ, and so do their schedulers' wake-ups. A short job may
// finish on one replica before another replica's scheduler fires that tick,
// which then finds the lock free and runs the tick again. [WithMinHold]
// keeps the lock for at least the given time after the run starts
// (ShedLock's lockAtLeastFor), so that the late replica finds it held: set
// it above the skew and below the interval between ticks. It lasts only
// while the holding replica lives: a hold ends with its connection.
//
// # Exactly once per tick
//
// MinHold narrows the window in which a lagging replica runs a tick again,
// but only while the first replica lives, and only for the skew it was sized
// for. [WithTicksSpec] (the spec given to AddJob) and [WithTicks] (a parsed
// cron.Schedule) close it: in Transaction scope, each run first records
// its tick (the time the schedule fired for, named by the replica's own
// clock, which is what every replica's scheduler fires at, so the same on
// all of them) in the pglock schema, in the job's own transaction; a replica
// whose run finds the tick recorded skips it ("tick already ran"). The
// record commits with the work, or rolls back with it, so a tick runs
// exactly once: never twice (clock skew, restarts), and a run that fails
// rolls its record back, so another replica's firing of the same tick runs
// it. With ticks a run waits for the job's lock instead of skipping a busy
// one (the record decides whether a tick runs; the lock keeps runs apart),
// until the base context ends or the Locker's wait timeout passes; ticks
// that fire here meanwhile are skipped as "still running here". In
// Transaction scope a waiting run holds a pool connection and an open
// transaction for that time. Ticks are named by the schedule in the Cron's
// time zone: give a Cron made with cron.WithLocation(loc) a clock in that
// zone too (WithClock(func() time.Time { return time.Now().In(loc) })).
// The function finds its tick with [TickFromContext].
//
//	const spec = "0 2 * * *"
//	job, err := cronlock.Func(locker, "invoices", send,
//		cronlock.WithScope(pglock.Transaction), cronlock.WithTicksSpec(spec))
//	_, err = c.AddJob(spec, job) // the same spec, parsed by the same parser
//
// Create the schema once with pglock.Migrate or `pglock migrate`: without
// it no run happens, and each tick logs why at Error (the error matches
// pglock.ErrSchema). Func cannot tell sooner, since it does not talk to the
// database.
//
// # Cancellation and lost connections
//
// A session lock lives as long as its connection. pglock watches it, and
// when it dies (pg_terminate_backend, a network failure, a server restart)
// the lock is gone at once for the other replicas, which may run the next
// tick, and a [Func] job's context is cancelled with cause
// [pglock.ErrLockLost] within pglock's lost-check bound (at once for a
// connection the server closes). The job should stop; until it notices,
// two replicas may run side by side. A [Wrap] job cannot be told; the loss
// is logged. In Transaction scope pglock does not watch the connection, so
// the job's context is not cancelled, but its writes die with the
// transaction and cannot commit.
//
// [WithMaxRun] sets a deadline on a Func job's context (cause
// [ErrMaxRunExceeded]); the lock is kept until the job returns, never
// released under a running job. [WithBaseContext] sets the parent of every
// run's context: cancel it at shutdown to cancel running Func jobs and cut
// a MinHold wait short. cron's Stop waits for running jobs, MinHold
// included.
//
// # Panics
//
// A panicking job releases its lock (in Transaction scope, rolls back
// first), then the panic goes on up to cron. robfig/cron's default chain
// does not recover panics: add cron.Recover to the chain (cron.WithChain),
// or a panic ends the process, as it would without this package.
//
// # Logging
//
// A job speaks up by default: with no logger given, it logs to
// slog.Default(), read at each message, so that a job's error, a lock
// error, a lost lock or a reason it cannot run (with WithTicks, the pglock
// schema missing) is never silent. Levels: a job error, a lock error and a
// job that could not run at Error; a lost lock and an overrun at Warn; a
// skip at Info, with the reason ("held elsewhere", "still running here",
// "tick already ran", "context done"); a finished run at Debug. Every
// message names the job and its key.
//
// [WithLogger] sends them to a cron.Logger instead, so that users of
// cron.WithLogger see them beside cron's own; [WithSlog] to a *slog.Logger;
// both may be given. A nil logger turns logging off: WithSlog(nil) (or
// WithLogger(nil), or a logger on slog.DiscardHandler) silences a job.
// [Job.RunContext] logs nothing of the outcome: it returns it.
//
// # What it deliberately does not do
//
//   - It does not wait for a busy lock, and does not run skipped or missed
//     ticks later: a tick runs on one replica or on none (at most one, given
//     a MinHold that covers the skew between replicas).
//   - It keeps no record of past runs unless asked: [WithTicksSpec] and
//     [WithTicks] record each (job, scheduled time) with pglock.ClaimTick
//     in the lock's transaction, so that each tick runs exactly once across
//     the cluster, whatever the clocks, even after the replica that ran it
//     exited (see "Exactly once per tick" above).
//   - It talks no SQL of its own: every lock goes through the *pglock.Locker,
//     and every tick record through pglock.ClaimTick.
//   - Session locks need a real session: behind PgBouncer in transaction
//     pooling mode, use Transaction scope (see package pglock).
package cronlock
