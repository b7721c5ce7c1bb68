package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// throwaway starts a cluster of the test's own, stopped when the test ends.
func throwaway(t *testing.T) *pgtest.Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, err := pgtest.StartThrowaway(ctx)
	if errors.Is(err, pgtest.ErrNoPostgres) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// warm opens n connections of pool and leaves them idle in it.
func warm(t *testing.T, pool *pgxpool.Pool, n int) {
	t.Helper()
	ctx := context.Background()
	conns := make([]*pgxpool.Conn, n)
	for i := range conns {
		c, err := pool.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	for _, c := range conns {
		c.Release()
	}
	if got := pool.Stat().IdleConns(); got != int32(n) {
		t.Fatalf("%d idle connections in the pool, want %d", got, n)
	}
}

// After `pg_ctl restart -m fast` every idle pool connection is dead (the
// server ended its session with 57P01). Each of them used to fail one
// TryAcquire with ErrNotAcquired, which a caller takes for "busy". Now the
// first acquires after the restart succeed: a connection found dead before
// the lock's statement ran is replaced once. Covered: NewLock on a pgx pool
// (TryAcquire and Acquire), on a *sql.DB with pgx's driver, and a
// multiplexing Locker. While the server is down, the error says
// ErrUnavailable (and ErrNotAcquired), which tells "down" from "busy".
func TestRestartIsNotBusy(t *testing.T) {
	t.Parallel()
	s := throwaway(t)
	ctx := context.Background()
	cfg, err := pgxpool.ParseConfig(s.URL)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 3
	cfg.MinConns = 0
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	db, err := sql.Open("pgx", s.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.SetMaxIdleConns(3)
	lk, err := pglock.NewLocker(pool)
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()

	keys := []string{"restart-a", "restart-b", "restart-c"}
	run := func(round string) {
		t.Helper()
		warm(t, pool, 3)
		for _, k := range keys { // three idle sql connections too
			l, _ := pglock.NewLock(db, k)
			if err := l.Acquire(ctx); err != nil {
				t.Fatalf("%s: warm the *sql.DB: %v", round, err)
			}
			defer l.Release(ctx)
		}
		if err := lk.Do(ctx, "restart-locker", func(context.Context) error { return nil }); err != nil {
			t.Fatalf("%s: warm the Locker: %v", round, err)
		}
	}
	run("before")
	// Release the *sql.DB holds (run's defers ran): their connections idle.

	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := s.Restart(rctx); err != nil {
		t.Fatal(err)
	}
	for i, k := range keys {
		l, _ := pglock.NewLock(pool, k)
		ok, err := l.TryAcquire(ctx)
		if !ok || err != nil {
			t.Errorf("pool TryAcquire %d after the restart = %v, %v; want true, nil", i, ok, err)
			continue
		}
		if err := l.Release(ctx); err != nil {
			t.Error(err)
		}
	}
	for i, k := range keys {
		l, _ := pglock.NewLock(db, k)
		ok, err := l.TryAcquire(ctx)
		if !ok || err != nil {
			t.Errorf("*sql.DB TryAcquire %d after the restart = %v, %v; want true, nil", i, ok, err)
			continue
		}
		if err := l.Release(ctx); err != nil {
			t.Error(err)
		}
	}
	if ran, err := lk.TryDo(ctx, "restart-locker", func(context.Context) error { return nil }); !ran || err != nil {
		t.Errorf("Locker TryDo after the restart = %v, %v; want true, nil", ran, err)
	}

	// Again with blocking acquires.
	run("second")
	if err := s.Restart(rctx); err != nil {
		t.Fatal(err)
	}
	for i, k := range keys {
		l, _ := pglock.NewLock(pool, k)
		if err := l.Acquire(ctx); err != nil {
			t.Errorf("pool Acquire %d after the restart: %v", i, err)
			continue
		}
		if err := l.Release(ctx); err != nil {
			t.Error(err)
		}
	}

	// Down: not busy, unavailable.
	if err := s.StopServer(rctx); err != nil {
		t.Fatal(err)
	}
	for name, conn := range map[string]any{"pool": pool, "sql.DB": db} {
		l, _ := pglock.NewLock(conn, "restart-down")
		ok, err := l.TryAcquire(ctx)
		if ok || !errors.Is(err, pglock.ErrUnavailable) || !errors.Is(err, pglock.ErrNotAcquired) {
			t.Errorf("%s TryAcquire while the server is down = %v, %v; want ErrUnavailable and ErrNotAcquired", name, ok, err)
		}
	}
	ran, err := lk.TryDo(ctx, "restart-down", func(context.Context) error { return nil })
	if ran || !errors.Is(err, pglock.ErrUnavailable) || !errors.Is(err, pglock.ErrNotAcquired) {
		t.Errorf("Locker TryDo while the server is down = %v, %v; want ErrUnavailable and ErrNotAcquired", ran, err)
	}
	t.Logf("while down: %v", err)
	if err := s.Start(rctx); err != nil {
		t.Fatal(err)
	}
	if ran, err := lk.TryDo(ctx, "restart-down", func(context.Context) error { return nil }); !ran || err != nil {
		t.Errorf("Locker TryDo after the server came back = %v, %v; want true, nil", ran, err)
	}
}

// A busy key is not "unavailable", and a server that cannot be reached is.
func TestUnavailableIsNotBusy(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	key := pgtest.UniqueKey(t)
	holder, _ := pglock.NewLock(pool, key)
	if err := holder.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	defer holder.Release(ctx)
	busy, _ := pglock.NewLock(pool, key, pglock.WithWait(50*time.Millisecond))
	if err := busy.Acquire(ctx); !errors.Is(err, pglock.ErrNotAcquired) || errors.Is(err, pglock.ErrUnavailable) {
		t.Errorf("a wait that timed out on a busy key = %v, want ErrNotAcquired and not ErrUnavailable", err)
	}
	down, _ := pglock.NewLock(pgtest.UnreachablePool(t), key)
	if ok, err := down.TryAcquire(ctx); ok || !errors.Is(err, pglock.ErrUnavailable) {
		t.Errorf("TryAcquire on an unreachable server = %v, %v; want ErrUnavailable", ok, err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := down.Acquire(cctx); errors.Is(err, pglock.ErrUnavailable) || !errors.Is(err, context.Canceled) {
		t.Errorf("Acquire with a cancelled context = %v, want context.Canceled, not ErrUnavailable", err)
	}
}
