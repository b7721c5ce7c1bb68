package gocronlock_test

import (
	"context"
	"errors"
	"log"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/go-co-op/gocron/v2"
	"github.com/google/uuid"

	"github.com/pglockkit/kit/gocronlock"
	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// These tests swap slog.Default, so they do not call t.Parallel: Go runs
// them before any parallel test of the package resumes.

// defaultLog makes slog.Default write text lines to a buffer for the test,
// and puts the default logger, and the log package's output, back after it.
func defaultLog(t *testing.T) *locktest.SyncBuffer {
	t.Helper()
	old, w, flags := slog.Default(), log.Writer(), log.Flags()
	var buf locktest.SyncBuffer
	slog.SetDefault(slog.New(slog.NewTextHandler(&buf, nil)))
	t.Cleanup(func() {
		slog.SetDefault(old) // does not reset the log package's output:
		log.SetOutput(w)
		log.SetFlags(flags)
	})
	return &buf
}

// linesOf returns the lines of log that name the job name.
func linesOf(log, name string) []string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "job="+name+" ") || strings.HasSuffix(l, "job="+name) {
			out = append(out, l)
		}
	}
	return out
}

// runErrors schedules task every 200 ms on s as the gocron job name, starts
// s, waits until n runs returned an error (the errors gocron hands to
// AfterJobRunsWithError), shuts s down and returns them.
func runErrors(t *testing.T, s gocron.Scheduler, name string, task func(context.Context) error, n int) []error {
	t.Helper()
	errs := make(chan error, 64)
	_, err := s.NewJob(gocron.DurationJob(200*time.Millisecond), gocron.NewTask(task), gocron.WithName(name),
		gocron.WithStartAt(gocron.WithStartImmediately()),
		gocron.WithEventListeners(gocron.AfterJobRunsWithError(func(_ uuid.UUID, _ string, err error) { errs <- err })))
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	var got []error
	for len(got) < n {
		select {
		case err := <-errs:
			got = append(got, err)
		case <-time.After(10 * time.Second):
			t.Fatalf("%d failed runs in 10 s, want %d", len(got), n)
		}
	}
	shutdown(t, s)
	return got
}

// A Func job WithTicks whose Ticks was not given to the scheduler
// (gocron.WithSchedulerMonitor), with no logger given: no run happens, each
// returns ErrNoTick to gocron, and the first says why in one line at Error
// on slog.Default, naming gocron.WithSchedulerMonitor; the runs after it do
// not repeat it at Error. The same for a scheduler that has the Ticks but a
// gocron job not named job.Name(): the line names gocron.WithName.
func TestDefaultLogTicksNotWired(t *testing.T) {
	buf := defaultLog(t)
	lk := newLockers(t, 1, pglock.WithScope(pglock.Transaction))[0]
	for _, c := range []struct {
		name  string
		wired bool   // the scheduler has the Ticks
		gname string // the gocron job's name, if not the Job's
		want  string
	}{
		{"no monitor", false, "", "is no scheduler's monitor: give it to the job's scheduler, gocron.WithSchedulerMonitor(ticks)"},
		{"misnamed", true, "another-name", "reported no scheduled time for a job of this name: schedule it there, named gocron.WithName(job.Name())"},
	} {
		t.Run(c.name, func(t *testing.T) {
			name := pgtest.UniqueKey(t)
			ticks := gocronlock.NewTicks(nil)
			ran := false
			job, err := gocronlock.Func(lk, name, func(context.Context) error { ran = true; return nil }, gocronlock.WithTicks(ticks))
			if err != nil {
				t.Fatal(err)
			}
			var s gocron.Scheduler
			if c.wired {
				s = newScheduler(t, gocron.WithSchedulerMonitor(ticks))
			} else {
				s = newScheduler(t)
			}
			gname := job.Name()
			if c.gname != "" {
				gname = c.gname
			}
			errs := runErrors(t, s, gname, job.Run, 3)
			for _, err := range errs {
				if !errors.Is(err, gocronlock.ErrNoTick) {
					t.Errorf("a run's error = %v, want ErrNoTick", err)
				}
			}
			if ran {
				t.Error("the function ran")
			}
			var errorLines []string
			for _, l := range linesOf(buf.String(), name) {
				if strings.Contains(l, "level=ERROR") {
					errorLines = append(errorLines, l)
				}
			}
			if len(errorLines) != 1 || !strings.Contains(errorLines[0], c.want) {
				t.Fatalf("%d failed runs; lines at ERROR on slog.Default:\n%s\nwant one, naming %s", len(errs), strings.Join(errorLines, "\n"), c.want)
			}
			t.Logf("%s", errorLines[0])
		})
	}
}

// A Func job whose function returns an error, run by gocron, with no
// logger given: each failed run is one line at Error on slog.Default, with
// the job's name and the error (gocron itself logs nothing of it).
func TestDefaultLogFuncError(t *testing.T) {
	buf := defaultLog(t)
	lk := newLockers(t, 1)[0]
	name := pgtest.UniqueKey(t)
	job, err := gocronlock.Func(lk, name, func(context.Context) error { return errors.New("the report failed") })
	if err != nil {
		t.Fatal(err)
	}
	errs := runErrors(t, newScheduler(t), job.Name(), job.Run, 2)
	lines := linesOf(buf.String(), name)
	if len(lines) != len(errs) {
		t.Fatalf("%d failed runs, lines on slog.Default:\n%s\nwant one per failed run", len(errs), buf.String())
	}
	for _, l := range lines {
		if !strings.Contains(l, "level=ERROR") || !strings.Contains(l, `msg="gocronlock: run failed"`) || !strings.Contains(l, "the report failed") {
			t.Errorf("line %q: want level ERROR, \"gocronlock: run failed\" and the function's error", l)
		}
	}
	t.Logf("%s", lines[0])
}

// Logging is turned off by WithLogger(nil) or a logger that discards; a
// skip logs at Info on slog.Default by default, for a Func job and for a
// Locker.
func TestDefaultLogOff(t *testing.T) {
	buf := defaultLog(t)
	ctx := context.Background()
	lk := newLockers(t, 1)[0]
	fail := func(context.Context) error { return errors.New("failed") }
	for _, opt := range []gocronlock.Option{gocronlock.WithLogger(nil), gocronlock.WithLogger(slog.New(slog.DiscardHandler))} {
		name := pgtest.UniqueKey(t)
		job, err := gocronlock.Func(lk, name, fail, opt)
		if err != nil {
			t.Fatal(err)
		}
		if err := job.Run(ctx); err == nil {
			t.Fatal("the run did not fail")
		}
		if lines := linesOf(buf.String(), name); len(lines) != 0 {
			t.Errorf("logging turned off, yet:\n%s", strings.Join(lines, "\n"))
		}
	}

	name := pgtest.UniqueKey(t)
	job, err := gocronlock.Func(lk, name, func(context.Context) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	gl, err := gocronlock.NewLocker(lk)
	if err != nil {
		t.Fatal(err)
	}
	other := locktest.HoldElsewhere(t, job.Key())
	if err := job.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := gl.Lock(ctx, name); !errors.Is(err, gocronlock.ErrBusy) {
		t.Fatalf("Locker.Lock while held elsewhere = %v, want ErrBusy", err)
	}
	_ = other.Release(ctx)
	lines := linesOf(buf.String(), name)
	if len(lines) != 2 {
		t.Fatalf("lines:\n%s\nwant two skips", strings.Join(lines, "\n"))
	}
	for _, l := range lines {
		if !strings.Contains(l, "level=INFO") || !strings.Contains(l, `reason="held elsewhere"`) {
			t.Errorf("line %q: want a skip at INFO", l)
		}
	}
}
