// Command quickstart walks through pglock the way the Python package
// postgresql-lock's README does, one example after another, and prints what
// happened. It runs against DATABASE_URL (make demo finds or starts a server).
package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"

	"github.com/pglockkit/kit/pglock"
)

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := run(ctx, os.Stdout, os.Getenv("DATABASE_URL")); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, w io.Writer, url string) error {
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return err
	}
	defer pool.Close()
	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }

	// The same key as the Python package's examples: KeyOf hashes it the same
	// way, so a Python process locking "shared-identifier" waits for us.
	key, _ := pglock.KeyOf("shared-identifier")
	p("== keys: \"shared-identifier\" is advisory key %s, as in postgresql-lock", key)

	// 1. with Lock(conn, "shared-identifier"): ...
	p("\n== 1. the with statement: Lock.Do")
	lock, err := pglock.NewLock(pool, "shared-identifier")
	if err != nil {
		return err
	}
	err = lock.Do(ctx, func(ctx context.Context) error {
		p("Acquired lock!")
		return nil
	})
	if err != nil {
		return err
	}
	p("released when the function returned (held now: %v)", lock.Held())

	// 2. try: lock.acquire() ... finally: lock.release()
	p("\n== 2. try/finally: Acquire and a deferred Release")
	if err := tryFinally(ctx, pool, p); err != nil {
		return err
	}

	// 3. if lock.acquire(block=False): ... else: ...
	p("\n== 3. non-blocking: TryAcquire while another replica holds the key")
	other, _ := pglock.NewLock(pool, "shared-identifier")
	if err := other.Acquire(ctx); err != nil {
		return err
	}
	if err := nonBlocking(ctx, pool, p); err != nil {
		return err
	}
	if err := other.Release(ctx); err != nil {
		return err
	}
	p("the other replica released it")
	if err := nonBlocking(ctx, pool, p); err != nil {
		return err
	}

	// 4. Lock(conn, ..., interface="..."): any supported connection type.
	p("\n== 4. another database interface: database/sql with pgx's stdlib driver")
	db, err := sql.Open("pgx", url)
	if err != nil {
		return err
	}
	defer db.Close()
	sqlLock, err := pglock.NewLock(db, "shared-identifier")
	if err != nil {
		return err
	}
	if err := sqlLock.Do(ctx, func(context.Context) error { p("Acquired lock through *sql.DB!"); return nil }); err != nil {
		return err
	}

	// 5. scope="transaction": the lock and the work commit together.
	p("\n== 5. transaction scope: the work commits with the lock")
	// A real table: a temporary one would belong to one pooled session.
	if _, err := pool.Exec(ctx, "CREATE TABLE IF NOT EXISTS pglock_quickstart_ledger (entry text)"); err != nil {
		return err
	}
	defer pool.Exec(context.WithoutCancel(ctx), "DROP TABLE IF EXISTS pglock_quickstart_ledger")
	txLock, err := pglock.NewLock(pool, "shared-identifier", pglock.WithScope(pglock.Transaction))
	if err != nil {
		return err
	}
	err = txLock.Do(ctx, func(ctx context.Context) error {
		tx, _ := pglock.TxFromContext(ctx)
		_, err := tx.Exec(ctx, "INSERT INTO pglock_quickstart_ledger VALUES ('credit 10')")
		return err
	})
	if err != nil {
		return err
	}
	p("committed: ledger has %d row(s)", rows(ctx, pool))

	// 6. rollback_on_error=True (the default): a failure rolls back first.
	p("\n== 6. rollback on error: a failing function rolls its work back")
	err = txLock.Do(ctx, func(ctx context.Context) error {
		tx, _ := pglock.TxFromContext(ctx)
		if _, err := tx.Exec(ctx, "INSERT INTO pglock_quickstart_ledger VALUES ('debit 99')"); err != nil {
			return err
		}
		return errors.New("insufficient funds")
	})
	p("Do returned %q; ledger still has %d row(s); lock held: %v", err, rows(ctx, pool), txLock.Held())

	// 7. Beyond the Python package: a wait with a deadline.
	p("\n== 7. a wait with a deadline")
	if err := other.Acquire(ctx); err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err = lock.Acquire(wctx)
	cancel()
	p("Acquire gave up after its deadline: ErrNotAcquired=%v DeadlineExceeded=%v held=%v",
		errors.Is(err, pglock.ErrNotAcquired), errors.Is(err, context.DeadlineExceeded), lock.Held())
	if err := other.Release(ctx); err != nil {
		return err
	}
	p("\ndone: nothing is left locked")
	return nil
}

func tryFinally(ctx context.Context, pool *pgxpool.Pool, p func(string, ...any)) error {
	lock, err := pglock.NewLock(pool, "shared-identifier")
	if err != nil {
		return err
	}
	if err := lock.Acquire(ctx); err != nil {
		return err
	}
	defer func() {
		if err := lock.Release(ctx); err != nil {
			p("release: %v", err)
		}
	}()
	p("Acquired lock!")
	return nil
}

func nonBlocking(ctx context.Context, pool *pgxpool.Pool, p func(string, ...any)) error {
	lock, err := pglock.NewLock(pool, "shared-identifier")
	if err != nil {
		return err
	}
	// Release is safe to run even if the lock has not been acquired.
	defer lock.Release(ctx)
	ok, err := lock.TryAcquire(ctx)
	if err != nil {
		return err
	}
	if ok {
		p("Acquired lock!")
	} else {
		p("Could not acquire lock!")
	}
	return nil
}

func rows(ctx context.Context, pool *pgxpool.Pool) int {
	var n int
	_ = pool.QueryRow(ctx, "SELECT count(*) FROM pglock_quickstart_ledger").Scan(&n)
	return n
}
