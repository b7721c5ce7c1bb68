package bench

import (
	"context"
	"database/sql"
	"testing"

	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// sqlDB returns a *sql.DB on pgx's database/sql driver with up to n
// connections, all opened (and kept idle), closed when b ends.
func sqlDB(ctx context.Context, b *testing.B, n int) *sql.DB {
	db, err := sql.Open("pgx", pgtest.URL(b))
	must(b, err)
	b.Cleanup(func() { _ = db.Close() })
	db.SetMaxOpenConns(n)
	db.SetMaxIdleConns(n)
	cs := make([]*sql.Conn, n)
	for i := range cs {
		cs[i], err = db.Conn(ctx)
		must(b, err)
	}
	for _, c := range cs {
		must(b, c.PingContext(ctx))
		must(b, c.Close())
	}
	return db
}

// rawSQL is what a service does with database/sql without the library: pin
// a connection, lock, unlock, check the unlock's result, give the
// connection back.
func rawSQL(ctx context.Context, b *testing.B, db *sql.DB, k pglock.Key) {
	c, err := db.Conn(ctx)
	must(b, err)
	defer func() { must(b, c.Close()) }()
	_, err = c.ExecContext(ctx, "SELECT pg_advisory_lock($1::bigint)", k.Int64())
	must(b, err)
	var ok bool
	must(b, c.QueryRowContext(ctx, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()).Scan(&ok))
	if !ok {
		b.Fatal("unlock: not held")
	}
}

// Session Acquire + Release, uncontended, on a *sql.DB with pgx's driver:
// a Lock made by pglock.New ("New": one connection of the DB per hold) and
// a Lock of a multiplexing Locker ("Locker": its lock connections), each
// beside raw database/sql: db.Conn, pg_advisory_lock, pg_advisory_unlock,
// Close.
func BenchmarkSQLAcquireRelease(b *testing.B) {
	for _, viaLocker := range []bool{false, true} {
		name := "New"
		if viaLocker {
			name = "Locker"
		}
		b.Run(name, func(b *testing.B) {
			runPair(b, func(b *testing.B, ctx context.Context) pair {
				db := sqlDB(ctx, b, 4)
				ks := keys(b, 2)
				k, rk := ks[0], ks[1]
				var l *pglock.Lock
				var err error
				if viaLocker {
					l, err = newLocker(b, db).NewLock(k)
				} else {
					l, err = pglock.NewLock(db, k)
				}
				must(b, err)
				return pair{
					lib: func(b *testing.B) {
						must(b, l.Acquire(ctx))
						must(b, l.Release(ctx))
					},
					raw: func(b *testing.B) { rawSQL(ctx, b, db, rk) },
				}
			})
		})
	}
}
