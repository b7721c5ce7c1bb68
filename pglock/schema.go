package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The pglock schema.
//
// Plain locks need nothing in the database. Two features keep state there,
// in a schema named pglock that the library owns and migrates:
//
//   - fencing tokens ([WithToken]): pglock.fence, the last token granted per
//     key, and pglock.fence_token, the sequence they are drawn from;
//   - exactly-once ticks ([ClaimTick]; cronlock and gocronlock use it):
//     pglock.tick, the (job, scheduled time) pairs that ran.
//
// [Migrate] (or `pglock migrate`) creates or upgrades it. Migrations are
// versioned (pglock.migration records each applied version), idempotent, and
// safe to run from many replicas at once: they run in one transaction under
// an advisory lock, so one replica applies them and the others find them
// applied.

// SchemaVersion is the version of the pglock schema this package needs: the
// last migration [Migrate] applies.
const SchemaVersion = 2

// migrations are the schema's versions, in order; migration i+1 is
// migrations[i]. Never change one that was released: add one.
var migrations = []struct {
	name string
	sql  string
}{
	{"fencing tokens and exactly-once ticks", `
CREATE TABLE pglock.fence (
	key_space smallint NOT NULL CHECK (key_space IN (1, 2)), -- pg_locks.objsubid: 1 bigint key, 2 (integer, integer) key
	key bigint NOT NULL,
	token bigint NOT NULL,
	granted_at timestamptz NOT NULL DEFAULT clock_timestamp(),
	PRIMARY KEY (key_space, key)
);
COMMENT ON TABLE pglock.fence IS 'pglock: the last fencing token granted for each advisory lock key';
CREATE TABLE pglock.tick (
	job text NOT NULL,
	tick timestamptz NOT NULL,
	ran_at timestamptz NOT NULL DEFAULT clock_timestamp(),
	PRIMARY KEY (job, tick)
);
COMMENT ON TABLE pglock.tick IS 'pglock: the scheduled runs (job, scheduled time) that ran, for exactly-once ticks';
`},
	{"fencing tokens from a sequence", `
CREATE SEQUENCE pglock.fence_token AS bigint CACHE 1;
COMMENT ON SEQUENCE pglock.fence_token IS 'pglock: fencing tokens; a sequence, so that a grant rolled back never gives its number to the next';
SELECT setval('pglock.fence_token', coalesce(max(token), 1), max(token) IS NOT NULL) FROM pglock.fence;
`},
}

// migrateKey is the advisory lock that serializes migrations.
var migrateKey = hashKey([]byte("pglock:migrate"))

// ErrSchema means the pglock schema, or a part of it this package needs, is
// missing (the database says a relation of it does not exist): run
// [Migrate] (or `pglock migrate`). Features that keep state in the
// database (fencing tokens, exactly-once ticks) fail with it.
var ErrSchema = errors.New("pglock: the pglock schema is missing or out of date (run pglock migrate, or pglock.Migrate)")

// MigrateResult says what [Migrate] did.
type MigrateResult struct {
	// From is the version the schema was at (0: there was none); To the
	// version it is at now (SchemaVersion).
	From, To int
	// Applied lists the names of the migrations applied, in order.
	Applied []string
}

// Migrate creates the pglock schema, or upgrades it to [SchemaVersion], on
// db: a *pgxpool.Pool, *pgx.Conn or *sql.DB (any driver). It runs in one
// transaction under an advisory lock: concurrent Migrates from many replicas
// apply each migration once, and a failed one changes nothing. A schema newer
// than this package is left alone (From > To is not an error: a newer
// release migrated it). It needs the rights to create a schema in the
// database; the schema belongs to the role that ran it, and the roles that
// use fencing or ticks need USAGE on schema pglock, SELECT, INSERT, UPDATE
// and DELETE on its tables, and USAGE on the sequence pglock.fence_token.
func Migrate(ctx context.Context, db any) (MigrateResult, error) {
	var run func(func(tx sqlTx) error) error
	beginFunc := func(db interface {
		Begin(context.Context) (pgx.Tx, error)
	}) {
		run = func(f func(sqlTx) error) error {
			return pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error { return f(pgxTxRunner{tx}) })
		}
	}
	switch c := db.(type) {
	case *pgxpool.Pool:
		if c == nil {
			return MigrateResult{}, fmt.Errorf("%w: nil *pgxpool.Pool", ErrUnsupportedConn)
		}
		beginFunc(c)
	case *pgx.Conn:
		if c == nil {
			return MigrateResult{}, fmt.Errorf("%w: nil *pgx.Conn", ErrUnsupportedConn)
		}
		beginFunc(c)
	case *sql.DB:
		if c == nil {
			return MigrateResult{}, fmt.Errorf("%w: nil *sql.DB", ErrUnsupportedConn)
		}
		run = func(f func(sqlTx) error) error {
			tx, err := c.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			if err := f(stdTxRunner{tx}); err != nil {
				_ = tx.Rollback()
				return err
			}
			return tx.Commit()
		}
	default:
		return MigrateResult{}, fmt.Errorf("%w: %T (Migrate takes a *pgxpool.Pool, *pgx.Conn or *sql.DB)", ErrUnsupportedConn, db)
	}
	var res MigrateResult
	err := run(func(tx sqlTx) error {
		res = MigrateResult{}
		if _, err := tx.exec(ctx, "SELECT pg_advisory_xact_lock($1)", migrateKey.v); err != nil {
			return err
		}
		for _, q := range []string{
			"CREATE SCHEMA IF NOT EXISTS pglock",
			`CREATE TABLE IF NOT EXISTS pglock.migration (
				version int PRIMARY KEY,
				name text NOT NULL,
				applied_at timestamptz NOT NULL DEFAULT clock_timestamp())`,
		} {
			if _, err := tx.exec(ctx, q); err != nil {
				return err
			}
		}
		var from int
		if err := tx.scan(ctx, "SELECT coalesce(max(version), 0) FROM pglock.migration", &from); err != nil {
			return err
		}
		res.From, res.To = from, max(from, SchemaVersion)
		for v := from + 1; v <= SchemaVersion; v++ {
			m := migrations[v-1]
			if _, err := tx.exec(ctx, m.sql); err != nil {
				return fmt.Errorf("migration %d (%s): %w", v, m.name, err)
			}
			if _, err := tx.exec(ctx, "INSERT INTO pglock.migration (version, name) VALUES ($1, $2)", v, m.name); err != nil {
				return err
			}
			res.Applied = append(res.Applied, m.name)
		}
		return nil
	})
	if err != nil {
		return MigrateResult{}, fmt.Errorf("pglock: migrate the pglock schema: %w", err)
	}
	return res, nil
}

// sqlTx is a transaction of either driver, for the statements of Migrate,
// CheckFence and ClaimTick.
type sqlTx interface {
	// exec runs q and returns the rows it affected.
	exec(ctx context.Context, q string, args ...any) (int64, error)
	// scan runs q and scans its one row into dst; no row is errNoRow.
	scan(ctx context.Context, q string, dst any, args ...any) error
}

// errNoRow is sqlTx.scan's error for a query that returned no row.
var errNoRow = errors.New("pglock: no row")

// txOf wraps the work's transaction (a pgx.Tx or a *sql.Tx) given to what.
func txOf(what string, tx any) (sqlTx, error) {
	switch t := tx.(type) {
	case pgx.Tx:
		if isNilTx(t) {
			return nil, fmt.Errorf("%w: %s: nil pgx.Tx", ErrUnsupportedConn, what)
		}
		return pgxTxRunner{t}, nil
	case *sql.Tx:
		if t == nil {
			return nil, fmt.Errorf("%w: %s: nil *sql.Tx", ErrUnsupportedConn, what)
		}
		return stdTxRunner{t}, nil
	}
	return nil, fmt.Errorf("%w: %s needs the work's transaction (pgx.Tx or *sql.Tx), got %T", ErrUnsupportedConn, what, tx)
}

type pgxTxRunner struct{ tx pgx.Tx }

func (r pgxTxRunner) exec(ctx context.Context, q string, args ...any) (int64, error) {
	tag, err := r.tx.Exec(ctx, q, args...) // no args: the simple protocol, several statements allowed
	return tag.RowsAffected(), err
}

func (r pgxTxRunner) scan(ctx context.Context, q string, dst any, args ...any) error {
	err := r.tx.QueryRow(ctx, q, args...).Scan(dst)
	if errors.Is(err, pgx.ErrNoRows) {
		return errNoRow
	}
	return err
}

type stdTxRunner struct{ tx *sql.Tx }

func (r stdTxRunner) exec(ctx context.Context, q string, args ...any) (int64, error) {
	res, err := r.tx.ExecContext(ctx, q, args...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

func (r stdTxRunner) scan(ctx context.Context, q string, dst any, args ...any) error {
	err := r.tx.QueryRowContext(ctx, q, args...).Scan(dst)
	if errors.Is(err, sql.ErrNoRows) {
		return errNoRow
	}
	return err
}

// schemaErr turns the database's "relation pglock.x does not exist" (42P01)
// or "schema pglock does not exist" (3F000) into ErrSchema.
func schemaErr(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && (pgErr.Code == "42P01" || pgErr.Code == "3F000") {
		return fmt.Errorf("%w: %w", ErrSchema, err)
	}
	return err
}

// tickRetention is how long ClaimTick keeps the ticks of a job.
const tickRetention = 7 * 24 * time.Hour
