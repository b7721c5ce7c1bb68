// Command cron runs three robfig/cron schedulers in one process, as three
// replicas of a service would run: each has its own pool and
// *pglock.Locker, and all schedule the same "@every 1s" job through
// cronlock. At each tick one replica runs the job and the other two skip
// it ("held elsewhere"). It stops by itself after about four seconds.
//
//	go run ./examples/cron
//
// The database is DATABASE_URL, else a server at 127.0.0.1:5432, else a
// throwaway cluster started from the machine's PostgreSQL binaries.
package main

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/robfig/cron/v3"

	"github.com/pglockkit/kit/cronlock"
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

	crons := make([]*cron.Cron, replicas)
	for i := range crons {
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

		report, err := cronlock.Func(locker, "report", func(ctx context.Context) error {
			fmt.Printf("%s  %s ran the tick\n", time.Now().Format("15:04:05.000"), name)
			time.Sleep(100 * time.Millisecond) // the work
			return nil
		},
			// Keep the lock for 500 ms after the start, so that a replica
			// whose clock or scheduler is a little late skips this tick.
			cronlock.WithMinHold(500*time.Millisecond),
			cronlock.WithSlog(slog.New(handler).With("replica", name)),
			// Ctrl-C cancels a running job and ends a MinHold wait.
			cronlock.WithBaseContext(ctx),
		)
		if err != nil {
			return err
		}
		crons[i] = cron.New(cron.WithChain(cron.Recover(cron.DefaultLogger)))
		if _, err := crons[i].AddJob("@every 1s", report); err != nil {
			return err
		}
	}

	for _, c := range crons {
		c.Start()
	}
	select {
	case <-time.After(4200 * time.Millisecond):
	case <-ctx.Done():
	}
	var wg sync.WaitGroup
	for _, c := range crons {
		wg.Go(func() { <-c.Stop().Done() })
	}
	wg.Wait()
	return nil
}
