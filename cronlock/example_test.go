package cronlock_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/robfig/cron/v3"

	"github.com/pglockkit/kit/cronlock"
	"github.com/pglockkit/kit/pglock"
)

func examplePool() *pgxpool.Pool {
	pool, err := pgxpool.New(context.Background(), os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	return pool
}

// Every replica schedules the report; at each tick one of them makes it.
// MinHold keeps the lock a little past the run, so that a replica whose
// clock is behind skips the tick instead of running it again.
func Example() {
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()

	done := make(chan struct{}, 1)
	report, err := cronlock.Func(locker, "example-report", func(ctx context.Context) error {
		fmt.Println("report generated, by one replica only")
		done <- struct{}{}
		return nil
	}, cronlock.WithMinHold(500*time.Millisecond))
	if err != nil {
		log.Fatal(err) // a nil locker, an empty name, a bad option
	}

	c := cron.New(cron.WithChain(cron.Recover(cron.DefaultLogger)))
	if _, err := c.AddJob("@every 1s", report); err != nil {
		log.Fatal(err)
	}
	c.Start()
	<-done
	<-c.Stop().Done() // waits for the run, MinHold included
	// Output: report generated, by one replica only
}

// SkipIfLocked is cron.SkipIfStillRunning for the whole cluster. Here
// another replica holds the lock at the first tick, which is skipped and
// logged; the second tick runs.
func ExampleSkipIfLocked() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey || a.Key == "key" {
				return slog.Attr{} // keep the output stable
			}
			return a
		},
	}))

	skip, err := cronlock.SkipIfLocked(locker, "example-billing", cronlock.WithSlog(logger))
	if err != nil {
		log.Fatal(err)
	}
	billing := cron.NewChain(cron.Recover(cron.DefaultLogger), skip).Then(cron.FuncJob(func() {
		fmt.Println("billing ran")
	}))

	other, _ := locker.NewLock(cronlock.DefaultNamespace + "example-billing")
	if err := other.Acquire(ctx); err != nil { // "another replica"
		log.Fatal(err)
	}
	billing.Run() // what cron calls at a tick
	_ = other.Release(ctx)
	billing.Run()
	// Output:
	// level=INFO msg="cronlock: skip" job=example-billing reason="held elsewhere"
	// billing ran
}

// In Transaction scope the job runs in the lock's transaction: its writes
// commit with the lock when it returns nil, and roll back when it fails.
func ExampleWithScope() {
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	cleanup, err := cronlock.Func(locker, "example-cleanup", func(ctx context.Context) error {
		tx, ok := pglock.TxFromContext(ctx)
		if !ok {
			return errors.New("no transaction")
		}
		// DELETE FROM sessions WHERE expires < now(), for instance.
		var n int
		if err := tx.QueryRow(ctx, "SELECT 1").Scan(&n); err != nil {
			return err
		}
		fmt.Println("cleaned up inside the lock's transaction")
		return nil
	}, cronlock.WithScope(pglock.Transaction))
	if err != nil {
		log.Fatal(err)
	}
	cleanup.Run()
	// Output: cleaned up inside the lock's transaction
}

// RunContext runs a tick on demand ("run now") and reports whether this
// replica ran it.
func ExampleJob_RunContext() {
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	job, err := cronlock.Func(locker, "example-reindex", func(ctx context.Context) error {
		return errors.New("index busy")
	})
	if err != nil {
		log.Fatal(err)
	}
	ran, err := job.RunContext(context.Background())
	fmt.Println("ran:", ran)
	fmt.Println("error:", err)
	// Output:
	// ran: true
	// error: index busy
}

// A bad argument is an error when the job is made, not a panic at its first
// tick.
func ExampleFunc_badInput() {
	_, err := cronlock.Func(nil, "billing", func(context.Context) error { return nil })
	fmt.Println(errors.Is(err, cronlock.ErrNilLocker), err)
	// Output: true cronlock: nil *pglock.Locker
}

// With ticks, a run is for the schedule's time (the tick), fixed when cron
// started it, and runs once across every replica: the function finds its
// tick in its context.
func ExampleTickFromContext() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()
	if _, err := pglock.Migrate(ctx, pool); err != nil { // the tick records' table
		log.Fatal(err)
	}
	locker, err := pglock.NewLocker(pool, pglock.WithScope(pglock.Transaction))
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	name := fmt.Sprintf("example-daily-%d", time.Now().UnixNano()) // a job of its own per run of the example
	job, err := cronlock.Func(locker, name, func(ctx context.Context) error {
		tick, _ := cronlock.TickFromContext(ctx)
		fmt.Println("the run of the tick at", tick.Format("15:04"))
		return nil
	}, cronlock.WithTicksSpec("0 0 * * *")) // the spec given to c.AddJob
	if err != nil {
		log.Fatal(err) // a spec that does not parse, an @every spec
	}
	job.Run() // as cron would: runs today's tick
	job.Run() // the same tick again: already ran, skipped
	// Output: the run of the tick at 00:00
}

// A job speaks up by default, through slog.Default(): here the job's
// function fails, and its error is logged at Error. WithSlog(nil) turns
// logging off.
func Example_logging() {
	defer logToStdout()() // slog.Default() writes to stdout here, for the example's output
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	failing := func(ctx context.Context) error { return errors.New("disk full") }

	loud, err := cronlock.Func(locker, "example-loud", failing)
	if err != nil {
		log.Fatal(err)
	}
	quiet, err := cronlock.Func(locker, "example-quiet", failing, cronlock.WithSlog(nil))
	if err != nil {
		log.Fatal(err)
	}
	loud.Run()  // what cron calls at a tick
	quiet.Run() // fails too, and says nothing
	// Output:
	// level=ERROR msg="cronlock: run failed" job=example-loud error="disk full"
}

// logToStdout makes slog.Default() write text lines to stdout, without the
// attributes that change from run to run, and returns what puts it back.
func logToStdout() (restore func()) {
	old, w, flags := slog.Default(), log.Writer(), log.Flags()
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			switch a.Key {
			case slog.TimeKey, "key", "duration":
				return slog.Attr{}
			}
			return a
		},
	})))
	return func() {
		slog.SetDefault(old) // leaves the log package writing to the handler above:
		log.SetOutput(w)
		log.SetFlags(flags)
	}
}
