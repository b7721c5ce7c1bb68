// Command gocron runs three go-co-op/gocron v2 schedulers in one process, as
// three replicas of a service would run them: each has its own pool,
// *pglock.Locker and gocronlock Locker (gocron.WithDistributedLocker), and
// all schedule the same job every second. At each tick one replica runs the
// job; the other two skip it ("held elsewhere"), and gocron hands them an
// error matching gocronlock.ErrBusy. It stops by itself after three ticks
// (about three seconds) and says whether each ran exactly once.
//
//	go run ./examples/gocron
//
// The database is DATABASE_URL, else a server at 127.0.0.1:5432, else a
// throwaway cluster started from the machine's PostgreSQL binaries.
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"os/signal"
	"sort"
	"sync"
	"time"

	"github.com/go-co-op/gocron/v2"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/gocronlock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

const replicas = 3

func main() {
	if err := run(); err != nil {
		log.Fatal(err)
	}
}

func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	srv, err := pgtest.FindOrStart(ctx)
	if err != nil {
		return err
	}
	defer srv.Stop()

	// Skips are logged; the time and the key number are left out to keep
	// the lines short.
	handler := slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey || a.Key == "key" {
				return slog.Attr{}
			}
			return a
		},
	})

	var (
		mu    sync.Mutex
		ticks = map[time.Time][]string{} // tick -> replicas that ran it
		busy  int                        // AfterLockError calls matching ErrBusy
		other []error                    // and the others (the database)
		third = make(chan struct{})      // closed when the third tick runs
	)
	schedulers := make([]gocron.Scheduler, replicas)
	for i := range schedulers {
		name := fmt.Sprintf("replica-%d", i+1)
		cfg, err := pgxpool.ParseConfig(srv.URL)
		if err != nil {
			return err
		}
		cfg.MaxConns = 2
		pool, err := pgxpool.NewWithConfig(ctx, cfg)
		if err != nil {
			return err
		}
		defer pool.Close()
		locker, err := pglock.NewLocker(pool)
		if err != nil {
			return err
		}
		defer locker.Close() // before the pool (defers run last first)

		gl, err := gocronlock.NewLocker(locker,
			// Keep the lock for 500 ms after the start, so that a replica
			// whose clock or scheduler is a little late skips this tick.
			gocronlock.WithMinHold(500*time.Millisecond),
			gocronlock.WithLogger(slog.New(handler).With("replica", name)),
		)
		if err != nil {
			return err
		}
		s, err := gocron.NewScheduler(gocron.WithDistributedLocker(gl))
		if err != nil {
			return err
		}
		defer func() { _ = s.Shutdown() }()
		_, err = s.NewJob(
			gocron.CronJob("* * * * * *", true), // every second, on the second
			gocron.NewTask(func() {
				now := time.Now()
				fmt.Printf("%s  %s ran the tick\n", now.Format("15:04:05.000"), name)
				mu.Lock()
				tick := now.Truncate(time.Second)
				ticks[tick] = append(ticks[tick], name)
				if len(ticks) == 3 && len(ticks[tick]) == 1 {
					close(third)
				}
				mu.Unlock()
				time.Sleep(100 * time.Millisecond) // the work
			}),
			gocron.WithName("report"), // the lock's key: gocron:report
			gocron.WithEventListeners(gocron.AfterLockError(func(_ uuid.UUID, _ string, err error) {
				mu.Lock()
				defer mu.Unlock()
				if errors.Is(err, gocronlock.ErrBusy) {
					busy++ // another replica runs this tick
				} else {
					other = append(other, err) // the database is down
				}
			})),
		)
		if err != nil {
			return err
		}
		schedulers[i] = s
	}

	for _, s := range schedulers {
		s.Start()
	}
	select {
	case <-third:
		// Let the other replicas try the third tick too.
		time.Sleep(300 * time.Millisecond)
	case <-time.After(5 * time.Second):
	case <-ctx.Done():
	}
	var wg sync.WaitGroup
	for _, s := range schedulers {
		wg.Go(func() { _ = s.Shutdown() }) // waits for a running job
	}
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	keys := make([]time.Time, 0, len(ticks))
	twice := 0
	for k, rs := range ticks {
		keys = append(keys, k)
		if len(rs) > 1 {
			twice++
		}
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i].Before(keys[j]) })
	fmt.Printf("%d ticks on %d schedulers; skipped as held elsewhere (ErrBusy): %d; lock errors: %d\n",
		len(keys), replicas, busy, len(other))
	if twice > 0 || len(other) > 0 {
		return fmt.Errorf("%d tick(s) ran more than once; lock errors: %v", twice, other)
	}
	fmt.Println("each tick ran on exactly one scheduler")
	return nil
}
