package pgtest

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock"
)

// Holder is one row of pg_locks for an advisory key.
type Holder struct {
	PID     int32
	Mode    string // "ExclusiveLock" or "ShareLock"
	Granted bool
}

// Holders returns the sessions that hold or wait for key in the current
// database, read from pg_locks through db (use a connection other than the
// ones under test).
func Holders(ctx context.Context, db *pgxpool.Pool, key pglock.Key) ([]Holder, error) {
	classid, objid, objsubid := key.LockTag()
	rows, err := db.Query(ctx, `
		SELECT pid, mode, granted FROM pg_catalog.pg_locks
		WHERE locktype = 'advisory'
		  AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
		  AND classid = $1::oid AND objid = $2::oid AND objsubid = $3::smallint
		ORDER BY granted DESC, pid`, int64(classid), int64(objid), objsubid)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Holder, error) {
		var h Holder
		err := r.Scan(&h.PID, &h.Mode, &h.Granted)
		return h, err
	})
}

// Granted returns the holders of key that hold it (not those waiting).
func Granted(tb testing.TB, db *pgxpool.Pool, key pglock.Key) []Holder {
	tb.Helper()
	hs, err := Holders(context.Background(), db, key)
	if err != nil {
		tb.Fatalf("pgtest: read pg_locks: %v", err)
	}
	var out []Holder
	for _, h := range hs {
		if h.Granted {
			out = append(out, h)
		}
	}
	return out
}

// WaitFree waits (up to 5 s) until no session holds or waits for key, and
// fails the test if one still does. A server-side backend that lost its
// client can take a moment to exit, hence the wait.
func WaitFree(tb testing.TB, db *pgxpool.Pool, key pglock.Key) {
	tb.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		hs, err := Holders(context.Background(), db, key)
		if err != nil {
			tb.Fatalf("pgtest: read pg_locks: %v", err)
		}
		if len(hs) == 0 {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("pgtest: key %s still in pg_locks: %+v", key, hs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Pool returns a new pool on the test server, closed when the test ends.
// maxConns 0 keeps pgxpool's default.
func Pool(tb testing.TB, maxConns int32) *pgxpool.Pool {
	tb.Helper()
	return PoolWith(tb, URL(tb), maxConns, nil)
}

// PoolWith returns a new pool on url with maxConns connections (0 keeps
// pgxpool's default) and edit (when not nil) applied to its configuration,
// closed when the test ends.
func PoolWith(tb testing.TB, url string, maxConns int32, edit func(*pgxpool.Config)) *pgxpool.Pool {
	tb.Helper()
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		tb.Fatal(err)
	}
	if maxConns > 0 {
		cfg.MaxConns = maxConns
	}
	if edit != nil {
		edit(cfg)
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(pool.Close)
	return pool
}

// NameSessions names the sessions of a pool made from cfg: its own
// connections app+"/pool" (by BeforeConnect), and those that a Locker on it
// opens for itself app (they are made from cfg's connection settings,
// without the pool's BeforeConnect), so that pg_stat_activity tells a
// Locker's lock and waiting connections from its pool's.
func NameSessions(cfg *pgxpool.Config, app string) {
	cfg.ConnConfig.RuntimeParams["application_name"] = app
	cfg.BeforeConnect = func(_ context.Context, cc *pgx.ConnConfig) error {
		cc.RuntimeParams["application_name"] = app + "/pool"
		return nil
	}
}

// Terminate ends the backend pid with pg_terminate_backend and waits until
// it is gone.
func Terminate(tb testing.TB, db *pgxpool.Pool, pid int32) {
	tb.Helper()
	ctx := context.Background()
	var ok bool
	if err := db.QueryRow(ctx, "SELECT pg_terminate_backend($1, 5000)", pid).Scan(&ok); err != nil {
		tb.Fatalf("pgtest: pg_terminate_backend(%d): %v", pid, err)
	}
	if !ok {
		tb.Fatalf("pgtest: pg_terminate_backend(%d) returned false", pid)
	}
}

// UnreachablePool returns a pool whose server cannot be reached (a loopback
// port where nothing listens; it dials lazily, so making it succeeds), closed
// when the test ends: the database errors of a Locker on it are what a
// server that is down gives. Closing a pool would not do: a multiplexing
// Locker dials lock connections of its own with the pool's settings.
func UnreachablePool(tb testing.TB) *pgxpool.Pool {
	tb.Helper()
	pool, err := pgxpool.New(context.Background(), "postgres://postgres@127.0.0.1:1/none?sslmode=disable&connect_timeout=5")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(pool.Close)
	return pool
}
