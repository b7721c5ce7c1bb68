package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// review3Settings is what a pool connection's session looks like, read on
// the connection itself.
type review3Settings struct {
	pid      int32
	idle     string
	idleInTx string
	// stash is pglock.idle_session_timeout (NULL: never set on this
	// session). A hold leaves it empty: a custom setting, once set, cannot
	// be removed from a session, and empty means "nothing kept".
	stash      sql.NullString
	advisories int
}

const review3SettingsSQL = `SELECT pg_backend_pid(), current_setting('idle_session_timeout'),
	current_setting('idle_in_transaction_session_timeout'),
	current_setting('pglock.idle_session_timeout', true),
	(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())`

func review3Read(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) (review3Settings, error) {
	var s review3Settings
	var stash *string
	err := q.QueryRow(ctx, review3SettingsSQL).Scan(&s.pid, &s.idle, &s.idleInTx, &stash, &s.advisories)
	if stash != nil {
		s.stash = sql.NullString{String: *stash, Valid: true}
	}
	return s, err
}

// review3Blocker holds key on a session of its own until release is called.
func review3Blocker(t *testing.T, watch *pgxpool.Pool, key pglock.Key) (release func()) {
	t.Helper()
	ctx := context.Background()
	c, err := watch.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	l, err := pglock.NewLock(c.Conn(), key)
	if err != nil {
		c.Release()
		t.Fatal(err)
	}
	if err := l.Acquire(ctx); err != nil {
		c.Release()
		t.Fatal(err)
	}
	return func() {
		if err := l.Release(ctx); err != nil {
			t.Error(err)
		}
		c.Release()
	}
}

// Invariant: a pool connection returned to the pool carries no lock and no
// changed session setting. A pool with one connection (so every hold runs on
// it) whose sessions start with idle_session_timeout = 37s (the pool's own
// RuntimeParams) goes through Session and Transaction holds, busy tries,
// cancelled waits and a failed Do; after each, the connection's session is
// read with SHOW-style current_setting on the pool itself.
func TestPoolConnBackFromHoldUnchanged(t *testing.T) {
	ctx := context.Background()
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 1
	cfg.ConnConfig.RuntimeParams["idle_session_timeout"] = "37s"
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	watch := pgtest.Pool(t, 2)

	before, err := review3Read(ctx, pool)
	if err != nil {
		t.Fatal(err)
	}
	check := func(step string) {
		t.Helper()
		after, err := review3Read(ctx, pool)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		if after.pid != before.pid {
			// A destroyed connection is allowed; compare the new one with a
			// fresh session's values.
			before.pid = after.pid
		}
		if after.idle != before.idle || after.idleInTx != before.idleInTx || after.advisories != 0 || after.stash.String != before.stash.String {
			t.Fatalf("invariant (a pool connection goes back to the pool as it came) broken after %s: before %+v, after %+v", step, before, after)
		}
	}

	keyS := pgtest.UniqueKey(t)
	for i := range 3 {
		// Session scope: a hold, released.
		l, err := pglock.NewLock(pool, keyS)
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
		check(fmt.Sprintf("session hold %d", i))
		// A busy try and a cancelled wait.
		release := review3Blocker(t, watch, l.Key())
		if ok, err := l.TryAcquire(ctx); ok || err != nil {
			t.Fatalf("busy try: %v %v", ok, err)
		}
		check("busy session try")
		wctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		err = l.Acquire(wctx)
		cancel()
		if !errors.Is(err, pglock.ErrNotAcquired) {
			t.Fatalf("cancelled wait: %v", err)
		}
		check("cancelled session wait")
		release()
		// A Do whose function fails.
		_ = l.Do(ctx, func(context.Context) error { return errors.New("boom") })
		check("failed session Do")

		// Transaction scope.
		lt, err := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction))
		if err != nil {
			t.Fatal(err)
		}
		if err := lt.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		if err := lt.Release(ctx); err != nil {
			t.Fatal(err)
		}
		check("transaction hold")
	}
}

// The same on a *sql.DB with pgx's driver.
func TestSQLDBConnBackFromHoldUnchanged(t *testing.T) {
	ctx := context.Background()
	cfg, err := pgx.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	db := stdlib.OpenDB(*cfg)
	db.SetMaxOpenConns(1)
	defer db.Close()
	read := func() (review3Settings, error) {
		var s review3Settings
		err := db.QueryRowContext(ctx, review3SettingsSQL).Scan(&s.pid, &s.idle, &s.idleInTx, &s.stash, &s.advisories)
		return s, err
	}
	before, err := read()
	if err != nil {
		t.Fatal(err)
	}
	l, err := pglock.NewLock(db, pgtest.UniqueKey(t))
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
	}
	after, err := read()
	if err != nil {
		t.Fatal(err)
	}
	if after.pid == before.pid && (after.idle != before.idle || after.stash.String != before.stash.String || after.advisories != 0) {
		t.Errorf("invariant (a pool connection goes back to the pool as it came) broken: before %+v, after %+v", before, after)
	}
}

// Invariant: never two holders of an exclusive key, through a transaction
// pooler too (issue 20, item 1: "a session lock is granted to the caller only
// when the library has positive proof that the server session holding it
// stays with this client connection"). TestPgBouncerNeverTwoHolders tries
// Lockers only (whose lock connections carry the proof); here the same
// trials run through the paths that take a session lock on a pool
// connection of their own: NewLock on a pool, and a Locker WithMultiplexing(false).
func TestPgBouncerNeverTwoHoldersOnPoolPaths(t *testing.T) {
	resetAlways := map[string]string{"server_reset_query_always": "1"}
	t.Run("New on a pool", func(t *testing.T) {
		b := pgtest.StartPgBouncerWithT(t, "transaction", 2, resetAlways)
		poolerGuardTrials(t, b, 32, 4, 200, 12*time.Second, false, func(pool *pgxpool.Pool, name string) (*pglock.Lock, *pglock.Locker, error) {
			l, err := pglock.NewLock(pool, name)
			return l, nil, err
		})
	})
	t.Run("WithMultiplexing(false)", func(t *testing.T) {
		b := pgtest.StartPgBouncerWithT(t, "transaction", 2, resetAlways)
		poolerGuardTrials(t, b, 32, 4, 200, 12*time.Second, false, func(pool *pgxpool.Pool, name string) (*pglock.Lock, *pglock.Locker, error) {
			lk, err := pglock.NewLocker(pool, pglock.WithMultiplexing(false))
			if err != nil {
				return nil, nil, err
			}
			l, err := lk.NewLock(name)
			return l, lk, err
		})
	})
}
