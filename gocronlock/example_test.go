package gocronlock_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"sync/atomic"
	"time"

	"github.com/go-co-op/gocron/v2"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/gocronlock"
	"github.com/pglockkit/kit/pglock"
)

func examplePool() *pgxpool.Pool {
	pool, err := pgxpool.New(context.Background(), os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	return pool
}

// Three schedulers (three replicas of a service, here in one process) run
// the same job at the same instant: one of them runs it. MinHold keeps the
// lock past the run, so that a replica that fires late (a busy machine, a
// first connect) skips the run instead of repeating it.
func Example() {
	pool := examplePool()
	defer pool.Close()
	at := time.Now().Add(300 * time.Millisecond)
	var runs, skips atomic.Int32
	var schedulers []gocron.Scheduler
	for range 3 {
		locker, err := pglock.NewLocker(pool) // each replica has its own
		if err != nil {
			log.Fatal(err)
		}
		defer locker.Close()
		gl, err := gocronlock.NewLocker(locker, gocronlock.WithMinHold(5*time.Second))
		if err != nil {
			log.Fatal(err) // a nil locker, a bad option
		}
		s, err := gocron.NewScheduler(gocron.WithDistributedLocker(gl))
		if err != nil {
			log.Fatal(err)
		}
		_, err = s.NewJob(gocron.OneTimeJob(gocron.OneTimeJobStartDateTime(at)),
			gocron.NewTask(func() { runs.Add(1) }),
			gocron.WithName("example-report"), // the lock's key: name every job
			gocron.WithEventListeners(gocron.AfterLockError(func(uuid.UUID, string, error) { skips.Add(1) })))
		if err != nil {
			log.Fatal(err)
		}
		s.Start()
		schedulers = append(schedulers, s)
	}
	// Every replica fired: one ran, the others skipped (or 30 s passed).
	for deadline := time.Now().Add(30 * time.Second); runs.Load()+skips.Load() < 3 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	for _, s := range schedulers {
		_ = s.Shutdown() // waits for the run and ends a MinHold wait
	}
	fmt.Println("runs across 3 schedulers:", runs.Load())
	// Output: runs across 3 schedulers: 1
}

// A replica whose job another replica runs gets ErrBusy, through gocron's
// AfterLockError listener; a database error matches pglock's errors
// instead, so that the listener can tell the two apart.
func ExampleLocker_Lock() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	gl, err := gocronlock.NewLocker(locker)
	if err != nil {
		log.Fatal(err)
	}
	onLockError := gocron.AfterLockError(func(_ uuid.UUID, name string, err error) {
		if errors.Is(err, gocronlock.ErrBusy) {
			return // another replica runs this tick
		}
		log.Printf("job %s: cannot lock: %v", name, err) // the database is down
	})
	_ = onLockError // give it to the job: gocron.WithEventListeners(onLockError)

	held, err := gl.Lock(ctx, "example-billing") // what gocron does at a run
	if err != nil {
		log.Fatal(err)
	}
	_, err = gl.Lock(ctx, "example-billing") // another run of the job, meanwhile
	fmt.Println("busy:", errors.Is(err, gocronlock.ErrBusy))
	fmt.Println("database error:", errors.Is(err, pglock.ErrNotAcquired))
	_ = held.Unlock(ctx)
	// Output:
	// busy: true
	// database error: false
}

// With an Elector, only the scheduler of the elected replica runs jobs. The
// Elector campaigns in the background until its context ends or Close.
func ExampleNewElector() {
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	elector, err := gocronlock.NewElector(context.Background(), locker, "example-scheduler")
	if err != nil {
		log.Fatal(err)
	}
	defer elector.Close() // steps down: another replica takes over at once

	// Wait for the election, so that the example's one run is not skipped.
	for elector.IsLeader(context.Background()) != nil {
		time.Sleep(10 * time.Millisecond)
	}
	s, err := gocron.NewScheduler(gocron.WithDistributedElector(elector))
	if err != nil {
		log.Fatal(err)
	}
	done := make(chan struct{})
	_, err = s.NewJob(gocron.OneTimeJob(gocron.OneTimeJobStartImmediately()), gocron.NewTask(func() {
		fmt.Println("the leader's scheduler ran the job")
		close(done)
	}))
	if err != nil {
		log.Fatal(err)
	}
	s.Start()
	<-done
	_ = s.Shutdown()
	// Output: the leader's scheduler ran the job
}

// Func holds the job's lock itself, so it can run the job inside the lock's
// transaction: its writes commit with the lock when it returns nil, and
// roll back when it fails. Give job.Run to gocron.NewTask; if the scheduler
// has a gocronlock Locker, disable it for this job.
func ExampleFunc() {
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	done := make(chan struct{})
	job, err := gocronlock.Func(locker, "example-cleanup", func(ctx context.Context) error {
		defer close(done)
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
	}, gocronlock.WithScope(pglock.Transaction))
	if err != nil {
		log.Fatal(err) // a nil locker, an empty name, a nil function, a bad option
	}
	s, err := gocron.NewScheduler()
	if err != nil {
		log.Fatal(err)
	}
	_, err = s.NewJob(gocron.OneTimeJob(gocron.OneTimeJobStartImmediately()), gocron.NewTask(job.Run),
		gocron.WithName(job.Name()), gocron.WithDisabledDistributedJobLocker(true))
	if err != nil {
		log.Fatal(err)
	}
	s.Start()
	<-done
	_ = s.Shutdown()
	// Output: cleaned up inside the lock's transaction
}

// WithTicks runs each scheduled time once across the replicas: each run
// records its tick (the time gocron scheduled it for) in the lock's
// transaction, and a replica that fires a tick already run skips it, however
// late (its clock behind) it fires. Each scheduler gets a Ticks, the gocron
// monitor that tells the job its scheduled time.
func ExampleWithTicks() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()
	if _, err := pglock.Migrate(ctx, pool); err != nil { // once, at deploy time
		log.Fatal(err)
	}
	at := time.Now().Add(300 * time.Millisecond)
	var runs atomic.Int32
	var schedulers []gocron.Scheduler
	for range 2 { // two replicas
		locker, err := pglock.NewLocker(pool)
		if err != nil {
			log.Fatal(err)
		}
		defer locker.Close()
		ticks := gocronlock.NewTicks(nil)
		job, err := gocronlock.Func(locker, "example-ticks", func(ctx context.Context) error {
			tx, _ := pglock.TxFromContext(ctx)
			tick, _ := gocronlock.TickFromContext(ctx) // the same on every replica
			// INSERT INTO reports (day) ..., in the transaction that records the tick:
			if _, err := tx.Exec(ctx, "SELECT $1::timestamptz", tick); err != nil {
				return err
			}
			runs.Add(1)
			return nil
		}, gocronlock.WithScope(pglock.Transaction), gocronlock.WithTicks(ticks))
		if err != nil {
			log.Fatal(err)
		}
		s, err := gocron.NewScheduler(gocron.WithSchedulerMonitor(ticks))
		if err != nil {
			log.Fatal(err)
		}
		_, err = s.NewJob(gocron.OneTimeJob(gocron.OneTimeJobStartDateTime(at)), gocron.NewTask(job.Run),
			gocron.WithName(job.Name()))
		if err != nil {
			log.Fatal(err)
		}
		s.Start()
		schedulers = append(schedulers, s)
	}
	time.Sleep(time.Until(at) + 500*time.Millisecond)
	for _, s := range schedulers {
		_ = s.Shutdown()
	}
	fmt.Println("runs of the tick across 2 schedulers:", runs.Load())
	// Output: runs of the tick across 2 schedulers: 1
}

// A job speaks up by default, through slog.Default(): here a Func job's
// function fails, and the error is logged at Error besides being returned
// to gocron (which logs nothing of it). WithLogger(nil) turns logging off.
func Example_logging() {
	defer logToStdout()() // slog.Default() writes to stdout here, for the example's output
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	failing := func(ctx context.Context) error { return errors.New("disk full") }

	loud, err := gocronlock.Func(locker, "example-loud", failing)
	if err != nil {
		log.Fatal(err)
	}
	quiet, err := gocronlock.Func(locker, "example-quiet", failing, gocronlock.WithLogger(nil))
	if err != nil {
		log.Fatal(err)
	}
	_ = loud.Run(ctx)  // what gocron calls at a run (gocron.NewTask(loud.Run))
	_ = quiet.Run(ctx) // fails too, and says nothing
	// Output:
	// level=ERROR msg="gocronlock: run failed" job=example-loud error="disk full"
}

// logToStdout makes slog.Default() write text lines to stdout, without the
// attributes that change from run to run, and returns what puts it back.
func logToStdout() (restore func()) {
	old, w, flags := slog.Default(), log.Writer(), log.Flags()
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey || a.Key == "key" {
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
