package cronlock_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"math/rand/v2"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/robfig/cron/v3"

	"github.com/pglockkit/kit/cronlock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// These tests swap slog.Default, so they do not call t.Parallel: Go runs
// them before any parallel test of the package resumes.

// defaultLog makes slog.Default write text lines to a buffer for the test,
// and puts the default logger, and the log package's output, back after it.
func defaultLog(t *testing.T) *syncBuffer {
	t.Helper()
	old, w, flags := slog.Default(), log.Writer(), log.Flags()
	var buf syncBuffer
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
		if strings.Contains(l, "job="+name+" ") || strings.HasSuffix(l, "job="+name) ||
			strings.Contains(l, "job=\""+name+"\"") {
			out = append(out, l)
		}
	}
	return out
}

// A robfig/cron job made by Func whose function returns an error, with no
// logger given: each failed run is one line at Error on slog.Default, with
// the job's name and the error.
func TestDefaultLogJobError(t *testing.T) {
	buf := defaultLog(t)
	name := pgtest.UniqueKey(t)
	lk := newLockers(t, 1)[0]
	var runs atomic.Int32
	job, err := cronlock.Func(lk, name, func(context.Context) error {
		runs.Add(1)
		return errors.New("the report failed")
	})
	if err != nil {
		t.Fatal(err)
	}
	c := cron.New(cron.WithChain(cron.Recover(cron.DefaultLogger)))
	if _, err := c.AddJob("@every 1s", job); err != nil {
		t.Fatal(err)
	}
	c.Start()
	deadline := time.Now().Add(10 * time.Second)
	for runs.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	<-c.Stop().Done()
	lines := linesOf(buf.String(), name)
	if n := int(runs.Load()); n == 0 || len(lines) != n {
		t.Fatalf("%d runs, %d lines on slog.Default; want one line per failed run:\n%s", n, len(lines), buf.String())
	}
	for _, l := range lines {
		if !strings.Contains(l, "level=ERROR") || !strings.Contains(l, `msg="cronlock: run failed"`) || !strings.Contains(l, "the report failed") {
			t.Errorf("line %q: want level ERROR, \"cronlock: run failed\" and the job's error", l)
		}
	}
	t.Logf("%s", lines[0])
}

// freshDatabase creates an empty database (no pglock schema) for one test
// and returns a pool on it; it is dropped when the test ends.
func freshDatabase(t *testing.T) *pgxpool.Pool {
	t.Helper()
	admin := pgtest.Pool(t, 1)
	name := fmt.Sprintf("cronlock_fresh_%d", rand.Uint32())
	if _, err := admin.Exec(context.Background(), "CREATE DATABASE "+name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = admin.Exec(context.Background(), "DROP DATABASE "+name+" WITH (FORCE)") })
	u, err := url.Parse(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	pool, err := pgxpool.New(context.Background(), u.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// A WithTicks job on a database without the pglock schema, with no logger
// given: the run does not run the function, and says why in one line at
// Error on slog.Default, naming pglock migrate. RunContext reports it as
// not run, with an error matching pglock.ErrSchema.
func TestDefaultLogTicksWithoutSchema(t *testing.T) {
	buf := defaultLog(t)
	ctx := context.Background()
	lk, err := pglock.NewLocker(freshDatabase(t), pglock.WithScope(pglock.Transaction))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	name := pgtest.UniqueKey(t)
	ran := false
	every, _ := cron.ParseStandard("*/5 * * * *")
	tick := time.Date(2026, 11, 30, 12, 5, 0, 0, time.UTC)
	job, err := cronlock.Func(lk, name, func(context.Context) error { ran = true; return nil },
		cronlock.WithTicks(every), cronlock.WithClock(func() time.Time { return tick }))
	if err != nil {
		t.Fatal(err)
	}
	job.Run() // what cron calls at a tick
	lines := linesOf(buf.String(), name)
	if ran || len(lines) != 1 {
		t.Fatalf("the function ran: %v; lines on slog.Default:\n%s\nwant one line, and no run", ran, buf.String())
	}
	if l := lines[0]; !strings.Contains(l, "level=ERROR") || !strings.Contains(l, `msg="cronlock: job not run"`) ||
		!strings.Contains(l, "pglock migrate") {
		t.Errorf("line %q: want level ERROR, \"cronlock: job not run\", and the way out (pglock migrate)", l)
	}
	t.Logf("%s", lines[0])
	if got, err := job.RunContext(ctx); got || !errors.Is(err, pglock.ErrSchema) || ran {
		t.Errorf("RunContext without the schema = %v, %v (function ran: %v); want false and pglock.ErrSchema", got, err, ran)
	}
}

// Logging is turned off by WithSlog(nil), WithLogger(nil) or a logger that
// discards; a skip logs at Info on slog.Default by default.
func TestDefaultLogOff(t *testing.T) {
	buf := defaultLog(t)
	lk := newLockers(t, 1)[0]
	fail := func(context.Context) error { return errors.New("failed") }
	for _, opt := range []cronlock.Option{cronlock.WithSlog(nil), cronlock.WithLogger(nil), cronlock.WithSlog(slog.New(slog.DiscardHandler))} {
		name := pgtest.UniqueKey(t)
		job, err := cronlock.Func(lk, name, fail, opt)
		if err != nil {
			t.Fatal(err)
		}
		job.Run()
		if lines := linesOf(buf.String(), name); len(lines) != 0 {
			t.Errorf("logging turned off, yet:\n%s", strings.Join(lines, "\n"))
		}
	}

	name := pgtest.UniqueKey(t)
	job, err := cronlock.Func(lk, name, func(context.Context) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	other, err := lk.NewLock(cronlock.DefaultNamespace + name)
	if err != nil {
		t.Fatal(err)
	}
	if err := other.Acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	job.Run()
	_ = other.Release(context.Background())
	job.Run() // ran: at Debug, not shown at slog's default level
	if lines := linesOf(buf.String(), name); len(lines) != 1 || !strings.Contains(lines[0], "level=INFO") ||
		!strings.Contains(lines[0], `reason="held elsewhere"`) {
		t.Errorf("a skip and a run: lines\n%s\nwant one, the skip at INFO", strings.Join(lines, "\n"))
	}
}
