package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// newTable creates a one-column table for the test and returns its name.
func newTable(t *testing.T, db *pgxpool.Pool) string {
	t.Helper()
	name := pgx.Identifier{"pglock_test_" + randomSuffix()}.Sanitize()
	if _, err := db.Exec(context.Background(), "CREATE TABLE "+name+" (v text)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = db.Exec(context.Background(), "DROP TABLE "+name) })
	return name
}

func count(t *testing.T, db *pgxpool.Pool, table string) int {
	t.Helper()
	var n int
	if err := db.QueryRow(context.Background(), "SELECT count(*) FROM "+table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

var errBoom = errors.New("boom")

// Item 4: transaction scope on a pool: Do commits fn's work together with the
// lock on success, rolls it back on error and on panic (re-raised).
func TestTransactionDoCommitsOrRollsBack(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	watch := pgtest.Pool(t, 2)
	table := newTable(t, watch)
	lk, err := pglock.NewLocker(pool, pglock.WithScope(pglock.Transaction))
	if err != nil {
		t.Fatal(err)
	}
	key := pgtest.UniqueKey(t)
	k, _ := lk.Key(key)
	insert := func(ctx context.Context) error {
		tx, ok := pglock.TxFromContext(ctx)
		if !ok {
			t.Fatal("no tx in fn's context")
		}
		if h := pgtest.Granted(t, watch, k); len(h) != 1 {
			t.Fatalf("inside fn: pg_locks = %+v", h)
		}
		_, err := tx.Exec(ctx, "INSERT INTO "+table+" VALUES ('x')")
		return err
	}

	if err := lk.Do(ctx, key, insert); err != nil {
		t.Fatal(err)
	}
	if n := count(t, watch, table); n != 1 {
		t.Fatalf("after success: %d rows, want 1 (committed)", n)
	}
	pgtest.WaitFree(t, watch, k)

	err = lk.Do(ctx, key, func(ctx context.Context) error {
		if err := insert(ctx); err != nil {
			return err
		}
		return errBoom
	})
	if !errors.Is(err, errBoom) {
		t.Fatalf("Do = %v, want fn's error", err)
	}
	if n := count(t, watch, table); n != 1 {
		t.Fatalf("after error: %d rows, want 1 (rolled back)", n)
	}
	pgtest.WaitFree(t, watch, k)

	func() {
		defer func() {
			if r := recover(); r != "kaboom" {
				t.Fatalf("recovered %v, want the re-raised panic", r)
			}
		}()
		_ = lk.Do(ctx, key, func(ctx context.Context) error {
			if err := insert(ctx); err != nil {
				return err
			}
			panic("kaboom")
		})
	}()
	if n := count(t, watch, table); n != 1 {
		t.Fatalf("after panic: %d rows, want 1 (rolled back)", n)
	}
	pgtest.WaitFree(t, watch, k)
	if n := pool.Stat().AcquiredConns(); n != 0 {
		t.Fatalf("%d connections still acquired", n)
	}
}

// Item 4: held until commit or rollback, and not a moment longer; Release
// commits the lock's own transaction.
func TestTransactionHeldUntilEnd(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	watch := pgtest.Pool(t, 2)
	table := newTable(t, watch)
	l, err := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction))
	if err != nil {
		t.Fatal(err)
	}
	if l.Tx() != nil {
		t.Fatal("Tx before Acquire is not nil")
	}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Tx().Exec(ctx, "INSERT INTO "+table+" VALUES ('y')"); err != nil {
		t.Fatal(err)
	}
	if len(pgtest.Granted(t, watch, l.Key())) != 1 {
		t.Fatal("not held inside the transaction")
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if count(t, watch, table) != 1 {
		t.Fatal("Release did not commit the lock's transaction")
	}
	pgtest.WaitFree(t, watch, l.Key())

	// HandleError rolls back (item 6).
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Tx().Exec(ctx, "INSERT INTO "+table+" VALUES ('z')"); err != nil {
		t.Fatal(err)
	}
	if err := l.HandleError(ctx, errBoom); !errors.Is(err, errBoom) {
		t.Fatalf("HandleError = %v, want the error back", err)
	}
	if l.Held() {
		t.Fatal("held after HandleError rolled back")
	}
	if count(t, watch, table) != 1 {
		t.Fatal("HandleError did not roll back")
	}
	pgtest.WaitFree(t, watch, l.Key())
}

// Item 6: with RollbackOnError off, HandleError leaves the transaction alone.
func TestHandleErrorOff(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	watch := pgtest.Pool(t, 2)
	table := newTable(t, watch)
	l, err := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction), pglock.WithRollbackOnError(false))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Tx().Exec(ctx, "INSERT INTO "+table+" VALUES ('z')"); err != nil {
		t.Fatal(err)
	}
	if err := l.HandleError(ctx, errBoom); !errors.Is(err, errBoom) {
		t.Fatalf("HandleError = %v", err)
	}
	if !l.Held() || len(pgtest.Granted(t, watch, l.Key())) != 1 {
		t.Fatal("HandleError with rollback off ended the hold")
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if count(t, watch, table) != 1 {
		t.Fatal("the transaction was not left alone (its insert is gone)")
	}
	pgtest.WaitFree(t, watch, l.Key())

	// Do with rollback off commits what fn did even though fn failed.
	err = l.Do(ctx, func(ctx context.Context) error {
		tx, _ := pglock.TxFromContext(ctx)
		if _, err := tx.Exec(ctx, "INSERT INTO "+table+" VALUES ('w')"); err != nil {
			return err
		}
		return errBoom
	})
	if !errors.Is(err, errBoom) || count(t, watch, table) != 2 {
		t.Fatalf("Do with rollback off: err %v, rows %d (want fn's error and 2 rows)", err, count(t, watch, table))
	}
}

// Item 4: on a caller's pgx.Tx the lock joins that transaction; Release
// neither ends it nor unlocks: the lock lasts until the caller commits.
func TestCallerPgxTx(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	watch := pgtest.Pool(t, 2)
	table := newTable(t, watch)
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	l, err := pglock.NewLock(tx, pgtest.UniqueKey(t)) // scope defaults to Transaction on a tx
	if err != nil {
		t.Fatal(err)
	}
	err = l.Do(ctx, func(ctx context.Context) error {
		got, ok := pglock.TxFromContext(ctx)
		if !ok || got != tx {
			t.Fatal("fn's context does not carry the caller's tx")
		}
		_, err := got.Exec(ctx, "INSERT INTO "+table+" VALUES ('a')")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(pgtest.Granted(t, watch, l.Key())) != 1 {
		t.Fatal("the xact lock ended before the caller's transaction")
	}
	if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatalf("the caller's tx is not usable after Do: %v", err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if count(t, watch, table) != 1 {
		t.Fatal("work not committed with the caller's tx")
	}
	pgtest.WaitFree(t, watch, l.Key())

	// A failing fn rolls back the caller's transaction (RollbackOnError).
	tx2, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	l2, _ := pglock.NewLock(tx2, l.Key())
	err = l2.Do(ctx, func(ctx context.Context) error {
		if _, err := tx2.Exec(ctx, "INSERT INTO "+table+" VALUES ('b')"); err != nil {
			return err
		}
		return errBoom
	})
	if !errors.Is(err, errBoom) {
		t.Fatalf("Do = %v", err)
	}
	if err := tx2.Commit(ctx); !errors.Is(err, pgx.ErrTxClosed) {
		t.Fatalf("commit after rollback-on-error = %v, want ErrTxClosed", err)
	}
	if count(t, watch, table) != 1 {
		t.Fatal("failed work was committed")
	}
	pgtest.WaitFree(t, watch, l.Key())
}

// Item 4 for database/sql: the same on a caller's *sql.Tx, and own
// transactions on *sql.DB.
func TestSQLTransactions(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := openSQLDB(t)
	watch := pgtest.Pool(t, 2)
	table := newTable(t, watch)
	key := pgtest.UniqueKey(t)

	lk, err := pglock.NewLocker(db, pglock.WithScope(pglock.Transaction))
	if err != nil {
		t.Fatal(err)
	}
	insert := func(ctx context.Context) error {
		tx, ok := pglock.SQLTxFromContext(ctx)
		if !ok {
			t.Fatal("no *sql.Tx in fn's context")
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO "+table+" VALUES ('x')")
		return err
	}
	if err := lk.Do(ctx, key, insert); err != nil {
		t.Fatal(err)
	}
	err = lk.Do(ctx, key, func(ctx context.Context) error {
		if err := insert(ctx); err != nil {
			return err
		}
		return errBoom
	})
	if !errors.Is(err, errBoom) || count(t, watch, table) != 1 {
		t.Fatalf("sql.DB Do: err %v, rows %d; want errBoom and 1 row", err, count(t, watch, table))
	}
	k, _ := lk.Key(key)
	pgtest.WaitFree(t, watch, k)

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	l, err := pglock.NewLock(tx, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Do(ctx, func(ctx context.Context) error {
		if got, _ := pglock.SQLTxFromContext(ctx); got != tx {
			t.Fatal("fn's context does not carry the caller's *sql.Tx")
		}
		return insert(ctx)
	}); err != nil {
		t.Fatal(err)
	}
	if len(pgtest.Granted(t, watch, k)) != 1 {
		t.Fatal("xact lock ended before the caller's *sql.Tx")
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if count(t, watch, table) != 2 {
		t.Fatal("work not committed with the caller's *sql.Tx")
	}
	pgtest.WaitFree(t, watch, k)
	var _ *sql.Tx = l.SQLTx()
}

// A commit that fails (fn swallowed a statement error, so the transaction
// was aborted) is the commit's error, not a lost lock: Lost stays open and
// the healthy connection goes back to the pool.
func TestFailedCommitIsNotALoss(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	l, err := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction))
	if err != nil {
		t.Fatal(err)
	}
	var pid int32
	err = l.Do(ctx, func(ctx context.Context) error {
		tx, _ := pglock.TxFromContext(ctx)
		if err := tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
			return err
		}
		_, _ = tx.Exec(ctx, "SELECT 1/0") // swallowed: the transaction is aborted
		return nil
	})
	if err == nil || errors.Is(err, pglock.ErrLockLost) {
		t.Fatalf("Do = %v, want the commit's error and not ErrLockLost", err)
	}
	select {
	case <-l.Lost():
		t.Fatal("Lost closed for a failed commit")
	default:
	}
	var alive bool
	if err := watch.QueryRow(ctx, "SELECT EXISTS(SELECT 1 FROM pg_stat_activity WHERE pid = $1)", pid).Scan(&alive); err != nil || !alive {
		t.Fatalf("the healthy connection %d was destroyed (err %v)", pid, err)
	}
	pgtest.WaitFree(t, watch, l.Key())
}
