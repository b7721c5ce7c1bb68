package cronlock

import (
	"fmt"
	"log/slog"

	"github.com/robfig/cron/v3"

	"github.com/pglockkit/kit/pglock"
)

// SkipIfLocked is the cluster-wide twin of cron.SkipIfStillRunning: a
// cron.JobWrapper whose jobs run only on the replica that holds the lock
// named name at the tick; the other replicas skip the tick and log it
// ("held elsewhere", at Info, to slog.Default() unless [WithLogger] or
// [WithSlog] says otherwise). It composes with cron.NewChain and cron.WithChain:
//
//	skip, err := cronlock.SkipIfLocked(locker, "billing", cronlock.WithLogger(logger))
//	if err != nil {
//		return err
//	}
//	c.AddJob("@daily", cron.NewChain(cron.Recover(logger), skip).Then(billing))
//
// Every job it wraps takes the same lock, so a SkipIfLocked given to
// cron.WithChain makes all the Cron's jobs exclusive with each other across
// the cluster; make one wrapper per job name otherwise. Each wrapped job is
// a [Job] made as [Wrap] makes it (see there for MaxRun and the scope).
//
// Unlike cron's wrappers it returns an error: a nil locker, an empty name
// or a bad option is reported here, at construction, rather than at the
// first tick. A nil job given to the wrapper cannot be reported then: its
// ticks log an error matching [ErrNilJob] and run nothing.
func SkipIfLocked(locker *pglock.Locker, name string, opts ...Option) (cron.JobWrapper, error) {
	cfg, err := newConfig(locker, name, opts)
	if err != nil {
		return nil, err
	}
	// Check the options against the Locker now, not when a job is wrapped.
	if _, err := cfg.newLock(locker, name); err != nil {
		return nil, err
	}
	return func(job cron.Job) cron.Job {
		err := fmt.Errorf("%w: the cron.JobWrapper of SkipIfLocked(%q) was given a nil cron.Job", ErrNilJob, name)
		if !isNilJob(job) {
			var j *Job
			if j, err = newJob(locker, name, cfg, nil, job); err == nil {
				return j
			}
		}
		log := cfg.logger(name, nil)
		return cron.FuncJob(func() { log.error(slog.LevelError, err, "cronlock: job not run") })
	}, nil
}
