package gocronlock_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-co-op/gocron/v2"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/gocronlock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

var tableSeq atomic.Int64

// TestFuncTransaction: Func jobs in Transaction scope, run by a gocron
// scheduler (gocron.NewTask(job.Run)), find the lock's transaction in their
// context; a row inserted through it commits when the job returns nil, and
// rolls back when it returns an error (which gocron's AfterJobRunsWithError
// gets) or panics (AfterJobRunsWithPanic). During the run pg_locks shows the
// transaction's session holding the key; afterwards nothing holds it.
func TestFuncTransaction(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	obs := pgtest.Pool(t, 2)
	table := pgx.Identifier{fmt.Sprintf("gocronlock_tx_%d_%d_%d", os.Getpid(), time.Now().UnixNano(), tableSeq.Add(1))}.Sanitize()
	if _, err := obs.Exec(ctx, "CREATE TABLE "+table+" (job text NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = obs.Exec(context.Background(), "DROP TABLE "+table) })
	lk := newLockers(t, 1)[0]
	s := newScheduler(t)
	s.Start()

	type outcome struct {
		err   error
		panic any
	}
	cases := []struct {
		name string
		end  func() error // what the job does after its insert
		rows int
	}{
		{"commit", func() error { return nil }, 1},
		{"error", func() error { return errors.New("job failed") }, 0},
		{"panic", func() error { panic("job panicked") }, 0},
	}
	for _, c := range cases {
		name := pgtest.UniqueKey(t) + ":" + c.name
		var key pglock.Key
		job, err := gocronlock.Func(lk, name, func(ctx context.Context) error {
			tx, ok := pglock.TxFromContext(ctx)
			if !ok {
				return errors.New("no transaction in the job's context")
			}
			if _, err := tx.Exec(ctx, "INSERT INTO "+table+" (job) VALUES ($1)", name); err != nil {
				return err
			}
			var pid int32
			if err := tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
				return err
			}
			if pids, err := grantedPIDs(ctx, obs, key); err != nil || len(pids) != 1 || pids[0] != pid {
				return fmt.Errorf("pg_locks holders %v (err %v), want the transaction's session %d", pids, err, pid)
			}
			return c.end()
		}, gocronlock.WithScope(pglock.Transaction))
		if err != nil {
			t.Fatal(err)
		}
		key = job.Key()
		done := make(chan outcome, 1)
		_, err = s.NewJob(gocron.OneTimeJob(gocron.OneTimeJobStartImmediately()), gocron.NewTask(job.Run),
			gocron.WithName(job.Name()),
			gocron.WithEventListeners(
				gocron.AfterJobRuns(func(uuid.UUID, string) { done <- outcome{} }),
				gocron.AfterJobRunsWithError(func(_ uuid.UUID, _ string, err error) { done <- outcome{err: err} }),
				gocron.AfterJobRunsWithPanic(func(_ uuid.UUID, _ string, v any) { done <- outcome{panic: v} }),
			))
		if err != nil {
			t.Fatal(err)
		}
		t.Run(c.name, func(t *testing.T) {
			var o outcome
			select {
			case o = <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("the job did not run within 5 s")
			}
			switch c.name {
			case "commit":
				if o.err != nil || o.panic != nil {
					t.Errorf("outcome %+v, want success", o)
				}
			case "error":
				if o.err == nil || o.err.Error() != "job failed" {
					t.Errorf("AfterJobRunsWithError got %v, want the job's error", o.err)
				}
			case "panic":
				if o.panic != "job panicked" {
					t.Errorf("AfterJobRunsWithPanic got %v, want the job's panic", o.panic)
				}
			}
			pgtest.WaitFree(t, obs, key)
			var n int
			if err := obs.QueryRow(ctx, "SELECT count(*) FROM "+table+" WHERE job = $1", name).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n != c.rows {
				t.Errorf("%d row(s) after the run, want %d", n, c.rows)
			}
		})
	}
	shutdown(t, s)
}

// TestFuncRun: what a Func job does at a run, driven by hand (TryRun and
// Run, as gocron calls it): a run while an earlier one is still going here
// is skipped; a run while another session holds the key is skipped (Run
// returns nil: a skip is no failure); MinHold keeps the lock after the
// function returns; MaxRun cancels the function's context with cause
// ErrMaxRunExceeded; a lost lock cancels it with cause pglock.ErrLockLost.
func TestFuncRun(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	obs := pgtest.Pool(t, 1)
	lks := newLockers(t, 2)

	t.Run("skips", func(t *testing.T) {
		var rec recLog
		name := pgtest.UniqueKey(t)
		entered, leave := make(chan struct{}), make(chan struct{})
		job, err := gocronlock.Func(lks[0], name, func(ctx context.Context) error {
			close(entered)
			<-leave
			return nil
		}, gocronlock.WithLogger(&rec))
		if err != nil {
			t.Fatal(err)
		}
		first := make(chan error, 1)
		go func() { _, err := job.TryRun(ctx); first <- err }()
		<-entered
		if ran, err := job.TryRun(ctx); ran || err != nil {
			t.Errorf("TryRun while running here = (%v, %v), want (false, nil)", ran, err)
		}
		close(leave)
		if err := <-first; err != nil {
			t.Fatal(err)
		}
		other, _ := lks[1].NewLock(gocronlock.DefaultNamespace + name)
		if err := other.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		if err := job.Run(ctx); err != nil {
			t.Errorf("Run while held elsewhere = %v, want nil (skipped)", err)
		}
		_ = other.Release(ctx)
		if rec.Count("INFO gocronlock: skip", "reason=still running here") != 1 ||
			rec.Count("INFO gocronlock: skip", "reason=held elsewhere") != 1 {
			t.Errorf("log:\n%s", rec.String())
		}
		pgtest.WaitFree(t, obs, job.Key())
	})

	t.Run("MinHold", func(t *testing.T) {
		job, err := gocronlock.Func(lks[0], pgtest.UniqueKey(t), func(context.Context) error { return nil },
			gocronlock.WithMinHold(300*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if ran, err := job.TryRun(ctx); !ran || err != nil {
			t.Fatalf("TryRun = (%v, %v)", ran, err)
		}
		if d := time.Since(start); d < 300*time.Millisecond {
			t.Errorf("the run returned after %v, before MinHold", d)
		}
		cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer cancel()
		start = time.Now()
		if ran, err := job.TryRun(cctx); !ran || err != nil {
			t.Fatalf("TryRun = (%v, %v)", ran, err)
		}
		if d := time.Since(start); d > 250*time.Millisecond {
			t.Errorf("the run returned after %v: the end of gocron's context did not cut MinHold short", d)
		}
		pgtest.WaitFree(t, obs, job.Key())
	})

	t.Run("MaxRun", func(t *testing.T) {
		job, err := gocronlock.Func(lks[0], pgtest.UniqueKey(t), func(ctx context.Context) error {
			<-ctx.Done()
			return ctx.Err()
		}, gocronlock.WithMaxRun(100*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		ran, err := job.TryRun(ctx)
		if !ran || !errors.Is(err, gocronlock.ErrMaxRunExceeded) || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("TryRun = (%v, %v), want (true, ErrMaxRunExceeded)", ran, err)
		}
	})

	t.Run("lost", func(t *testing.T) {
		var rec recLog
		name := pgtest.UniqueKey(t)
		entered := make(chan struct{})
		job, err := gocronlock.Func(lks[1], name, func(ctx context.Context) error {
			close(entered)
			select {
			case <-ctx.Done():
				return context.Cause(ctx)
			case <-time.After(5 * time.Second):
				return errors.New("the job's context was not cancelled within 5 s of the loss")
			}
		}, gocronlock.WithLogger(&rec))
		if err != nil {
			t.Fatal(err)
		}
		res := make(chan error, 1)
		go func() { _, err := job.TryRun(ctx); res <- err }()
		<-entered
		hs := pgtest.Granted(t, obs, job.Key())
		if len(hs) != 1 {
			t.Fatalf("pg_locks holders: %+v, want one", hs)
		}
		pgtest.Terminate(t, obs, hs[0].PID)
		if err := <-res; !errors.Is(err, pglock.ErrLockLost) {
			t.Errorf("TryRun = %v, want pglock.ErrLockLost", err)
		}
		if rec.Count("WARN gocronlock: lock lost during run", "job="+name) != 1 {
			t.Errorf("log:\n%s", rec.String())
		}
		pgtest.WaitFree(t, obs, job.Key())
	})
}

// TestFuncLockedTwice: a Func job that a scheduler's gocronlock Locker has
// already locked (the same name, the same process) refuses to run with
// ErrLockedTwice, rather than skip as "held elsewhere" at every tick; with
// the scheduler's Locker disabled for the job it runs.
func TestFuncLockedTwice(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 1)
	lk := newLockers(t, 1)[0]
	gl, err := gocronlock.NewLocker(lk)
	if err != nil {
		t.Fatal(err)
	}
	var runs atomic.Int32
	job, err := gocronlock.Func(lk, name, func(context.Context) error { runs.Add(1); return nil })
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 4)
	s := newScheduler(t, gocron.WithDistributedLocker(gl))
	listen := gocron.WithEventListeners(gocron.AfterJobRunsWithError(func(_ uuid.UUID, _ string, err error) { errs <- err }))
	_, err = s.NewJob(gocron.OneTimeJob(gocron.OneTimeJobStartImmediately()), gocron.NewTask(job.Run),
		gocron.WithName(job.Name()), listen)
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	select {
	case err := <-errs:
		if !errors.Is(err, gocronlock.ErrLockedTwice) {
			t.Errorf("AfterJobRunsWithError got %v, want ErrLockedTwice", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no error within 5 s")
	}
	if n := runs.Load(); n != 0 {
		t.Errorf("the job ran %d time(s)", n)
	}
	pgtest.WaitFree(t, obs, job.Key()) // gocron unlocks after the listener
	done := make(chan struct{})
	_, err = s.NewJob(gocron.OneTimeJob(gocron.OneTimeJobStartImmediately()), gocron.NewTask(job.Run),
		gocron.WithName(job.Name()), gocron.WithDisabledDistributedJobLocker(true), listen,
		gocron.WithEventListeners(gocron.AfterJobRuns(func(uuid.UUID, string) { close(done) })))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case err := <-errs:
		t.Fatalf("with the scheduler's Locker disabled: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("the job did not run within 5 s")
	}
	if n := runs.Load(); n != 1 {
		t.Errorf("the job ran %d time(s), want 1", n)
	}
	shutdown(t, s)
	pgtest.WaitFree(t, obs, job.Key())
}
