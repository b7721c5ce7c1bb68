package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Item 8: bad input gets a clear error, never a panic or a hang.
func TestBadInput(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t, 2)
	for _, tc := range []struct {
		name string
		conn any
		key  any
		opts []pglock.Option
		want error
	}{
		{"nil conn", nil, "k", nil, pglock.ErrUnsupportedConn},
		{"nil pool", (*pgxpool.Pool)(nil), "k", nil, pglock.ErrUnsupportedConn},
		{"nil pgx conn", (*pgx.Conn)(nil), "k", nil, pglock.ErrUnsupportedConn},
		{"nil sql db", (*sql.DB)(nil), "k", nil, pglock.ErrUnsupportedConn},
		{"nil sql tx", (*sql.Tx)(nil), "k", nil, pglock.ErrUnsupportedConn},
		{"string conn", "postgres://", "k", nil, pglock.ErrUnsupportedConn},
		{"float key", pool, 1.5, nil, pglock.ErrInvalidKey},
		{"nil key", pool, nil, nil, pglock.ErrInvalidKey},
		{"bad scope", pool, "k", []pglock.Option{pglock.WithScope(7)}, pglock.ErrInvalidOption},
		{"bad mode", pool, "k", []pglock.Option{pglock.WithMode(-1)}, pglock.ErrInvalidOption},
		{"negative wait", pool, "k", []pglock.Option{pglock.WithWait(-time.Second)}, pglock.ErrInvalidOption},
		{"negative check", pool, "k", []pglock.Option{pglock.WithLostCheckInterval(-1)}, pglock.ErrInvalidOption},
		{"negative release", pool, "k", []pglock.Option{pglock.WithReleaseTimeout(-1)}, pglock.ErrInvalidOption},
		{"nil option", pool, "k", []pglock.Option{nil}, pglock.ErrInvalidOption},
	} {
		l, err := pglock.NewLock(tc.conn, tc.key, tc.opts...)
		if !errors.Is(err, tc.want) || l != nil {
			t.Errorf("%s: New = %v, %v; want %v", tc.name, l, err, tc.want)
		}
		if tc.key == "k" {
			lk, err := pglock.NewLocker(tc.conn, tc.opts...)
			if !errors.Is(err, tc.want) || lk != nil {
				t.Errorf("%s: NewLocker = %v, %v; want %v", tc.name, lk, err, tc.want)
			}
		}
	}
}

// Session scope on a caller's transaction is refused: it would outlive it.
func TestSessionOnTxRefused(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := pglock.NewLock(tx, "k", pglock.WithScope(pglock.Session)); !errors.Is(err, pglock.ErrInvalidOption) {
		t.Fatalf("Session on pgx.Tx = %v, want ErrInvalidOption", err)
	}
	lk, err := pglock.NewLocker(tx)
	if err != nil || lk.Scope() != pglock.Transaction {
		t.Fatalf("Locker on a tx: %v, scope %v; want Transaction", err, lk.Scope())
	}
}

// Transaction scope on a bare *pgx.Conn is well defined: the lock opens its
// own transaction on that connection.
func TestTransactionOnBareConn(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	conn := openPgxConn(t)
	watch := pgtest.Pool(t, 2)
	l, err := pglock.NewLock(conn, pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction))
	if err != nil {
		t.Fatal(err)
	}
	err = l.Do(ctx, func(ctx context.Context) error {
		tx, ok := pglock.TxFromContext(ctx)
		if !ok || tx.Conn() != conn {
			t.Fatal("no transaction on the caller's connection")
		}
		if conn.PgConn().TxStatus() != 'T' {
			t.Fatal("connection not inside a transaction")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if conn.PgConn().TxStatus() != 'I' {
		t.Fatal("transaction left open on the caller's connection")
	}
	pgtest.WaitFree(t, watch, l.Key())
}

func TestNilFuncAndNilContext(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	l, err := pglock.NewLock(pool, pgtest.UniqueKey(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Do(context.Background(), nil); !errors.Is(err, pglock.ErrNilFunc) {
		t.Fatalf("Do(nil) = %v", err)
	}
	if ran, err := l.TryDo(context.Background(), nil); !errors.Is(err, pglock.ErrNilFunc) || ran {
		t.Fatalf("TryDo(nil) = %v, %v", ran, err)
	}
	//lint:ignore SA1012 a nil context is the bad input under test
	if err := l.Acquire(nil); !errors.Is(err, pglock.ErrNotAcquired) { //nolint:staticcheck
		t.Fatalf("Acquire(nil ctx) = %v", err)
	}
	var nilLocker *pglock.Locker
	if _, err := nilLocker.NewLock("k"); !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Fatalf("nil Locker.NewLock = %v", err)
	}
	if len(pgtest.Granted(t, watch, l.Key())) != 0 || pool.Stat().AcquiredConns() != 0 {
		t.Fatal("bad input left something held")
	}
}

// Item 5: Release is safe before Acquire and twice; Acquire on a held Lock
// is an error, not a second hold.
func TestReleaseIsAlwaysSafe(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	watch := pgtest.Pool(t, 2)
	for _, o := range openers {
		for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
			t.Run(o.name+"/"+scope.String(), func(t *testing.T) {
				t.Parallel()
				l, err := pglock.NewLock(o.open(t), pgtest.UniqueKey(t), pglock.WithScope(scope))
				if err != nil {
					t.Fatal(err)
				}
				if err := l.Release(ctx); err != nil {
					t.Fatalf("Release before Acquire = %v", err)
				}
				if err := l.Acquire(ctx); err != nil {
					t.Fatal(err)
				}
				if err := l.Acquire(ctx); !errors.Is(err, pglock.ErrAlreadyHeld) {
					t.Fatalf("Acquire while held = %v", err)
				}
				if ok, err := l.TryAcquire(ctx); ok || !errors.Is(err, pglock.ErrAlreadyHeld) {
					t.Fatalf("TryAcquire while held = %v, %v", ok, err)
				}
				if h := pgtest.Granted(t, watch, l.Key()); len(h) != 1 {
					t.Fatalf("pg_locks = %+v, want exactly one hold", h)
				}
				for i := range 2 {
					if err := l.Release(ctx); err != nil {
						t.Fatalf("Release #%d = %v", i+1, err)
					}
				}
				pgtest.WaitFree(t, watch, l.Key())
				// It can be taken again after release.
				if ok, err := l.TryAcquire(ctx); !ok || err != nil {
					t.Fatalf("TryAcquire after release = %v, %v", ok, err)
				}
				if err := l.Release(ctx); err != nil {
					t.Fatal(err)
				}
				pgtest.WaitFree(t, watch, l.Key())
			})
		}
	}
}

// Release with an already-cancelled context still unlocks: the design's
// pitfall is an unlock sent with a dead context that sends nothing.
func TestReleaseWithCancelledContext(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	l, _ := pglock.NewLock(pool, pgtest.UniqueKey(t))
	if err := l.Acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, l.Key())
	if pool.Stat().AcquiredConns() != 0 {
		t.Fatal("connection not returned")
	}
}

func TestWaitTimeoutAndNamespace(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	lk, err := pglock.NewLocker(pool, pglock.WithNamespace("ns:"), pglock.WithWait(150*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	name := pgtest.UniqueKey(t)
	k, _ := lk.Key(name)
	if want, _ := pglock.KeyOf("ns:" + name); k != want {
		t.Fatalf("namespaced key = %v, want KeyOf(%q) = %v", k, "ns:"+name, want)
	}
	if k7, _ := lk.Key(7); k7 != mustKey(t, "ns:7") {
		t.Fatal("integer key not namespaced as its decimal form")
	}
	if raw, _ := lk.Key(pglock.Int64Key(5)); raw != pglock.Int64Key(5) {
		t.Fatal("a Key value was namespaced")
	}
	// The outer hold waits as long as ctx allows (WithWait(0) overrides the
	// Locker's bound): the Locker's first connect counts against a wait
	// bound, and on a loaded machine takes longer than 150 ms.
	outer, err := lk.NewLock(name, pglock.WithWait(0))
	if err != nil {
		t.Fatal(err)
	}
	err = outer.Do(ctx, func(context.Context) error {
		// Another context than the hold's: a Do in the hold's runs in it.
		start := time.Now()
		err := lk.Do(ctx, name, func(context.Context) error { return nil })
		if !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("second Do = %v, want ErrNotAcquired and DeadlineExceeded", err)
		}
		if d := time.Since(start); d < 100*time.Millisecond || d > 3*time.Second {
			t.Errorf("waited %v, want about 150ms", d)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func mustKey(t *testing.T, v any) pglock.Key {
	t.Helper()
	k, err := pglock.KeyOf(v)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestLockerPooled(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t, 2)
	c, err := pool.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Release()
	for _, tc := range []struct {
		conn any
		want bool
	}{{pool, true}, {openSQLDB(t), true}, {c, false}, {c.Conn(), false}} {
		lk, err := pglock.NewLocker(tc.conn)
		if err != nil {
			t.Fatal(err)
		}
		if lk.Pooled() != tc.want {
			t.Errorf("NewLocker(%T).Pooled() = %v", tc.conn, !tc.want)
		}
	}
	var nilLocker *pglock.Locker
	if nilLocker.Pooled() {
		t.Error("nil Locker is pooled")
	}
}

// A zero Locker (not made by NewLocker) is an error, never a panic.
func TestZeroLocker(t *testing.T) {
	t.Parallel()
	var lk pglock.Locker
	if _, err := lk.NewLock("k"); !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Errorf("zero Locker's Lock = %v, want ErrUnsupportedConn", err)
	}
	if err := lk.Do(context.Background(), "k", func(context.Context) error { return nil }); !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Errorf("zero Locker's Do = %v, want ErrUnsupportedConn", err)
	}
	if s := lk.Stats(); s != (pglock.LockerStats{}) {
		t.Errorf("zero Locker's Stats = %+v", s)
	}
	if err := lk.Close(); err != nil {
		t.Errorf("zero Locker's Close = %v", err)
	}
}
