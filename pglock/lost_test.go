package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Each hold has its own Lost channel: a channel taken during a hold that
// ended cleanly is not closed by a later hold's loss. After a loss, Held is
// false and Acquire lets the lost hold go instead of reporting ErrAlreadyHeld.
func TestLostChannelPerHoldAndAcquireAfterLoss(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	watch := pgtest.Pool(t, 2)
	l, err := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithLostCheckInterval(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	first := l.Lost()
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	second := l.Lost()
	if first == second {
		t.Fatal("two holds share one Lost channel")
	}
	pgtest.Terminate(t, watch, pgtest.Granted(t, watch, l.Key())[0].PID)
	select {
	case <-second:
	case <-time.After(3 * time.Second):
		t.Fatal("Lost not closed 3 s after the backend was terminated")
	}
	select {
	case <-first:
		t.Fatal("the first hold's channel was closed by the second hold's loss")
	default:
	}
	if l.Held() {
		t.Fatal("Held after the loss")
	}
	if err := l.Acquire(ctx); err != nil {
		t.Fatalf("Acquire after a loss = %v, want the lost hold let go and a new one taken", err)
	}
	if len(pgtest.Granted(t, watch, l.Key())) != 1 {
		t.Fatal("the new hold is not in pg_locks")
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, l.Key())
	if n := pool.Stat().AcquiredConns(); n != 0 {
		t.Fatalf("%d connections acquired", n)
	}
}

// Release after the backend was terminated reports ErrLockLost on database/sql
// too: on a caller's *sql.Conn (not watched) and on a *sql.DB released before
// its watch started.
func TestSQLReleaseAfterTerminateIsLost(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := openSQLDB(t)
	watch := pgtest.Pool(t, 2)

	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	onConn, _ := pglock.NewLock(conn, pgtest.UniqueKey(t))
	onDB, _ := pglock.NewLock(db, pgtest.UniqueKey(t))
	for _, l := range []*pglock.Lock{onConn, onDB} {
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		pgtest.Terminate(t, watch, pgtest.Granted(t, watch, l.Key())[0].PID)
		if err := l.Release(ctx); !errors.Is(err, pglock.ErrLockLost) {
			t.Errorf("Release after the backend died = %v, want ErrLockLost", err)
		}
		pgtest.WaitFree(t, watch, l.Key())
	}
}

// In Transaction scope, a lock whose connection was killed while fn ran ends
// Do with ErrLockLost on every backend (on *sql.DB it used to be a bare
// driver error): the work was not committed.
func TestTransactionScopeTerminatedIsLost(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	watch := pgtest.Pool(t, 2)
	for name, conn := range map[string]any{"pgxpool": pgtest.Pool(t, 2), "sql.DB": openSQLDB(t)} {
		l, _ := pglock.NewLock(conn, pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction))
		err := l.Do(ctx, func(context.Context) error {
			pgtest.Terminate(t, watch, pgtest.Granted(t, watch, l.Key())[0].PID)
			return nil
		})
		if !errors.Is(err, pglock.ErrLockLost) {
			t.Errorf("%s: Do whose connection was terminated = %v, want ErrLockLost", name, err)
		}
		if strings.Contains(fmt.Sprint(err), "\n") {
			t.Errorf("%s: the error spans lines: %q", name, err)
		}
		pgtest.WaitFree(t, watch, l.Key())
	}
}

// Errors are one line (a log line stays a line), and still match every
// sentinel and the server's error: here a release after the lock's
// connection was terminated, on a pool connection of its own and on a
// Locker's lock connection.
func TestErrorsAreOneLine(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool)
	own, _ := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithLostCheckInterval(100*time.Millisecond))
	shared, _ := lk.NewLock(pgtest.UniqueKey(t))
	for _, l := range []*pglock.Lock{own, shared} {
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		pgtest.Terminate(t, watch, pgtest.Granted(t, watch, l.Key())[0].PID)
		select {
		case <-l.Lost():
		case <-time.After(3 * time.Second):
			t.Fatal("Lost not closed 3 s after the backend was terminated")
		}
		err := l.Release(ctx)
		if !errors.Is(err, pglock.ErrLockLost) {
			t.Fatalf("Release after the loss = %v, want ErrLockLost", err)
		}
		if strings.Contains(err.Error(), "\n") {
			t.Errorf("error spans lines: %q", err.Error())
		}
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code != "57P01" {
			t.Errorf("server error %s, want 57P01 (admin shutdown)", pgErr.Code)
		}
		t.Logf("%q", err.Error())
	}
}

// A hold lost before Lost was ever called: Lost then returns a closed
// channel (the loss is not missed because nobody asked for the channel
// before it), and the next hold's channel is open.
func TestLostAskedAfterTheLoss(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	l, err := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithLostCheckInterval(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Release(context.Background()) })
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	pgtest.Terminate(t, watch, pgtest.Granted(t, watch, l.Key())[0].PID)
	deadline := time.Now().Add(5 * time.Second)
	for l.Held() {
		if time.Now().After(deadline) {
			t.Fatal("Held 5 s after the backend was terminated")
		}
		time.Sleep(5 * time.Millisecond)
	}
	select {
	case <-l.Lost():
	default:
		t.Fatal("Lost, asked for after the loss, is not closed")
	}
	if err := l.Release(ctx); !errors.Is(err, pglock.ErrLockLost) {
		t.Fatalf("Release after the loss = %v, want ErrLockLost", err)
	}
	select {
	case <-l.Lost():
	default:
		t.Fatal("Lost after the release of a lost hold is not closed")
	}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-l.Lost():
		t.Fatal("the next hold's Lost is closed")
	default:
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
}
