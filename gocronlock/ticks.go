package gocronlock

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-co-op/gocron/v2"

	"github.com/pglockkit/kit/pglock"
)

// Ticks tells the [Func] jobs of one scheduler the time each run was
// scheduled for, the tick that [WithTicks] records. It is a
// gocron.SchedulerMonitor: give it to the scheduler with
// gocron.WithSchedulerMonitor, and to each of its Func jobs with WithTicks.
//
// gocron hands a task no scheduled time; the one place it tells it is the
// scheduler monitor's JobSchedulingDelay, which it calls on the run's
// goroutine just before the task, with the time it had scheduled the run for
// (the time its timer was set for, computed on the scheduler's clock, not
// read from a clock when the run starts). Ticks keeps that time by job name
// until the job's Run takes it.
//
// A scheduler has one monitor: to keep another one, pass it to [NewTicks],
// which forwards every call to it. One Ticks serves every job of its
// scheduler; each scheduler needs its own. A Ticks is safe for concurrent
// use.
type Ticks struct {
	next gocron.SchedulerMonitor
	// wired: a scheduler called this Ticks (it is one's monitor).
	wired atomic.Bool
	mu    sync.Mutex
	at    map[string]time.Time // gocron job name -> scheduled time of the run being started
}

var _ gocron.SchedulerMonitor = (*Ticks)(nil)

// NewTicks returns a Ticks for one scheduler. next, if not nil, is the
// scheduler's own monitor: every call is forwarded to it.
func NewTicks(next gocron.SchedulerMonitor) *Ticks {
	if v := reflect.ValueOf(next); v.Kind() == reflect.Pointer && v.IsNil() {
		next = nil // a typed nil
	}
	return &Ticks{next: next, at: map[string]time.Time{}}
}

// JobSchedulingDelay is what gocron calls as a run starts: Ticks keeps the
// run's scheduled time for the job's Run.
func (t *Ticks) JobSchedulingDelay(job gocron.Job, scheduledTime, actualStartTime time.Time) {
	if t == nil {
		return
	}
	t.wired.Store(true)
	if job != nil && !scheduledTime.IsZero() {
		t.mu.Lock()
		t.at[job.Name()] = scheduledTime
		t.mu.Unlock()
	}
	if t.next != nil {
		t.next.JobSchedulingDelay(job, scheduledTime, actualStartTime)
	}
}

// why says why a run found no tick (see ErrNoTick): no scheduler calls t,
// or the one that does has no job of the name.
func (t *Ticks) why() string {
	if !t.wired.Load() {
		return "its Ticks is no scheduler's monitor: give it to the job's scheduler, gocron.WithSchedulerMonitor(ticks)" +
			" (or gocronlock.NewTicks(monitor) to keep another monitor)"
	}
	return "the scheduler whose monitor is its Ticks reported no scheduled time for a job of this name:" +
		" schedule it there, named gocron.WithName(job.Name()) (TryRun by hand: use TryRunTick)"
}

// take returns, and forgets, the scheduled time of the run of job name that
// gocron is starting.
func (t *Ticks) take(name string) (time.Time, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	at, ok := t.at[name]
	delete(t.at, name)
	return at, ok
}

// The other methods of gocron.SchedulerMonitor only forward.

// SchedulerStarted forwards to the monitor given to NewTicks.
func (t *Ticks) SchedulerStarted() {
	if t != nil {
		t.wired.Store(true)
	}
	if t != nil && t.next != nil {
		t.next.SchedulerStarted()
	}
}

// SchedulerStopped forwards to the monitor given to NewTicks.
func (t *Ticks) SchedulerStopped() {
	if t != nil && t.next != nil {
		t.next.SchedulerStopped()
	}
}

// SchedulerShutdown forwards to the monitor given to NewTicks.
func (t *Ticks) SchedulerShutdown() {
	if t != nil && t.next != nil {
		t.next.SchedulerShutdown()
	}
}

// JobRegistered forwards to the monitor given to NewTicks.
func (t *Ticks) JobRegistered(job gocron.Job) {
	if t != nil {
		t.wired.Store(true)
	}
	if t != nil && t.next != nil {
		t.next.JobRegistered(job)
	}
}

// JobUnregistered forwards to the monitor given to NewTicks.
func (t *Ticks) JobUnregistered(job gocron.Job) {
	if t != nil && t.next != nil {
		t.next.JobUnregistered(job)
	}
}

// JobStarted forwards to the monitor given to NewTicks.
func (t *Ticks) JobStarted(job gocron.Job) {
	if t != nil && t.next != nil {
		t.next.JobStarted(job)
	}
}

// JobRunning forwards to the monitor given to NewTicks.
func (t *Ticks) JobRunning(job gocron.Job) {
	if t != nil && t.next != nil {
		t.next.JobRunning(job)
	}
}

// JobFailed forwards to the monitor given to NewTicks.
func (t *Ticks) JobFailed(job gocron.Job, err error) {
	if t != nil && t.next != nil {
		t.next.JobFailed(job, err)
	}
}

// JobCompleted forwards to the monitor given to NewTicks.
func (t *Ticks) JobCompleted(job gocron.Job) {
	if t != nil && t.next != nil {
		t.next.JobCompleted(job)
	}
}

// JobExecutionTime forwards to the monitor given to NewTicks.
func (t *Ticks) JobExecutionTime(job gocron.Job, d time.Duration) {
	if t != nil && t.next != nil {
		t.next.JobExecutionTime(job, d)
	}
}

// ConcurrencyLimitReached forwards to the monitor given to NewTicks.
func (t *Ticks) ConcurrencyLimitReached(limitType string, job gocron.Job) {
	if t != nil && t.next != nil {
		t.next.ConcurrencyLimitReached(limitType, job)
	}
}

// tickKey carries a run's tick in the function's context.
type tickKey struct{}

// TickFromContext returns the tick (the scheduled time) that the run of a
// [Func] job made [WithTicks] was recorded for, inside its function: the
// same on every replica, for naming what the run does ("the report of
// 02:00"). It returns false outside such a run.
func TickFromContext(ctx context.Context) (time.Time, bool) {
	if ctx == nil {
		return time.Time{}, false
	}
	tick, ok := ctx.Value(tickKey{}).(time.Time)
	return tick, ok
}

// errTickRan ends a hold whose tick was recorded already: the transaction
// rolls back and the run is skipped.
var errTickRan = errors.New("gocronlock: tick already ran")

// claim records tick in the lock's transaction (see WithTicks): errTickRan
// when it was recorded already, by any replica; an error matching
// pglock.ErrSchema when the pglock schema is missing.
func (j *Job) claim(ctx context.Context, tick time.Time) error {
	var tx any
	if ptx, ok := pglock.TxFromContext(ctx); ok {
		tx = ptx
	} else if stx, ok := pglock.SQLTxFromContext(ctx); ok {
		tx = stx
	} else {
		// WithTicks requires Transaction scope: Func checked it.
		return fmt.Errorf("gocronlock: job %q: no lock transaction to record tick %s in", j.name, tick.Format(time.RFC3339Nano))
	}
	claimed, err := pglock.ClaimTick(ctx, tx, j.tickJob, tick)
	switch {
	case err != nil:
		return fmt.Errorf("gocronlock: job %q: %w", j.name, err)
	case !claimed:
		return errTickRan
	}
	return nil
}
