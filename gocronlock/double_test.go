package gocronlock_test

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-co-op/gocron/v2"

	"github.com/pglockkit/kit/gocronlock"
	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/pglock/pglocktest"
)

// doubleLocker returns a Locker on srv (one replica), closed when the test
// ends.
func doubleLocker(t *testing.T, srv *pglocktest.Server) *pglock.Locker {
	t.Helper()
	lk, err := pglocktest.NewLocker(srv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	return lk
}

// gocronlock on pglocktest's in-memory double, unchanged. As gocron's
// Locker: a run that another replica holds is skipped (Lock fails with
// ErrBusy, and only it), as is one whose key is held elsewhere or made busy;
// the database down is pglock's error, not ErrBusy; a lock lost during a
// run makes Unlock report pglock.ErrLockLost, logged at Warn. In a running
// gocron scheduler, a run whose key is held elsewhere goes to the job's
// AfterLockError listener and the job does not run, until the key is free.
// As a Func job: a skip is (false, nil), and a loss cancels the job's
// context with cause pglock.ErrLockLost.
func TestOnDouble(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	var logs locktest.SlogRecords
	ctx := t.Context()
	replica := func() *gocronlock.Locker {
		gl, err := gocronlock.NewLocker(doubleLocker(t, srv), gocronlock.WithLogger(logs.Logger()))
		if err != nil {
			t.Fatal(err)
		}
		return gl
	}
	a, b := replica(), replica()
	key, err := a.Key("report")
	if err != nil {
		t.Fatal(err)
	}
	busy := func(err error) bool {
		return errors.Is(err, gocronlock.ErrBusy) && !errors.Is(err, pglock.ErrNotAcquired)
	}

	// The run of replica a holds the job's lock: replica b's is skipped,
	// and runs once a's has unlocked.
	la, err := a.Lock(ctx, "report")
	if err != nil {
		t.Fatal(err)
	}
	if l, err := b.Lock(ctx, "report"); l != nil || !busy(err) {
		t.Fatalf("Lock while another replica runs the job: %v, %v; want ErrBusy only", l, err)
	}
	if err := la.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	lb, err := b.Lock(ctx, "report")
	if err != nil {
		t.Fatalf("Lock once the other run unlocked: %v", err)
	}
	if err := lb.Unlock(ctx); err != nil {
		t.Fatal(err)
	}

	// Held elsewhere, or made busy: skipped.
	let := srv.HoldElsewhere(key)
	_, err = a.Lock(ctx, "report")
	let()
	if !busy(err) {
		t.Fatalf("Lock of a key held elsewhere: %v, want ErrBusy only", err)
	}
	srv.BusyNext(key)
	if _, err := b.Lock(ctx, "report"); !busy(err) {
		t.Fatalf("Lock of a key made busy by BusyNext: %v, want ErrBusy only", err)
	}

	// The database is down: pglock's error, not a skip.
	srv.SetDown(true)
	_, err = a.Lock(ctx, "report")
	srv.SetDown(false)
	if !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, pglock.ErrUnavailable) || errors.Is(err, gocronlock.ErrBusy) {
		t.Fatalf("Lock with the database down: %v, want pglock.ErrNotAcquired and ErrUnavailable, not ErrBusy", err)
	}
	if errs := logs.Errors(slog.LevelError, "gocronlock: lock not acquired"); len(errs) != 1 || !errors.Is(errs[0], pglock.ErrUnavailable) {
		t.Fatalf("Error logs of the failed Lock: %v", errs)
	}

	// Lost during the run: Unlock says so, and logs it.
	la, err = a.Lock(ctx, "report")
	if err != nil {
		t.Fatal(err)
	}
	if n := srv.Lose(key); n != 1 {
		t.Fatalf("Lose = %d, want 1", n)
	}
	if err := la.Unlock(ctx); !errors.Is(err, pglock.ErrLockLost) {
		t.Fatalf("Unlock after the loss: %v, want pglock.ErrLockLost", err)
	}
	if warned := logs.Errors(slog.LevelWarn, "gocronlock: lock lost during run"); len(warned) != 1 || !errors.Is(warned[0], pglock.ErrLockLost) {
		t.Fatalf("Warn logs of the loss: %v, want one matching pglock.ErrLockLost", warned)
	}

	// A gocron scheduler with the Locker: while the key is held elsewhere
	// each run is skipped, through AfterLockError; then the job runs.
	let = srv.HoldElsewhere(key)
	var lerrs lockErrs
	var runs atomic.Int32
	s := newScheduler(t, gocron.WithDistributedLocker(a))
	_, err = s.NewJob(gocron.DurationJob(20*time.Millisecond), gocron.NewTask(func() { runs.Add(1) }),
		gocron.WithName("report"), gocron.WithEventListeners(lerrs.listener()))
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	if !waitFor(5*time.Second, func() bool { return len(lerrs.all()) >= 2 }) {
		t.Fatal("AfterLockError was not called twice within 5 s")
	}
	if n := runs.Load(); n != 0 {
		t.Fatalf("the job ran %d time(s) while its key was held elsewhere", n)
	}
	for _, err := range lerrs.all() {
		if !busy(err) {
			t.Fatalf("AfterLockError got %v, want ErrBusy only", err)
		}
	}
	let()
	if !waitFor(5*time.Second, func() bool { return runs.Load() > 0 }) {
		t.Fatal("the job did not run within 5 s of its key's release")
	}
	shutdown(t, s)

	// A Func job: skipped while its key is held elsewhere; a loss during
	// the run cancels the job's context with cause ErrLockLost.
	var cause error
	var job *gocronlock.Job
	job, err = gocronlock.Func(doubleLocker(t, srv), "export", func(ctx context.Context) error {
		if n := srv.Lose(job.Key()); n != 1 {
			t.Errorf("Lose = %d, want 1", n)
		}
		<-ctx.Done()
		cause = context.Cause(ctx)
		return cause
	}, gocronlock.WithLogger(logs.Logger()), gocronlock.WithMaxRun(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	let = srv.HoldElsewhere(job.Key())
	ran, err := job.TryRun(ctx)
	let()
	if ran || err != nil {
		t.Fatalf("Func job whose key is held elsewhere: ran %v, %v; want a skip", ran, err)
	}
	ran, err = job.TryRun(ctx)
	if !ran || !errors.Is(err, pglock.ErrLockLost) || !errors.Is(cause, pglock.ErrLockLost) {
		t.Fatalf("Func job lost halfway: ran %v, %v, context cause %v; want ErrLockLost", ran, err, cause)
	}
	if keys := srv.Keys(); len(keys) != 0 {
		t.Fatalf("keys left: %v", keys)
	}
}
