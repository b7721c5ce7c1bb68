package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Issue 12, item 4: Do owns its hold. Release and HandleError during Do (from
// fn or another goroutine) change nothing and say so (ErrInDo); a transaction
// that fn ends itself is reported as such (ErrTxEnded), never as a plain
// failure after a commit nor as success after a rollback.

// ownDBs are the pools the tests run on: pgx's and database/sql's (pgx's
// driver).
var ownDBs = []struct {
	name string
	open func(t *testing.T) any
}{
	{"pgxpool", func(t *testing.T) any { return pgtest.Pool(t, 4) }},
	{"sql.DB", func(t *testing.T) any { return openSQLDB(t) }},
}

// ownLock makes a Lock on key for db with NewLock, or with a Locker (closed when
// the test ends) when byLocker.
func ownLock(t *testing.T, db any, byLocker bool, key string, opts ...pglock.Option) *pglock.Lock {
	t.Helper()
	if !byLocker {
		l, err := pglock.NewLock(db, key, opts...)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	lk, err := pglock.NewLocker(db, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lk.Close() })
	l, err := lk.NewLock(key)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// ownExec runs a statement in the lock's transaction, found in fn's context.
func ownExec(ctx context.Context, stmt string, args ...any) error {
	if tx, ok := pglock.TxFromContext(ctx); ok {
		_, err := tx.Exec(ctx, stmt, args...)
		return err
	}
	if tx, ok := pglock.SQLTxFromContext(ctx); ok {
		_, err := tx.ExecContext(ctx, stmt, args...)
		return err
	}
	return errors.New("no transaction in fn's context")
}

// ownRows counts the rows of table whose value is v.
func ownRows(t *testing.T, watch *pgxpool.Pool, table, v string) int {
	t.Helper()
	var n int
	if err := watch.QueryRow(context.Background(), "SELECT count(*) FROM "+table+" WHERE v = $1", v).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// otherTakes reports whether another session (a Lock on other, a pool of its
// own) can take key now; it lets go at once.
// assertDoEnded fails the test unless l's hold ended with its Do: not held,
// gone from pg_locks, and free for another session.
func assertDoEnded(t *testing.T, l *pglock.Lock, watch, other *pgxpool.Pool) {
	t.Helper()
	if l.Held() {
		t.Fatal("held after Do returned")
	}
	pgtest.WaitFree(t, watch, l.Key())
	if !otherTakes(t, other, l.Key()) {
		t.Fatal("key not free after Do returned")
	}
}

func otherTakes(t *testing.T, other *pgxpool.Pool, key pglock.Key) bool {
	t.Helper()
	o, err := pglock.NewLock(other, key)
	if err != nil {
		t.Fatal(err)
	}
	ok, err := o.TryAcquire(context.Background())
	if err != nil {
		t.Fatalf("another session's TryAcquire: %v", err)
	}
	if ok {
		if err := o.Release(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	return ok
}

// connsInUse is the number of connections of db handed out now.
func connsInUse(db any) int {
	switch db := db.(type) {
	case *pgxpool.Pool:
		return int(db.Stat().AcquiredConns())
	case *sql.DB:
		return db.Stats().InUse
	}
	panic(fmt.Sprintf("connsInUse: %T", db))
}

// fn calls Release, HandleError, Acquire and TryAcquire on its own Lock: they
// change nothing, and fn's error still rolls back, in both scopes, with Do
// and TryDo, on pgx and database/sql, for Locks of NewLock and of a Locker.
func TestReleaseInsideDoIsRefused(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	watch := pgtest.Pool(t, 2)
	other := pgtest.Pool(t, 2)
	table := newTable(t, watch)
	for _, d := range ownDBs {
		for _, byLocker := range []bool{false, true} {
			for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
				for _, try := range []bool{false, true} {
					name := fmt.Sprintf("%s/locker=%v/%v/try=%v", d.name, byLocker, scope, try)
					t.Run(name, func(t *testing.T) {
						db := d.open(t)
						l := ownLock(t, db, byLocker, pgtest.UniqueKey(t), pglock.WithScope(scope))
						ran := false
						fn := func(ctx context.Context) error {
							ran = true
							if scope == pglock.Transaction {
								if err := ownExec(ctx, "INSERT INTO "+table+" VALUES ($1)", name); err != nil {
									return err
								}
							}
							if err := l.Release(ctx); !errors.Is(err, pglock.ErrInDo) {
								t.Errorf("Release inside Do = %v, want ErrInDo", err)
							}
							if err := l.HandleError(ctx, errBoom); !errors.Is(err, pglock.ErrInDo) || !errors.Is(err, errBoom) {
								t.Errorf("HandleError inside Do = %v, want errBoom and ErrInDo", err)
							}
							if err := l.HandleError(ctx, nil); err != nil {
								t.Errorf("HandleError(nil) inside Do = %v, want nil", err)
							}
							if err := l.Acquire(ctx); !errors.Is(err, pglock.ErrAlreadyHeld) {
								t.Errorf("Acquire inside Do = %v, want ErrAlreadyHeld", err)
							}
							if ok, err := l.TryAcquire(ctx); ok || !errors.Is(err, pglock.ErrAlreadyHeld) {
								t.Errorf("TryAcquire inside Do = %v, %v, want ErrAlreadyHeld", ok, err)
							}
							if err := ctx.Err(); err != nil {
								t.Errorf("fn's context ended: %v (cause %v)", err, context.Cause(ctx))
							}
							if !l.Held() {
								t.Error("not Held inside Do after Release")
							}
							if h := pgtest.Granted(t, watch, l.Key()); len(h) != 1 {
								t.Errorf("inside Do after Release: pg_locks = %+v, want one holder", h)
							}
							if otherTakes(t, other, l.Key()) {
								t.Error("another session took the key while fn still runs")
							}
							if scope == pglock.Transaction {
								// Still the lock's transaction: more work is protected.
								if err := ownExec(ctx, "INSERT INTO "+table+" VALUES ($1)", name); err != nil {
									t.Errorf("the lock's transaction is not usable after Release: %v", err)
								}
							}
							return errBoom
						}
						var err error
						if try {
							var ok bool
							ok, err = l.TryDo(ctx, fn)
							if !ok {
								t.Fatalf("TryDo did not run fn: %v", err)
							}
						} else {
							err = l.Do(ctx, fn)
						}
						if !ran {
							t.Fatalf("fn did not run: %v", err)
						}
						if !errors.Is(err, errBoom) || errors.Is(err, pglock.ErrInDo) {
							t.Fatalf("Do = %v, want fn's error alone", err)
						}
						if scope == pglock.Transaction {
							if n := ownRows(t, watch, table, name); n != 0 {
								t.Fatalf("%d rows after fn failed, want 0 (rolled back)", n)
							}
						}
						assertDoEnded(t, l, watch, other)
						if err := l.Release(ctx); err != nil {
							t.Fatalf("Release after Do = %v, want nil", err)
						}
						if n := connsInUse(db); n != 0 {
							t.Fatalf("%d connections still in use", n)
						}
					})
				}
			}
		}
	}
}

// Release and HandleError from another goroutine while fn runs are refused
// at once (no deadlock): fn keeps the hold, its context is not cancelled,
// another session cannot take the key; after Do the key is free and, in
// Transaction scope, all of fn's work is committed.
func TestReleaseFromAnotherGoroutineDuringDo(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	watch := pgtest.Pool(t, 2)
	other := pgtest.Pool(t, 2)
	table := newTable(t, watch)
	for _, d := range ownDBs {
		for _, byLocker := range []bool{false, true} {
			for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
				name := fmt.Sprintf("%s/locker=%v/%v", d.name, byLocker, scope)
				t.Run(name, func(t *testing.T) {
					db := d.open(t)
					l := ownLock(t, db, byLocker, pgtest.UniqueKey(t), pglock.WithScope(scope))
					started := make(chan struct{})
					proceed := make(chan struct{})
					done := make(chan error, 1)
					go func() {
						done <- l.Do(ctx, func(ctx context.Context) error {
							if scope == pglock.Transaction {
								if err := ownExec(ctx, "INSERT INTO "+table+" VALUES ($1)", name); err != nil {
									return err
								}
							}
							close(started)
							select {
							case <-proceed:
							case <-ctx.Done():
								return fmt.Errorf("fn's context ended: %w", context.Cause(ctx))
							}
							if scope == pglock.Transaction {
								return ownExec(ctx, "INSERT INTO "+table+" VALUES ($1)", name)
							}
							return nil
						})
					}()
					select {
					case <-started:
					case err := <-done:
						t.Fatalf("Do returned before fn started: %v", err)
					}

					refused := make(chan [2]error, 1)
					go func() {
						rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
						defer cancel()
						refused <- [2]error{l.Release(rctx), l.HandleError(rctx, errBoom)}
					}()
					select {
					case errs := <-refused:
						if !errors.Is(errs[0], pglock.ErrInDo) {
							t.Errorf("Release from another goroutine = %v, want ErrInDo", errs[0])
						}
						if !errors.Is(errs[1], pglock.ErrInDo) || !errors.Is(errs[1], errBoom) {
							t.Errorf("HandleError from another goroutine = %v, want errBoom and ErrInDo", errs[1])
						}
					case <-time.After(5 * time.Second):
						close(proceed)
						t.Fatal("Release from another goroutine blocked while fn runs")
					}

					time.Sleep(50 * time.Millisecond) // a cancellation would have reached fn
					select {
					case err := <-done:
						t.Fatalf("Do returned %v while fn should still run", err)
					default:
					}
					if !l.Held() {
						t.Error("not Held while fn runs")
					}
					if h := pgtest.Granted(t, watch, l.Key()); len(h) != 1 {
						t.Errorf("while fn runs: pg_locks = %+v, want one holder", h)
					}
					if otherTakes(t, other, l.Key()) {
						t.Error("another session took the key while fn runs")
					}

					close(proceed)
					err := <-done
					if scope == pglock.Transaction {
						// The HandleError marked the work for rollback: Do
						// rolled it back when fn returned, and says why.
						if !errors.Is(err, errBoom) {
							t.Fatalf("Do after a HandleError during it = %v, want errBoom", err)
						}
						if n := ownRows(t, watch, table, name); n != 0 {
							t.Fatalf("%d rows, want 0: HandleError during Do rolls fn's work back", n)
						}
					} else if err != nil {
						t.Fatalf("Do = %v", err)
					}
					assertDoEnded(t, l, watch, other)
				})
			}
		}
	}
}

// fn commits or rolls back the lock's own transaction itself, with the
// transaction's methods or a statement, then returns nil or an error: Do
// reports ErrTxEnded (with fn's error), says what is known of the work, sends
// nothing more, and gives the connection back to the pool, usable.
func TestDoReportsTxEndedByFn(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	watch := pgtest.Pool(t, 2)
	table := newTable(t, watch)
	for _, d := range ownDBs {
		for _, byLocker := range []bool{false, true} {
			for _, how := range []string{"Commit", "Rollback", "COMMIT", "ROLLBACK"} {
				for _, fnErr := range []error{nil, errBoom} {
					name := fmt.Sprintf("%s/locker=%v/%s/err=%v", d.name, byLocker, how, fnErr)
					t.Run(name, func(t *testing.T) {
						db := d.open(t)
						l := ownLock(t, db, byLocker, pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction))
						var pid int32
						err := l.Do(ctx, func(ctx context.Context) error {
							if err := ownExec(ctx, "INSERT INTO "+table+" VALUES ($1)", name); err != nil {
								return err
							}
							if err := endOwnTx(ctx, how, &pid); err != nil {
								return err
							}
							// The lock went with the transaction, at once.
							if h := pgtest.Granted(t, watch, l.Key()); len(h) != 0 {
								t.Errorf("after fn ended the transaction: pg_locks = %+v, want none", h)
							}
							return fnErr
						})
						if !errors.Is(err, pglock.ErrTxEnded) {
							t.Fatalf("Do = %v, want ErrTxEnded", err)
						}
						if fnErr != nil && !errors.Is(err, fnErr) {
							t.Fatalf("Do = %v, want fn's error too", err)
						}
						if errors.Is(err, pglock.ErrLockLost) {
							t.Fatalf("Do = %v: not a lost lock", err)
						}
						committed := how == "Commit" || how == "COMMIT"
						want := "cannot tell which"
						if _, pgx := db.(*pgxpool.Pool); pgx && how == "Commit" {
							want = "the work is committed"
						} else if pgx && how == "Rollback" {
							want = "the work is not committed"
						}
						if !strings.Contains(err.Error(), want) {
							t.Fatalf("Do = %q, want it to say %q", err, want)
						}
						wantRows := 0
						if committed {
							wantRows = 1
						}
						if n := ownRows(t, watch, table, name); n != wantRows {
							t.Fatalf("%d rows, want %d (fn's %s stands)", n, wantRows, how)
						}
						if l.Held() {
							t.Fatal("held after Do returned")
						}
						select {
						case <-l.Lost():
							t.Fatal("Lost closed: the lock was ended, not lost")
						default:
						}
						pgtest.WaitFree(t, watch, l.Key())
						if n := connsInUse(db); n != 0 {
							t.Fatalf("%d connections still in use", n)
						}
						var alive bool
						if err := watch.QueryRow(ctx, "SELECT EXISTS(SELECT 1 FROM pg_stat_activity WHERE pid = $1)", pid).Scan(&alive); err != nil || !alive {
							t.Fatalf("the healthy connection %d was destroyed (err %v)", pid, err)
						}
						// The Lock and the pool are usable: a next Do commits.
						if err := l.Do(ctx, func(ctx context.Context) error {
							return ownExec(ctx, "INSERT INTO "+table+" VALUES ($1)", name+"/next")
						}); err != nil {
							t.Fatalf("next Do = %v", err)
						}
						if n := ownRows(t, watch, table, name+"/next"); n != 1 {
							t.Fatalf("next Do: %d rows, want 1", n)
						}
						pgtest.WaitFree(t, watch, l.Key())
					})
				}
			}
		}
	}
}

// endOwnTx ends the lock's transaction in fn's context as how says: with the
// transaction's Commit or Rollback, or with a COMMIT or ROLLBACK statement.
// It reads the connection's backend pid first.
func endOwnTx(ctx context.Context, how string, pid *int32) error {
	if tx, ok := pglock.TxFromContext(ctx); ok {
		if err := tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(pid); err != nil {
			return err
		}
		switch how {
		case "Commit":
			return tx.Commit(ctx)
		case "Rollback":
			return tx.Rollback(ctx)
		}
		_, err := tx.Exec(ctx, how)
		return err
	}
	tx, ok := pglock.SQLTxFromContext(ctx)
	if !ok {
		return errors.New("no transaction in fn's context")
	}
	if err := tx.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(pid); err != nil {
		return err
	}
	switch how {
	case "Commit":
		return tx.Commit()
	case "Rollback":
		return tx.Rollback()
	}
	_, err := tx.ExecContext(ctx, how)
	return err
}

// Outside Do: the caller commits the lock's transaction (Lock.Tx, Lock.SQLTx)
// and then calls Release, which reports it and commits nothing.
func TestReleaseReportsTxEnded(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	watch := pgtest.Pool(t, 2)
	table := newTable(t, watch)
	for _, d := range ownDBs {
		for _, byLocker := range []bool{false, true} {
			name := fmt.Sprintf("%s/locker=%v", d.name, byLocker)
			t.Run(name, func(t *testing.T) {
				db := d.open(t)
				l := ownLock(t, db, byLocker, pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction))
				if err := l.Acquire(ctx); err != nil {
					t.Fatal(err)
				}
				want := "cannot tell which"
				if tx := l.Tx(); tx != nil {
					if _, err := tx.Exec(ctx, "INSERT INTO "+table+" VALUES ($1)", name); err != nil {
						t.Fatal(err)
					}
					if err := tx.Commit(ctx); err != nil {
						t.Fatal(err)
					}
					want = "the work is committed"
				} else {
					tx := l.SQLTx()
					if _, err := tx.ExecContext(ctx, "INSERT INTO "+table+" VALUES ($1)", name); err != nil {
						t.Fatal(err)
					}
					if err := tx.Commit(); err != nil {
						t.Fatal(err)
					}
				}
				err := l.Release(ctx)
				if !errors.Is(err, pglock.ErrTxEnded) || !strings.Contains(err.Error(), want) {
					t.Fatalf("Release = %v, want ErrTxEnded saying %q", err, want)
				}
				if n := ownRows(t, watch, table, name); n != 1 {
					t.Fatalf("%d rows, want 1", n)
				}
				if l.Held() {
					t.Fatal("held after Release")
				}
				pgtest.WaitFree(t, watch, l.Key())
				if n := connsInUse(db); n != 0 {
					t.Fatalf("%d connections still in use", n)
				}
			})
		}
	}
}

// After fn ended the lock's transaction with a COMMIT statement, the pgx.Tx
// it was given is ended too: a stale Rollback of it, later, must not roll
// back another user's transaction on the same pooled connection.
func TestStaleTxAfterStatementCommit(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 1) // one connection: the next user gets the same one
	table := fmt.Sprintf("stale_tx_%d", rand.Uint32())
	if _, err := pool.Exec(ctx, "CREATE TABLE "+table+" (v int)"); err != nil {
		t.Fatal(err)
	}
	defer pool.Exec(context.Background(), "DROP TABLE "+table)
	l, _ := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction))
	var stale pgx.Tx
	err := l.Do(ctx, func(ctx context.Context) error {
		stale, _ = pglock.TxFromContext(ctx)
		_, err := stale.Exec(ctx, "COMMIT")
		return err
	})
	if !errors.Is(err, pglock.ErrTxEnded) {
		t.Fatalf("Do after a COMMIT statement = %v, want ErrTxEnded", err)
	}
	other, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Exec(ctx, "INSERT INTO "+table+" VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	_ = stale.Rollback(ctx) // a deferred Rollback in the user's code
	if err := other.Commit(ctx); err != nil {
		t.Fatalf("the other user's commit: %v", err)
	}
	var n int
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM "+table).Scan(&n); err != nil || n != 1 {
		t.Errorf("the other user's row: %d rows, %v; want 1 (a stale Rollback ended its transaction)", n, err)
	}
}
