package main

import (
	"context"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// applicationName is the application_name of pglock's connections, unless
// the URL or PGAPPNAME names another.
const applicationName = "pglock"

// defaultConnectTimeout bounds a connection attempt when neither the URL
// (connect_timeout) nor PGCONNECT_TIMEOUT does, so that an unreachable
// server is an error rather than a hang.
const defaultConnectTimeout = 10 * time.Second

// poolConfig returns the connection settings: url (--database-url) when
// set, else $DATABASE_URL, else libpq's PG* environment variables, parsed
// as pgx parses them. The error says which of the three was wrong.
func poolConfig(url string) (*pgxpool.Config, error) {
	source := "--database-url"
	if url == "" {
		source = "DATABASE_URL"
		url = os.Getenv("DATABASE_URL")
		if url == "" {
			source = "PG* environment"
		}
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", source, err) // pgx redacts passwords
	}
	if _, ok := cfg.ConnConfig.RuntimeParams["application_name"]; !ok {
		cfg.ConnConfig.RuntimeParams["application_name"] = applicationName
	}
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = defaultConnectTimeout
	}
	// One connection: the lock pins it ("pglock locks" uses it for one query).
	cfg.MaxConns = 1
	cfg.MinConns = 0
	return cfg, nil
}

// connect opens a one-connection pool and checks that the server answers.
func connect(ctx context.Context, url string) (*pgxpool.Pool, error) {
	cfg, err := poolConfig(url)
	if err != nil {
		return nil, err
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("cannot connect to the database: %w", err)
	}
	return pool, nil
}

// interruptible returns a context that ends when one of c.signals arrives
// or ctx ends (which counts as SIGTERM), and stop, which stops listening
// and reports the signal that ended the context, if any; stop may be called
// more than once. Signals that arrive after stop stay in the channel for
// the next listener.
func (c *cli) interruptible(ctx context.Context) (context.Context, func() os.Signal) {
	ictx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	quit := make(chan struct{})
	var (
		wg  sync.WaitGroup
		got os.Signal
	)
	wg.Go(func() {
		select {
		case s := <-c.signals:
			got = s
		case <-ctx.Done():
			got = syscall.SIGTERM
		case <-quit:
			return
		}
		cancel()
	})
	var once sync.Once
	return ictx, func() os.Signal {
		once.Do(func() {
			close(quit)
			wg.Wait()
			cancel()
		})
		return got
	}
}

// signalStatus is the exit status that reports signal s: 128 + its number.
func signalStatus(s os.Signal) int {
	if n, ok := s.(syscall.Signal); ok {
		return exitSignal + int(n)
	}
	return exitSignal + int(syscall.SIGTERM)
}
