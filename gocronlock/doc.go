// Package gocronlock runs go-co-op/gocron v2 jobs on one replica at a time,
// on PostgreSQL advisory locks taken through a [pglock.Locker]: every
// replica schedules the jobs, and the database they share decides which one
// runs each. It offers the three ways gocron has for that, and a fourth for
// work that must commit with its lock.
//
//   - [Locker] is a gocron.Locker (gocron.WithDistributedLocker, or
//     gocron.WithDistributedJobLocker for one job): at each run the replica
//     that gets the job's lock runs it, and the others skip the run.
//   - [Elector] is a gocron.Elector (gocron.WithDistributedElector): the
//     replicas elect a leader on a [pglock.Leader], and only the leader's
//     scheduler runs jobs.
//   - [Func] wraps a job's function (gocron.NewTask(job.Run)): it holds
//     the lock itself, so it can run the function inside the lock's
//     transaction, cancel its context when the lock is lost, and bound it
//     with MaxRun; with [WithTicks] it runs each scheduled time once across
//     the cluster.
//
// # The Locker
//
//	locker, err := pglock.NewLocker(pool)
//	gl, err := gocronlock.NewLocker(locker, gocronlock.WithMinHold(10*time.Second))
//	s, err := gocron.NewScheduler(gocron.WithDistributedLocker(gl))
//	_, err = s.NewJob(gocron.CronJob("0 2 * * *", false), gocron.NewTask(report),
//		gocron.WithName("nightly-report")) // the lock's key
//
// At each run gocron calls [Locker.Lock] with the job's name and the job's
// context. Lock tries the lock of [DefaultNamespace] + name
// ("gocron:nightly-report") and never waits: a run that another replica
// holds is skipped, not run late. Then gocron counts the run as skipped and
// calls the job's AfterLockError listener with an error matching [ErrBusy];
// an error that does not match it is a database problem (it matches
// pglock.ErrNotAcquired, and pglock.ErrUnavailable when the server could not
// be reached). When the job returns, gocron calls Unlock with the job's
// context, which its Shutdown has cancelled by then if that is why the job
// returned; the lock is released all the same: the release runs on
// context.WithoutCancel, bounded by the Locker's release timeout. The locks are Session-scope locks on the pglock.Locker's
// lock connections: a held lock costs no pool connection, and it lives as
// long as the run, however long that is. There is no lease to renew, and
// none to expire under a long job: the trouble of TTL-based lockers, where
// a job that outlives its lock's expiry runs twice at once (gocron issue
// #799), does not arise. A lock ends early only with its connection (see
// below).
//
// Name every job (gocron.WithName), the same on every replica. Without a
// name gocron uses the Go function's name ("main.main.func1"), which changes
// when code moves: two versions of a service during a rolling deploy would
// not exclude each other.
//
// # When is a tick? MinHold
//
// gocron's Locker contract leaves it to the locker to handle the splay
// between schedulers, and there is some: a DurationJob counts its interval
// from each scheduler's start (unless gocron.WithStartAt aligns them), so
// three replicas fire "the same" run at three instants; a CronJob fires at
// each replica's clock, give or take the clock skew and the scheduler's
// jitter. A job that finishes before a later replica fires would run again
// there. [WithMinHold] keeps the lock for at least the given time after it
// was taken (ShedLock's lockAtLeastFor), so that the later replicas find it
// held and skip: set it above the splay and below the interval. The default
// is zero, which suits jobs that run longer than the splay; this package
// cannot guess a job's interval. With a Locker the wait happens in Unlock,
// so the job's goroutine stays busy until the hold ends; gocron's Shutdown,
// StopJobs and RemoveJob cut it short (they cancel the job's context), and
// the lock is released at once. For work in the database, [WithTicks] needs
// no such guess (see "Exactly-once ticks").
//
// # The Elector
//
//	elector, err := gocronlock.NewElector(ctx, locker, "billing-scheduler")
//	defer elector.Close()
//	s, err := gocron.NewScheduler(gocron.WithDistributedElector(elector))
//
// [NewElector] starts campaigning in the background on the lock of
// [DefaultElectorNamespace] + name. The replicas that do not lead wait in the
// server's queue; when the leader stops (Close, its context, its process, a
// lost connection) the next one is elected at once. [Elector.IsLeader]
// answers gocron from memory: nil while leading, an error matching
// [ErrNotLeader] otherwise. gocron asks it before each run, and a run that
// started stays running when the term ends: the old leader's running job
// and the new leader's first can overlap. For jobs that must never overlap,
// use a Locker (gocron ignores the Locker when an Elector is set) or [Func].
//
// # Func and Transaction scope
//
//	job, err := gocronlock.Func(locker, "invoices", func(ctx context.Context) error {
//		tx, _ := pglock.TxFromContext(ctx)
//		_, err := tx.Exec(ctx, "UPDATE invoices SET sent = true WHERE ...")
//		return err // nil commits, an error rolls back
//	}, gocronlock.WithScope(pglock.Transaction))
//	_, err = s.NewJob(gocron.DurationJob(time.Minute), gocron.NewTask(job.Run),
//		gocron.WithName(job.Name()),
//		gocron.WithDisabledDistributedJobLocker(true)) // if the scheduler has a Locker
//
// A [Job] made by Func tries its lock at each run, as a Locker does, and
// skips the run when the lock is held elsewhere (logged; Run returns nil,
// since a skip is no failure). The function's error is logged at Error and
// returned to gocron (its AfterJobRunsWithError listener). In Transaction scope ([WithScope]) the lock
// is taken in a transaction of its own that the function finds with
// [pglock.TxFromContext] ([pglock.SQLTxFromContext] on database/sql): its
// writes commit together with the lock when it returns nil, and roll back
// when it returns an error or panics. That fences the job's writes: they
// cannot commit without the lock, even when the connection dies mid-run.
// In Session scope (the Locker's default) the function's context is
// cancelled with cause pglock.ErrLockLost when the lock is lost.
// [WithMaxRun] puts a deadline on the function's context.
//
// A Func job holds its own lock, on the key a Locker would take for a job of
// the same name: do not give it to a scheduler's gocronlock Locker too, or
// every run would find its own lock held. Such a run fails with
// [ErrLockedTwice] (at every tick, to be seen) rather than being skipped as
// "held elsewhere"; add gocron.WithDisabledDistributedJobLocker(true) to the
// job.
//
// # Exactly-once ticks
//
//	ticks := gocronlock.NewTicks(nil) // one per scheduler
//	s, err := gocron.NewScheduler(gocron.WithSchedulerMonitor(ticks))
//	job, err := gocronlock.Func(locker, "invoices", sendInvoices,
//		gocronlock.WithScope(pglock.Transaction), gocronlock.WithTicks(ticks))
//	_, err = s.NewJob(gocron.CronJob("0 2 * * *", false), gocron.NewTask(job.Run),
//		gocron.WithName(job.Name()))
//
// A lock keeps two replicas from running a job at once, not from running the
// same tick one after the other: a replica whose clock is a second behind
// fires the 02:00 run after the first one finished. [WithTicks] closes that
// gap for a Func job in Transaction scope: before the function runs, the run
// records (job, tick) with pglock.ClaimTick in the lock's transaction, where
// the tick is the time gocron scheduled the run for; a tick recorded already,
// by any replica, is skipped (logged: "tick already ran"; Run returns nil).
// The function finds its tick with [TickFromContext]. Since the record
// decides, a run waits for the lock rather than skip when another replica
// holds it: that replica may be checking, or running, another tick.
//
// The tick is the schedule's time, not the clock's. gocron hands a task no
// scheduled time; its scheduler monitor does: gocron calls
// JobSchedulingDelay on the run's goroutine just before the task, with the
// time it had set the run's timer for, computed from the job's definition on
// the scheduler's clock (gocron.WithClock). [Ticks] is that monitor: it keeps
// the time for the job's Run, which takes it. Each replica's scheduler
// computes the same cron times, whenever its own clock reaches them, so the
// replicas agree on the ticks whatever their clocks' skew; and a run that
// starts late (a busy host, a slow BeforeJobRuns listener) records the tick
// it was scheduled for, not the time it started.
//
// What it guarantees: each scheduled time runs at most once across the
// replicas, and its record commits in the same transaction as the job's
// work, so a tick counts as run exactly when its work committed. It holds
// after the replica that ran a tick exited (the record is in the database,
// kept a week), and whatever the skew, since no clock is compared. A run
// that failed (an error, a panic, a lost connection) leaves its tick
// unrecorded: a replica that fires it later, one whose clock is behind, runs
// it.
//
// What it does not do:
//
//   - It does not run missed ticks: a tick at which no replica fired (all
//     down, all busy) stays unrun. [Job.TryRunTick] runs a given tick by hand.
//   - It covers the work done in the lock's transaction. Effects outside the
//     database (an e-mail, an API call) may happen in a run whose commit then
//     fails, and happen again when the tick is run again.
//   - The replicas share ticks only when their schedules give the same times:
//     CronJob, OneTimeJob at given times, and DailyJob, WeeklyJob and
//     MonthlyJob with an interval of 1 do (in the same location:
//     gocron.WithLocation or CRON_TZ); longer intervals count from each
//     scheduler's start. So does a DurationJob: align it, with
//     gocron.WithStartAt(gocron.WithStartDateTime(now.Truncate(d).Add(d))) on
//     every replica, or each replica's ticks are its own and nothing is
//     deduplicated (the lock still keeps runs apart). A DurationRandomJob, a
//     job WithIntervalFromCompletion and a first run WithStartImmediately
//     (the scheduler's start time) have no shared ticks.
//   - gocron reports for a run it did not schedule (Job.RunNow) the job's next
//     scheduled time: such a run claims that tick, and the scheduled run is
//     then skipped everywhere. Use TryRunTick for runs off the schedule. A
//     run that gocron queued (singleton or limit mode LimitModeWait) is
//     reported with the scheduled time current when it starts, which may be
//     a later tick than the one that queued it.
//
// It needs the pglock schema: run pglock.Migrate (or `pglock migrate`) once;
// without it a run fails with an error matching pglock.ErrSchema, logged at
// Error ("gocronlock: tick not recorded"). A run that gocron reported no
// scheduled time for (a scheduler without the Ticks, a gocron job not named
// job.Name(), TryRun by hand) fails with [ErrNoTick]; the first such run of
// a Job logs why at Error (the Ticks is no scheduler's monitor, or its
// scheduler has no job of that name), the later ones at Debug. gocron has no
// hook that would let a Job see its scheduler's monitor sooner.
//
// # Construction errors
//
// gocron's own options check little, and a job cannot report a
// configuration error before its first run, possibly at night. The
// constructors here therefore return an error: a nil Locker ([ErrNilLocker]),
// an empty name ([ErrEmptyName]), a nil function ([ErrNilFunc]), a bad
// option or one that does not apply to the constructor, or a pglock.Locker
// on one connection ([ErrInvalidOption]), or options that do not fit the
// Locker (pglock's error). Nothing here panics; nil receivers return errors.
//
// # Lost connections
//
// A session lock lives as long as its connection. pglock watches it, and
// when it dies (pg_terminate_backend, a network failure, a server restart)
// the lock is gone at once for the other replicas, which may run the next
// tick. A Func job's context is cancelled then, with cause
// pglock.ErrLockLost, within pglock's lost-check bound; a job run under a
// Locker cannot be told (gocron gives it a context the Locker does not
// see): the loss is logged and Unlock returns an error matching
// pglock.ErrLockLost, which gocron ignores. In Transaction scope the job's
// writes die with the transaction and cannot commit.
//
// # Logging
//
// The package speaks up by default: with no logger given, it logs to
// slog.Default(), read at each message, what gocron does not log: a [Func]
// job's error ("gocronlock: run failed") and any reason a job cannot run
// (its ticks not wired, the pglock schema missing) at Error, lock and unlock
// errors at Error (gocron ignores Unlock's error), locks lost during a run at
// Warn, skips and why at Info, elections won and lost at Info. Every message
// names the job (or election) and its key.
//
// [WithLogger] sends them to a gocron.Logger instead, such as the one given
// to gocron.WithLogger, or a *slog.Logger. A nil logger turns logging off:
// WithLogger(nil) (or a logger on slog.DiscardHandler) silences it.
//
// # What it deliberately does not do
//
//   - It does not wait for a busy lock (except with WithTicks), and does not
//     run skipped runs later: a run happens on one replica or on none (at
//     most one, given a MinHold that covers the splay between replicas, or
//     WithTicks).
//   - It keeps no record of past runs unless asked: [WithTicks] records each
//     scheduled time run, in the lock's transaction.
//   - It does not combine with gocron's singleton or limit modes into
//     anything cluster-wide: those limit one scheduler's concurrency.
//   - It talks no SQL of its own: every lock goes through the
//     *pglock.Locker, and every tick record through pglock.ClaimTick.
//   - Session locks need a real session: behind PgBouncer in transaction
//     pooling mode, pglock refuses them (pglock.ErrTransactionPooler); use
//     Func in Transaction scope there (see package pglock).
package gocronlock
