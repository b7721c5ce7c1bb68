package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// These tests run a real PgBouncer (Debian's pgbouncer package) in front of
// the test server: pgtest.StartPgBouncerT skips them when it is not
// installed, and fails them under CI.

// bouncerPool returns a pool through b with the given exec mode ("" keeps
// pgx's default), closed when the test ends.
func bouncerPool(t *testing.T, b *pgtest.PgBouncer, execMode string, maxConns int32) *pgxpool.Pool {
	t.Helper()
	u := b.URL
	if execMode != "" {
		u += "&default_query_exec_mode=" + execMode
	}
	cfg, err := pgxpool.ParseConfig(u)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = maxConns
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// The scenario: through PgBouncer in transaction pooling mode, two
// clients' Session-scope TryAcquire of one key both got true (both statements
// reached one server session, which stacked the lock). Now every try, of
// fresh connections each time, is refused with ErrTransactionPooler, none is
// told it holds, and nothing stays locked. The same for a Locker (whose lock
// connections are checked as they open), for *sql.DB with pgx's driver, and
// for pgx's default exec mode.
func TestPgBouncerTransactionModeRefusesSessionLocks(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"transaction", "statement"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			b := pgtest.StartPgBouncerT(t, mode, 2)
			watch := pgtest.Pool(t, 2)
			ctx := context.Background()
			key := pgtest.UniqueKey(t)
			const tries = 100
			held := 0
			for i := range tries {
				for _, who := range []string{"A", "B"} {
					conn, err := pgx.Connect(ctx, b.URL+"&default_query_exec_mode=simple_protocol")
					if err != nil {
						t.Fatal(err)
					}
					l, err := pglock.NewLock(conn, key)
					if err != nil {
						t.Fatal(err)
					}
					ok, err := l.TryAcquire(ctx)
					if ok {
						held++
						_ = l.Release(ctx)
					}
					if !errors.Is(err, pglock.ErrTransactionPooler) || !errors.Is(err, pglock.ErrNotAcquired) {
						t.Fatalf("try %d, client %s: TryAcquire = %v, %v; want ErrTransactionPooler and ErrNotAcquired", i, who, ok, err)
					}
					if i == 0 && who == "A" {
						t.Logf("first refusal: %v", err)
					}
					_ = conn.Close(ctx)
				}
			}
			if held != 0 {
				t.Fatalf("%d of %d Session-scope tries through %s pooling reported the lock held", held, 2*tries, mode)
			}

			// A pool in pgx's default exec mode, NewLock and a Locker; a *sql.DB.
			pool := bouncerPool(t, b, "", 4)
			l, _ := pglock.NewLock(pool, key)
			if ok, err := l.TryAcquire(ctx); ok || !errors.Is(err, pglock.ErrTransactionPooler) {
				t.Errorf("NewLock on a pool in the default exec mode: TryAcquire = %v, %v; want ErrTransactionPooler", ok, err)
			}
			lk, err := pglock.NewLocker(bouncerPool(t, b, "simple_protocol", 4))
			if err != nil {
				t.Fatal(err)
			}
			defer lk.Close()
			for range 3 {
				ran, err := lk.TryDo(ctx, key, func(context.Context) error { return nil })
				if ran || !errors.Is(err, pglock.ErrTransactionPooler) {
					t.Errorf("Locker.TryDo = %v, %v; want ErrTransactionPooler", ran, err)
				}
			}
			wctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			err = lk.Do(wctx, key, func(context.Context) error { return nil })
			cancel()
			if !errors.Is(err, pglock.ErrTransactionPooler) {
				t.Errorf("Locker.Do = %v; want ErrTransactionPooler", err)
			}
			db, err := sql.Open("pgx", b.URL+"&default_query_exec_mode=simple_protocol")
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			ls, _ := pglock.NewLock(db, key)
			if ok, err := ls.TryAcquire(ctx); ok || !errors.Is(err, pglock.ErrTransactionPooler) {
				t.Errorf("NewLock on a *sql.DB: TryAcquire = %v, %v; want ErrTransactionPooler", ok, err)
			}
			pgtest.WaitFree(t, watch, l.Key())
		})
	}
}

// Transaction scope works through a transaction pooler: the lock lives in
// one transaction, which the pooler keeps on one server session. It excludes
// across clients and leaves nothing behind, with the exec modes PgBouncer
// 1.18 supports (it has no protocol-level prepared statements; 1.21 and later
// do, with max_prepared_statements set).
func TestPgBouncerTransactionModeTransactionScope(t *testing.T) {
	t.Parallel()
	b := pgtest.StartPgBouncerT(t, "transaction", 3)
	watch := pgtest.Pool(t, 2)
	ctx := context.Background()
	for _, execMode := range []string{"simple_protocol", "exec"} {
		t.Run(execMode, func(t *testing.T) {
			key := pgtest.UniqueKey(t)
			lkA, err := pglock.NewLocker(bouncerPool(t, b, execMode, 4), pglock.WithScope(pglock.Transaction))
			if err != nil {
				t.Fatal(err)
			}
			lkB, err := pglock.NewLocker(bouncerPool(t, b, execMode, 4), pglock.WithScope(pglock.Transaction))
			if err != nil {
				t.Fatal(err)
			}
			err = lkA.Do(ctx, key, func(ctx context.Context) error {
				if len(pgtest.Granted(t, watch, mustKey(t, key))) != 1 {
					t.Error("the lock is not in pg_locks while Do runs")
				}
				ran, err := lkB.TryDo(ctx, key, func(context.Context) error { return nil })
				if ran || err != nil {
					t.Errorf("the other client's TryDo while held = %v, %v; want false, nil", ran, err)
				}
				tx, _ := pglock.TxFromContext(ctx)
				_, err = tx.Exec(ctx, "SELECT 1")
				return err
			})
			if err != nil {
				t.Fatalf("Do through the pooler: %v", err)
			}
			// Several goroutines of two clients take turns: a counter is exact.
			var wg sync.WaitGroup
			counter := 0
			for i := range 8 {
				lk := lkA
				if i%2 == 1 {
					lk = lkB
				}
				wg.Go(func() {
					for range 10 {
						if err := lk.Do(ctx, key, func(context.Context) error {
							v := counter
							time.Sleep(time.Millisecond)
							counter = v + 1
							return nil
						}); err != nil {
							t.Errorf("Do: %v", err)
							return
						}
					}
				})
			}
			wg.Wait()
			if counter != 80 {
				t.Errorf("counter = %d after 80 serialized increments", counter)
			}
			pgtest.WaitFree(t, watch, mustKey(t, key))
		})
	}
}

// Session pooling keeps a client on one server session: Session scope works
// through it (NewLock on a pool, and a Locker's lock connections), excludes
// across clients and across the pooler, and leaves nothing behind. A
// session pooler whose server sessions are all taken delays a connection's
// first lock by the probe's bound (1 s) at most.
func TestPgBouncerSessionMode(t *testing.T) {
	t.Parallel()
	b := pgtest.StartPgBouncerT(t, "session", 6)
	watch := pgtest.Pool(t, 2)
	direct := pgtest.Pool(t, 2)
	ctx := context.Background()
	key := pgtest.UniqueKey(t)

	a, _ := pglock.NewLock(bouncerPool(t, b, "", 2), key)
	c, _ := pglock.NewLock(direct, key)
	lk, err := pglock.NewLocker(bouncerPool(t, b, "", 2))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	if ok, err := a.TryAcquire(ctx); !ok || err != nil {
		t.Fatalf("TryAcquire through session pooling = %v, %v; want true", ok, err)
	}
	if ok, err := c.TryAcquire(ctx); ok || err != nil {
		t.Fatalf("a direct TryAcquire while held through the pooler = %v, %v; want false", ok, err)
	}
	if ran, err := lk.TryDo(ctx, key, func(context.Context) error { return nil }); ran || err != nil {
		t.Fatalf("a Locker's TryDo while held = %v, %v; want false", ran, err)
	}
	if err := a.Release(ctx); err != nil {
		t.Fatal(err)
	}
	err = lk.Do(ctx, key, func(context.Context) error {
		if ok, err := c.TryAcquire(ctx); ok || err != nil {
			t.Errorf("a direct TryAcquire while the Locker holds = %v, %v; want false", ok, err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Locker.Do through session pooling: %v", err)
	}
	pgtest.WaitFree(t, watch, a.Key())

	// Full: one server session, taken by this connection; the probe cannot
	// get one and gives up.
	full := pgtest.StartPgBouncerT(t, "session", 1)
	conn, err := pgx.Connect(ctx, full.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	lf, _ := pglock.NewLock(conn, pgtest.UniqueKey(t))
	start := time.Now()
	ok, err := lf.TryAcquire(ctx)
	took := time.Since(start)
	t.Logf("first lock through a full session pooler took %v", took.Round(time.Millisecond))
	if !ok || err != nil {
		t.Fatalf("TryAcquire through a full session pooler = %v, %v; want true", ok, err)
	}
	if took > 3*time.Second {
		t.Errorf("first lock through a full session pooler took %v, want about 1 s at most", took)
	}
	if err := lf.Release(ctx); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, lf.Key())
}

// Issue 20, item 2: statement pooling allows no transaction block, so
// Transaction scope cannot work through it: it is refused with
// ErrTransactionPooler (a configuration error), never ErrUnavailable, which
// says "down, retry later".
func TestPgBouncerStatementModeRefusesTransactionScope(t *testing.T) {
	t.Parallel()
	b := pgtest.StartPgBouncerT(t, "statement", 2)
	watch := pgtest.Pool(t, 2)
	ctx := context.Background()
	for _, execMode := range []string{"simple_protocol", "exec"} {
		t.Run(execMode, func(t *testing.T) {
			key := pgtest.UniqueKey(t)
			lk, err := pglock.NewLocker(bouncerPool(t, b, execMode, 2), pglock.WithScope(pglock.Transaction))
			if err != nil {
				t.Fatal(err)
			}
			ran := false
			err = lk.Do(ctx, key, func(context.Context) error { ran = true; return nil })
			if ran || !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, pglock.ErrTransactionPooler) || errors.Is(err, pglock.ErrUnavailable) {
				t.Errorf("Transaction-scope Do through statement pooling: ran %v, err %v; want ErrNotAcquired and ErrTransactionPooler, not ErrUnavailable", ran, err)
			}
			if err != nil && !strings.Contains(err.Error(), "statement pooling") {
				t.Errorf("the error does not say what is wrong: %v", err)
			}
			pgtest.WaitFree(t, watch, mustKey(t, key))
		})
	}
}
