package pglock_test

// Fault injection: cancelled waits (item 3 of issue 2) and lost locks
// (item 7), on every kind of connection, against the real server, with lock
// state read from a second pool through pg_locks.

import (
	"context"
	"database/sql"
	"errors"
	"math/rand/v2"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pglockkit/kit/internal/faultproxy"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// faultTarget is a kind of connection a waiting Lock runs on.
type faultTarget struct {
	name string
	// polls: the wait polls the non-blocking function (database/sql on a
	// caller's *sql.Tx, whose connection database/sql does not expose), so
	// nothing waits in pg_locks.
	polls bool
	// setup opens the connection once and returns a function that gives
	// each attempt what to lock on.
	setup func(t *testing.T) func(t *testing.T) *faultWaiter
}

// faultWaiter is what one attempt locks on.
type faultWaiter struct {
	conn any
	opts []pglock.Option
	pid  int32 // the backend the lock runs on
	// usable checks, after Acquire returned and while the attempt's
	// transaction (if any) is open, that the connection and the transaction
	// still work and that no pool connection is left checked out. It returns
	// the backend pid its statement ran on.
	usable func(t *testing.T) int32
	// finish ends what the attempt opened (the caller's transaction).
	finish func(t *testing.T)
}

const faultMark = "SELECT set_config('pglock_fault.mark', 'kept', true)"
const faultReadMark = "SELECT current_setting('pglock_fault.mark'), pg_backend_pid()"

func faultTargets() []faultTarget {
	pgxPool := func(opts ...pglock.Option) func(t *testing.T) func(t *testing.T) *faultWaiter {
		return func(t *testing.T) func(t *testing.T) *faultWaiter {
			pool := pgtest.Pool(t, 1) // one connection: the lock's is the one we see
			return func(t *testing.T) *faultWaiter {
				return &faultWaiter{
					conn: pool, opts: opts, pid: faultPID(t, pool),
					usable: func(t *testing.T) int32 {
						t.Helper()
						if n := pool.Stat().AcquiredConns(); n != 0 {
							t.Errorf("pool has %d acquired connections after Acquire returned", n)
						}
						return faultPID(t, pool)
					},
					finish: func(*testing.T) {},
				}
			}
		}
	}
	sqlDB := func(opts ...pglock.Option) func(t *testing.T) func(t *testing.T) *faultWaiter {
		return func(t *testing.T) func(t *testing.T) *faultWaiter {
			db := faultSQLDB(t)
			return func(t *testing.T) *faultWaiter {
				return &faultWaiter{
					conn: db, opts: opts, pid: faultSQLPID(t, db),
					usable: func(t *testing.T) int32 {
						t.Helper()
						if n := db.Stats().InUse; n != 0 {
							t.Errorf("*sql.DB has %d connections in use after Acquire returned", n)
						}
						return faultSQLPID(t, db)
					},
					finish: func(*testing.T) {},
				}
			}
		}
	}
	return []faultTarget{
		{name: "pgxpool", setup: pgxPool()},
		{name: "pgxpool-transaction", setup: pgxPool(pglock.WithScope(pglock.Transaction))},
		{name: "pgx.Conn", setup: func(t *testing.T) func(t *testing.T) *faultWaiter {
			conn := faultConnect(t)
			return func(t *testing.T) *faultWaiter {
				return &faultWaiter{
					conn: conn, pid: int32(conn.PgConn().PID()),
					usable: func(t *testing.T) int32 {
						t.Helper()
						if conn.IsClosed() {
							t.Errorf("caller's *pgx.Conn was closed by the cancelled Acquire")
						}
						var pid int32
						if err := conn.QueryRow(context.Background(), "SELECT pg_backend_pid()").Scan(&pid); err != nil {
							t.Errorf("caller's *pgx.Conn unusable after Acquire: %v", err)
						}
						return pid
					},
					finish: func(*testing.T) {},
				}
			}
		}},
		{name: "pgx.Tx", setup: func(t *testing.T) func(t *testing.T) *faultWaiter {
			conn := faultConnect(t)
			return func(t *testing.T) *faultWaiter {
				return faultTxWaiter(t, conn)
			}
		}},
		{name: "sql.DB", setup: sqlDB()},
		{name: "sql.DB-transaction", setup: sqlDB(pglock.WithScope(pglock.Transaction))},
		{name: "sql.Tx", polls: true, setup: func(t *testing.T) func(t *testing.T) *faultWaiter {
			db := faultSQLDB(t)
			return func(t *testing.T) *faultWaiter {
				ctx := context.Background()
				pid := faultSQLPID(t, db)
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = tx.Rollback() }) // a no-op after finish
				if _, err := tx.ExecContext(ctx, faultMark); err != nil {
					t.Fatal(err)
				}
				return &faultWaiter{
					conn: tx, pid: pid,
					usable: func(t *testing.T) int32 {
						t.Helper()
						var mark string
						var pid int32
						if err := tx.QueryRowContext(ctx, faultReadMark).Scan(&mark, &pid); err != nil {
							t.Errorf("caller's *sql.Tx unusable after Acquire: %v", err)
						} else if mark != "kept" {
							t.Errorf("caller's *sql.Tx lost its earlier work (mark %q)", mark)
						}
						return pid
					},
					finish: func(t *testing.T) {
						t.Helper()
						if err := tx.Commit(); err != nil {
							t.Errorf("commit of the caller's *sql.Tx: %v", err)
						}
					},
				}
			}
		}},
	}
}

// TestFaultCancelWhileWaiting: an Acquire that waits behind another session
// and whose ctx is cancelled, or passes its deadline (or was past it before
// the call), on every kind of connection, returns promptly an
// error matching ErrNotAcquired and the ctx's error; the lock is not held,
// no connection is left checked out, and the connection (and the caller's
// transaction) is still the same, alive and usable: the wait was stopped by
// a cancel request, not by closing the connection.
func TestFaultCancelWhileWaiting(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	hold := pgtest.Pool(t, 2)
	for _, tg := range faultTargets() {
		t.Run(tg.name, func(t *testing.T) {
			t.Parallel()
			next := tg.setup(t)
			for _, how := range []string{"cancel", "deadline", "expired"} {
				t.Run(how, func(t *testing.T) {
					faultCancelOnce(t, tg.polls, next(t), watch, hold, how)
				})
			}
		})
	}
}

func faultCancelOnce(t *testing.T, polls bool, w *faultWaiter, watch, hold *pgxpool.Pool, how string) {
	bg := context.Background()
	key := faultKey(t)
	holder, err := pglock.NewLock(hold, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := holder.Release(bg); err != nil {
			t.Errorf("holder Release: %v", err)
		}
		pgtest.WaitFree(t, watch, key)
	}()

	l, err := pglock.NewLock(w.conn, key, w.opts...)
	if err != nil {
		t.Fatal(err)
	}
	faultReleaseAtEnd(t, l)
	var ctx context.Context
	var cancel context.CancelFunc
	want := context.Canceled
	switch how {
	case "deadline":
		ctx, cancel = context.WithTimeout(bg, time.Second)
		want = context.DeadlineExceeded
	case "expired": // past its deadline before Acquire is called
		ctx, cancel = context.WithDeadline(bg, time.Now().Add(-time.Second))
		want = context.DeadlineExceeded
	default:
		ctx, cancel = context.WithCancel(bg)
	}
	defer cancel()
	done := make(chan error, 1)
	called := time.Now()
	go func() { done <- l.Acquire(ctx) }()

	// pgx, and database/sql on pgx's stdlib driver, wait in the server's
	// queue: the waiter shows in pg_locks, not granted.
	switch {
	case how == "expired":
	case polls:
		time.Sleep(100 * time.Millisecond) // a few polls
	default:
		pid, ok := faultWaitWaiting(t, watch, key, done)
		if !ok {
			t.Fatal("Acquire returned before it was seen waiting in pg_locks")
		}
		if pid != w.pid {
			t.Errorf("waiting backend %d, want the caller's %d", pid, w.pid)
		}
	}
	var ended time.Time
	switch how {
	case "deadline":
		ended, _ = ctx.Deadline()
	case "expired":
		ended = called
	default:
		ended = time.Now()
		cancel()
	}
	select {
	case err = <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("Acquire did not return within 15 s of its ctx ending")
	}
	if took := time.Since(ended); took > 2*time.Second {
		t.Errorf("Acquire returned %v after its ctx ended, want < 2 s", took)
	}
	if !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, want) {
		t.Fatalf("Acquire = %v, want ErrNotAcquired and %v", err, want)
	}
	if l.Held() {
		t.Error("Held() is true after a failed Acquire")
	}
	faultNoRowFor(t, watch, key, w.pid)
	if pid := w.usable(t); pid != w.pid {
		t.Errorf("the connection was replaced (backend %d, then %d): the cancel closed it", w.pid, pid)
	}
	if !faultAlive(t, watch, w.pid) {
		t.Errorf("backend %d is gone from pg_stat_activity: the cancel closed the connection", w.pid)
	}
	w.finish(t)
	if err := l.Release(bg); err != nil {
		t.Errorf("Release after a failed Acquire = %v, want nil", err)
	}
}

// TestFaultCancelRace: the holder releases at a random moment close to the
// waiter's random deadline, so that the server often grants the lock as the
// cancel arrives. Whatever happens, Acquire's outcome and pg_locks agree: on
// nil the waiter's backend holds the key, on an error it holds nothing and a
// third lock gets the key at once. (TestFaultGrantedAsCancelArrives makes
// the grant-as-the-cancel-arrives case happen every time.)
func TestFaultCancelRace(t *testing.T) {
	t.Parallel()
	iterations := 40
	if testing.Short() {
		iterations = 10
	}
	watch := pgtest.Pool(t, 2)
	hold := pgtest.Pool(t, 4)
	for _, tg := range faultTargets() {
		t.Run(tg.name, func(t *testing.T) {
			t.Parallel()
			next := tg.setup(t)
			key := faultKey(t)
			holder, err := pglock.NewLock(hold, key)
			if err != nil {
				t.Fatal(err)
			}
			third, err := pglock.NewLock(hold, key)
			if err != nil {
				t.Fatal(err)
			}
			faultReleaseAtEnd(t, holder, third)
			var acquired, failed, givenBack, replaced int
			for i := 0; i < iterations && !t.Failed(); i++ {
				out, early := faultRaceOnce(t, next(t), watch, holder, third, key)
				switch out {
				case raceAcquired:
					acquired++
				case raceFailed:
					failed++
				case raceFailedReplaced:
					failed++
					replaced++
				}
				if early && out != raceAcquired {
					givenBack++
				}
			}
			t.Logf("%d iterations: %d acquired, %d not acquired (%d of them after the key was free before the deadline,"+
				" %d on a replaced connection)", iterations, acquired, failed, givenBack, replaced)
		})
	}
}

type raceOutcome int

const (
	raceAcquired raceOutcome = iota
	raceFailed
	raceFailedReplaced
)

// faultRaceOnce runs one attempt. early reports that the holder's release
// had returned before the waiter's deadline: on pgx, the server had then
// granted the lock to the waiting backend (the releasing backend grants it to
// the waiter), so a failed Acquire is one that had to give the lock back.
func faultRaceOnce(t *testing.T, w *faultWaiter, watch *pgxpool.Pool, holder, third *pglock.Lock, key pglock.Key) (out raceOutcome, early bool) {
	t.Helper()
	bg := context.Background()
	if err := holder.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	l, err := pglock.NewLock(w.conn, key, w.opts...)
	if err != nil {
		t.Fatal(err)
	}
	faultReleaseAtEnd(t, l)
	d := 5*time.Millisecond + rand.N(25*time.Millisecond)
	rel := d - 5*time.Millisecond + rand.N(10*time.Millisecond)
	start := time.Now()
	ctx, cancel := context.WithDeadline(bg, start.Add(d))
	released := make(chan error, 1)
	var releasedAt time.Time
	go func() {
		time.Sleep(time.Until(start.Add(rel)))
		err := holder.Release(bg)
		releasedAt = time.Now()
		released <- err
	}()
	err = l.Acquire(ctx)
	cancel()
	if rerr := <-released; rerr != nil {
		t.Fatalf("holder Release: %v", rerr)
	}
	early = releasedAt.Before(start.Add(d))

	if err == nil {
		if !l.Held() {
			t.Error("Acquire returned nil but Held() is false")
		}
		if g := pgtest.Granted(t, watch, key); len(g) != 1 || g[0].PID != w.pid {
			t.Errorf("Acquire returned nil; pg_locks holders = %+v, want only backend %d", g, w.pid)
		}
		if err := l.Release(bg); err != nil {
			t.Errorf("Release: %v", err)
		}
		w.finish(t)
		pgtest.WaitFree(t, watch, key)
		return raceAcquired, early
	}

	if !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Acquire = %v, want ErrNotAcquired and context.DeadlineExceeded", err)
	}
	if l.Held() {
		t.Error("Held() is true after a failed Acquire")
	}
	out = raceFailed
	pid := w.usable(t)
	if pid != w.pid {
		// The connection was destroyed: its backend may take a moment to
		// exit, and with it whatever it held.
		out = raceFailedReplaced
		pgtest.WaitFree(t, watch, key)
	} else if hs, herr := pgtest.Holders(bg, watch, key); herr != nil {
		t.Fatal(herr)
	} else if len(hs) != 0 {
		t.Errorf("after a failed Acquire (%v), pg_locks still has %+v (waiter backend %d)", err, hs, w.pid)
	}
	ok, err := third.TryAcquire(bg)
	if err != nil || !ok {
		t.Errorf("TryAcquire by a third lock after a failed Acquire = %v, %v; want true", ok, err)
	}
	if ok {
		if err := third.Release(bg); err != nil {
			t.Errorf("third Release: %v", err)
		}
	}
	w.finish(t)
	return out, early
}

// faultLostTarget is a pool a session lock pins a connection of.
type faultLostTarget struct {
	name  string
	open  func(t *testing.T) any
	inUse func(conn any) int
}

var faultLostTargets = []faultLostTarget{
	{
		name:  "pgxpool",
		open:  func(t *testing.T) any { return pgtest.Pool(t, 2) },
		inUse: func(c any) int { return int(c.(*pgxpool.Pool).Stat().AcquiredConns()) },
	},
	{
		name:  "sql.DB",
		open:  func(t *testing.T) any { return faultSQLDB(t) },
		inUse: func(c any) int { return c.(*sql.DB).Stats().InUse },
	},
}

// TestFaultLostTerminate: pg_terminate_backend on the backend that holds a
// session lock closes Lost() within 2 s (default check interval), Held turns
// false, Release reports ErrLockLost, and the pool recovers; inside Do, fn's
// ctx is cancelled with cause ErrLockLost.
func TestFaultLostTerminate(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	for _, tg := range faultLostTargets {
		t.Run(tg.name, func(t *testing.T) {
			t.Parallel()
			conn := tg.open(t)
			inUse := func() int { return tg.inUse(conn) }
			t.Run("release", func(t *testing.T) {
				bg := context.Background()
				l, err := pglock.NewLock(conn, faultKey(t))
				if err != nil {
					t.Fatal(err)
				}
				faultReleaseAtEnd(t, l)
				if err := l.Acquire(bg); err != nil {
					t.Fatal(err)
				}
				lost := l.Lost()
				pid := faultHolderPID(t, watch, l.Key())
				start := time.Now()
				pgtest.Terminate(t, watch, pid)
				faultWaitLost(t, lost, start, 2*time.Second)
				if l.Held() {
					t.Error("Held() is true after the lock was lost")
				}
				start = time.Now()
				err = l.Release(bg)
				if !errors.Is(err, pglock.ErrLockLost) {
					t.Errorf("Release after loss = %v, want ErrLockLost", err)
				}
				namesOnce(t, "Release after loss", err)
				if took := time.Since(start); took > 2*time.Second {
					t.Errorf("Release after loss took %v", took)
				}
				if n := inUse(); n != 0 {
					t.Errorf("%d connections still checked out after Release", n)
				}
				if err := l.Release(bg); err != nil {
					t.Errorf("second Release after loss = %v, want nil", err)
				}
				pgtest.WaitFree(t, watch, l.Key())
				faultRecovers(t, conn, watch, inUse)
			})
			t.Run("do", func(t *testing.T) {
				bg := context.Background()
				l, err := pglock.NewLock(conn, faultKey(t))
				if err != nil {
					t.Fatal(err)
				}
				testEnded := make(chan struct{})
				t.Cleanup(func() { close(testEnded) }) // lets fn return before the pool closes
				started := make(chan (<-chan struct{}), 1)
				cause := make(chan error, 1)
				doErr := make(chan error, 1)
				go func() {
					doErr <- l.Do(bg, func(ctx context.Context) error {
						started <- l.Lost()
						select {
						case <-ctx.Done():
							cause <- context.Cause(ctx)
						case <-testEnded:
							cause <- errors.New("fn's ctx not cancelled before the test ended")
						}
						return ctx.Err()
					})
				}()
				var lost <-chan struct{}
				select {
				case lost = <-started:
				case err := <-doErr:
					t.Fatalf("Do returned before fn ran: %v", err)
				}
				pid := faultHolderPID(t, watch, l.Key())
				start := time.Now()
				pgtest.Terminate(t, watch, pid)
				faultWaitLost(t, lost, start, 2*time.Second)
				if c := <-cause; !errors.Is(c, pglock.ErrLockLost) {
					t.Errorf("context.Cause of fn's ctx = %v, want ErrLockLost", c)
				}
				if took := time.Since(start); took > 2*time.Second {
					t.Errorf("fn's ctx cancelled %v after the terminate, want < 2 s", took)
				}
				if err := <-doErr; !errors.Is(err, pglock.ErrLockLost) {
					t.Errorf("Do = %v, want an error matching ErrLockLost", err)
				} else {
					namesOnce(t, "Do after loss", err)
				}
				if l.Held() {
					t.Error("Held() is true after Do")
				}
				if n := inUse(); n != 0 {
					t.Errorf("%d connections still checked out after Do", n)
				}
				pgtest.WaitFree(t, watch, l.Key())
				faultRecovers(t, conn, watch, inUse)
			})
		})
	}
}

// namesOnce fails t when err's message says a sentinel of pglock more than
// once (issue 22: "pglock: lock lost: pglock: release key ...: pglock: lock
// lost: FATAL: ..."): a chain names each sentinel once.
func namesOnce(t *testing.T, what string, err error) {
	t.Helper()
	for _, s := range []error{pglock.ErrNotAcquired, pglock.ErrLockLost, pglock.ErrNotHeld, pglock.ErrAlreadyHeld,
		pglock.ErrUnsupportedConn, pglock.ErrTransactionPooler, pglock.ErrUnavailable, pglock.ErrTooManyLocks} {
		if n := strings.Count(err.Error(), s.Error()); n > 1 {
			t.Errorf("%s = %q: says %q %d times, want once", what, err, s, n)
		}
	}
}

// faultProxied is a pool whose connections go through a fault proxy.
type faultProxied struct {
	name string
	open func(t *testing.T) (p *faultproxy.Proxy, db any, inUse func() int)
}

var faultProxiedPools = []faultProxied{
	{"pgxpool", func(t *testing.T) (*faultproxy.Proxy, any, func() int) {
		p, pool := faultProxyPool(t, 2)
		return p, pool, func() int { return int(pool.Stat().AcquiredConns()) }
	}},
	{"sql.DB", func(t *testing.T) (*faultproxy.Proxy, any, func() int) {
		p, db := faultProxySQLDB(t, 2)
		return p, db, func() int { return db.Stats().InUse }
	}},
}

// TestFaultLostProxyCut: the network between client and server is cut (both
// sides closed): Lost() closes within 2 s, Release reports ErrLockLost at
// once, the server frees the lock, and the pool makes new connections.
func TestFaultLostProxyCut(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	for _, tg := range faultProxiedPools {
		t.Run(tg.name, func(t *testing.T) {
			t.Parallel()
			bg := context.Background()
			p, db, inUse := tg.open(t)
			l, err := pglock.NewLock(db, faultKey(t), pglock.WithReleaseTimeout(time.Second))
			if err != nil {
				t.Fatal(err)
			}
			faultReleaseAtEnd(t, l)
			if err := l.Acquire(bg); err != nil {
				t.Fatal(err)
			}
			lost := l.Lost()
			faultHolderPID(t, watch, l.Key())
			start := time.Now()
			p.Cut()
			faultWaitLost(t, lost, start, 2*time.Second)
			if l.Held() {
				t.Error("Held() is true after the cut")
			}
			start = time.Now()
			if err := l.Release(bg); !errors.Is(err, pglock.ErrLockLost) {
				t.Errorf("Release after the cut = %v, want ErrLockLost", err)
			}
			if took := time.Since(start); took > time.Second+500*time.Millisecond {
				t.Errorf("Release after the cut took %v, want within the release timeout (1 s)", took)
			}
			if n := inUse(); n != 0 {
				t.Errorf("%d pool connections checked out after Release", n)
			}
			pgtest.WaitFree(t, watch, l.Key()) // the server saw its client go
			faultRecovers(t, db, watch, inUse)
		})
	}
}

// TestFaultLostProxyBlackhole: the network goes silent without closing
// anything. The lock is seen lost within two check intervals (plus slack);
// Release reports ErrLockLost within the release timeout and leaves no
// connection checked out. Meanwhile the server still believes the session
// holds the lock: that is the overlap window the documentation describes;
// it ends when the server learns the connection is gone (here, when the
// network heals and the client's close arrives).
func TestFaultLostProxyBlackhole(t *testing.T) {
	t.Parallel()
	const interval = 200 * time.Millisecond
	const releaseTimeout = time.Second
	watch := pgtest.Pool(t, 2)
	for _, tg := range faultProxiedPools {
		t.Run(tg.name, func(t *testing.T) {
			t.Parallel()
			bg := context.Background()
			p, db, inUse := tg.open(t)
			l, err := pglock.NewLock(db, faultKey(t),
				pglock.WithLostCheckInterval(interval), pglock.WithReleaseTimeout(releaseTimeout))
			if err != nil {
				t.Fatal(err)
			}
			faultReleaseAtEnd(t, l)
			if err := l.Acquire(bg); err != nil {
				t.Fatal(err)
			}
			lost := l.Lost()
			pid := faultHolderPID(t, watch, l.Key())
			start := time.Now()
			p.Blackhole()
			defer p.Restore()
			faultWaitLost(t, lost, start, 2*interval+800*time.Millisecond)
			if l.Held() {
				t.Error("Held() is true after the lock was seen lost")
			}
			start = time.Now()
			if err := l.Release(bg); !errors.Is(err, pglock.ErrLockLost) {
				t.Errorf("Release while blackholed = %v, want ErrLockLost", err)
			}
			if took := time.Since(start); took > releaseTimeout+500*time.Millisecond {
				t.Errorf("Release while blackholed took %v, want within the release timeout (%v)", took, releaseTimeout)
			}
			if n := inUse(); n != 0 {
				t.Errorf("%d pool connections checked out after Release", n)
			}
			// The overlap window: the server cannot know yet.
			if g := pgtest.Granted(t, watch, l.Key()); len(g) != 1 || g[0].PID != pid {
				t.Errorf("while blackholed, pg_locks = %+v; want the old backend %d still holding (the server cannot know)", g, pid)
			}
			p.Restore()
			pgtest.WaitFree(t, watch, l.Key())
			faultRecovers(t, db, watch, inUse)
		})
	}
}

// TestFaultCancelProxyBlackhole: a wait whose ctx ends while the network is
// silent cannot deliver its cancel request; Acquire still returns, bounded by
// the release timeout, with ErrNotAcquired and the ctx's error, and the
// connection, now in doubt, is destroyed rather than returned to the pool.
func TestFaultCancelProxyBlackhole(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	const releaseTimeout = time.Second
	watch := pgtest.Pool(t, 2)
	hold := pgtest.Pool(t, 1)
	p, pool := faultProxyPool(t, 2)
	key := faultKey(t)
	holder, err := pglock.NewLock(hold, key)
	if err != nil {
		t.Fatal(err)
	}
	faultReleaseAtEnd(t, holder)
	if err := holder.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	l, err := pglock.NewLock(pool, key, pglock.WithReleaseTimeout(releaseTimeout))
	if err != nil {
		t.Fatal(err)
	}
	faultReleaseAtEnd(t, l)
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- l.Acquire(ctx) }()
	if _, ok := faultWaitWaiting(t, watch, key, done); !ok {
		t.Fatal("Acquire returned before it was seen waiting")
	}
	p.Blackhole()
	defer p.Restore()
	start := time.Now()
	cancel()
	select {
	case err = <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("Acquire did not return within 15 s of its ctx ending on a silent network")
	}
	if took := time.Since(start); took > releaseTimeout+700*time.Millisecond {
		// pgconn's CancelRequest returns nil even when its ctx expired
		// unanswered, so the cancel request and the statement's end must
		// share one bound (interruptible, backend_pgx.go), not have one each.
		t.Errorf("core: Acquire returned %v after cancel on a silent network, want within the release timeout (%v) plus slack:"+
			" the cancel request and the end of the statement must share one bound", took, releaseTimeout)
	}
	if !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.Canceled) {
		t.Errorf("Acquire = %v, want ErrNotAcquired and context.Canceled", err)
	}
	if l.Held() {
		t.Error("Held() is true after a failed Acquire")
	}
	if n := pool.Stat().AcquiredConns(); n != 0 {
		t.Errorf("%d pool connections acquired after the failed Acquire", n)
	}
	p.Restore()
	if err := holder.Release(bg); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, key)
	faultRecovers(t, pool, watch, func() int { return int(pool.Stat().AcquiredConns()) })
}

// TestFaultGrantedAsCancelArrives makes the race of item 3 happen every
// time instead of by chance: the waiter's connection runs through a fault
// proxy; the proxy is blackholed, the holder releases (pg_locks shows the
// server granted the lock to the waiting backend), the waiter's ctx is
// cancelled (its cancel request is held by the proxy too), and the network
// heals. The grant reaches the client after its ctx ended: Acquire must
// fail with ErrNotAcquired and context.Canceled and give the lock back, and
// the connection (and the caller's transaction) must stay usable.
func TestFaultGrantedAsCancelArrives(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	hold := pgtest.Pool(t, 2)
	poolSide := func(opts ...pglock.Option) func(t *testing.T) (*faultproxy.Proxy, *faultWaiter) {
		return func(t *testing.T) (*faultproxy.Proxy, *faultWaiter) {
			p, pool := faultProxyPool(t, 1)
			return p, &faultWaiter{
				conn: pool, opts: opts, pid: faultPID(t, pool),
				usable: func(t *testing.T) int32 {
					t.Helper()
					if n := pool.Stat().AcquiredConns(); n != 0 {
						t.Errorf("pool has %d acquired connections after Acquire returned", n)
					}
					return faultPID(t, pool)
				},
				finish: func(*testing.T) {},
			}
		}
	}
	targets := []struct {
		name string
		open func(t *testing.T) (*faultproxy.Proxy, *faultWaiter)
	}{
		{"pgxpool", poolSide()},
		{"pgxpool-transaction", poolSide(pglock.WithScope(pglock.Transaction))},
		{"pgx.Conn", func(t *testing.T) (*faultproxy.Proxy, *faultWaiter) {
			p, conn := faultProxyConn(t)
			return p, &faultWaiter{
				conn: conn, pid: int32(conn.PgConn().PID()),
				usable: func(t *testing.T) int32 {
					t.Helper()
					var pid int32
					if err := conn.QueryRow(context.Background(), "SELECT pg_backend_pid()").Scan(&pid); err != nil {
						t.Errorf("caller's *pgx.Conn unusable after Acquire: %v", err)
					}
					return pid
				},
				finish: func(*testing.T) {},
			}
		}},
		{"pgx.Tx", func(t *testing.T) (*faultproxy.Proxy, *faultWaiter) {
			p, conn := faultProxyConn(t)
			return p, faultTxWaiter(t, conn)
		}},
	}
	for _, tg := range targets {
		t.Run(tg.name, func(t *testing.T) {
			t.Parallel()
			bg := context.Background()
			p, w := tg.open(t)
			key := faultKey(t)
			holder, err := pglock.NewLock(hold, key)
			if err != nil {
				t.Fatal(err)
			}
			if err := holder.Acquire(bg); err != nil {
				t.Fatal(err)
			}
			l, err := pglock.NewLock(w.conn, key, w.opts...)
			if err != nil {
				t.Fatal(err)
			}
			faultReleaseAtEnd(t, holder, l)
			ctx, cancel := context.WithCancel(bg)
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- l.Acquire(ctx) }()
			if pid, ok := faultWaitWaiting(t, watch, key, done); !ok {
				t.Fatal("Acquire returned before it was seen waiting")
			} else if pid != w.pid {
				t.Fatalf("waiting backend %d, want %d", pid, w.pid)
			}
			p.Blackhole()
			defer p.Restore()
			if err := holder.Release(bg); err != nil {
				t.Fatal(err)
			}
			if g := pgtest.Granted(t, watch, key); len(g) != 1 || g[0].PID != w.pid {
				t.Fatalf("after the holder's release, pg_locks holders = %+v; want the waiter %d (granted by the server)", g, w.pid)
			}
			cancel() // the grant is on its way, held by the proxy, and so is the cancel request
			time.Sleep(100 * time.Millisecond)
			p.Restore()
			select {
			case err = <-done:
			case <-time.After(15 * time.Second):
				t.Fatal("Acquire did not return within 15 s")
			}
			if !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.Canceled) {
				t.Errorf("Acquire = %v, want ErrNotAcquired and context.Canceled (the grant arrived after the cancel)", err)
			}
			if err == nil {
				if rerr := l.Release(bg); rerr != nil {
					t.Error(rerr)
				}
			} else {
				if l.Held() {
					t.Error("Held() is true after a failed Acquire")
				}
				if hs, err := pgtest.Holders(bg, watch, key); err != nil {
					t.Fatal(err)
				} else if len(hs) != 0 {
					t.Errorf("core: the server granted the lock as the cancel arrived and Acquire failed, yet pg_locks still has %+v", hs)
				}
			}
			if pid := w.usable(t); pid != w.pid {
				t.Errorf("the connection was replaced (backend %d, then %d)", w.pid, pid)
			}
			if !faultAlive(t, watch, w.pid) {
				t.Errorf("backend %d is gone", w.pid)
			}
			third, err := pglock.NewLock(hold, key)
			if err != nil {
				t.Fatal(err)
			}
			faultReleaseAtEnd(t, third)
			if ok, err := third.TryAcquire(bg); err != nil || !ok {
				t.Errorf("TryAcquire by a third lock = %v, %v; want true", ok, err)
			} else if err := third.Release(bg); err != nil {
				t.Error(err)
			}
			w.finish(t)
			pgtest.WaitFree(t, watch, key)
		})
	}
}

// faultReleaseAtEnd releases the locks when the test ends, before its pools
// close: a pool's Close waits for its acquired connections, so a test that
// fails while holding a lock would otherwise hang instead of failing.
func faultReleaseAtEnd(t *testing.T, locks ...*pglock.Lock) {
	t.Cleanup(func() {
		for _, l := range locks {
			_ = l.Release(context.Background())
		}
	})
}

// faultRecovers checks that conn (a pool) still makes working locks.
func faultRecovers(t *testing.T, conn any, watch *pgxpool.Pool, inUse func() int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := pglock.NewLock(conn, faultKey(t))
	if err != nil {
		t.Fatal(err)
	}
	faultReleaseAtEnd(t, l)
	if err := l.Acquire(ctx); err != nil {
		t.Fatalf("the pool does not recover: Acquire = %v", err)
	}
	if g := pgtest.Granted(t, watch, l.Key()); len(g) != 1 {
		t.Errorf("new lock: pg_locks = %+v, want one holder", g)
	}
	if err := l.Release(ctx); err != nil {
		t.Errorf("new lock: Release = %v", err)
	}
	pgtest.WaitFree(t, watch, l.Key())
	if n := inUse(); n != 0 {
		t.Errorf("%d connections checked out after the new lock's Release", n)
	}
}

func faultWaitLost(t *testing.T, lost <-chan struct{}, since time.Time, within time.Duration) {
	t.Helper()
	select {
	case <-lost:
		t.Logf("Lost() closed %v after the fault", time.Since(since).Round(time.Millisecond))
		if took := time.Since(since); took > within {
			t.Errorf("Lost() closed %v after the fault, want within %v", took, within)
		}
	case <-time.After(time.Until(since.Add(within + 10*time.Second))):
		t.Fatalf("Lost() not closed %v after the fault (want within %v)", time.Since(since), within)
	}
}

// faultKey returns a key no other test uses.
func faultKey(t *testing.T) pglock.Key {
	t.Helper()
	k, err := pglock.KeyOf(pgtest.UniqueKey(t))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func faultPID(t *testing.T, pool *pgxpool.Pool) int32 {
	t.Helper()
	var pid int32
	if err := pool.QueryRow(context.Background(), "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	return pid
}

func faultSQLPID(t *testing.T, db *sql.DB) int32 {
	t.Helper()
	var pid int32
	if err := db.QueryRowContext(context.Background(), "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	return pid
}

// faultSQLDB opens a *sql.DB (pgx's stdlib driver) with one connection, so
// that the connection a lock uses is the one the test sees.
func faultSQLDB(t *testing.T) *sql.DB {
	t.Helper()
	db, err := sql.Open("pgx", pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	t.Cleanup(func() { db.Close() })
	return db
}

func faultConnect(t *testing.T) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// faultProxyPool returns a fault proxy in front of the test server and a
// pool whose connections go through it.
func faultProxyPool(t *testing.T, maxConns int32) (*faultproxy.Proxy, *pgxpool.Pool) {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	p := faultProxy(t, cfg.ConnConfig)
	cfg.MaxConns = maxConns
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return p, pool
}

// faultProxySQLDB returns a fault proxy in front of the test server and a
// *sql.DB (pgx's stdlib driver) whose connections go through it.
func faultProxySQLDB(t *testing.T, maxConns int) (*faultproxy.Proxy, *sql.DB) {
	t.Helper()
	cfg, err := pgx.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	p := faultProxy(t, cfg)
	db := stdlib.OpenDB(*cfg)
	db.SetMaxOpenConns(maxConns)
	t.Cleanup(func() { db.Close() })
	return p, db
}

// faultProxyConn returns a fault proxy in front of the test server and a
// connection that goes through it.
func faultProxyConn(t *testing.T) (*faultproxy.Proxy, *pgx.Conn) {
	t.Helper()
	cfg, err := pgx.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	p := faultProxy(t, cfg)
	conn, err := pgx.ConnectConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return p, conn
}

// faultTxWaiter is a waiter on a caller's pgx.Tx open on conn, which did
// work (faultMark) before the lock: that work and the tx must survive a
// cancelled wait, and the tx commits at finish.
func faultTxWaiter(t *testing.T, conn *pgx.Conn) *faultWaiter {
	ctx := context.Background()
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tx.Rollback(ctx) }) // a no-op after finish
	if _, err := tx.Exec(ctx, faultMark); err != nil {
		t.Fatal(err)
	}
	return &faultWaiter{
		conn: tx, pid: int32(conn.PgConn().PID()),
		usable: func(t *testing.T) int32 {
			t.Helper()
			var mark string
			var pid int32
			if err := tx.QueryRow(ctx, faultReadMark).Scan(&mark, &pid); err != nil {
				t.Errorf("caller's pgx.Tx unusable after Acquire: %v", err)
			} else if mark != "kept" {
				t.Errorf("caller's pgx.Tx lost its earlier work (mark %q)", mark)
			}
			return pid
		},
		finish: func(t *testing.T) {
			t.Helper()
			if err := tx.Commit(ctx); err != nil {
				t.Errorf("commit of the caller's pgx.Tx: %v", err)
			}
		},
	}
}

// faultProxy starts a proxy to the server cfg names and points cfg at it.
func faultProxy(t *testing.T, cfg *pgx.ConnConfig) *faultproxy.Proxy {
	t.Helper()
	network, addr := pgconn.NetworkAddress(cfg.Host, cfg.Port)
	p, err := faultproxy.New(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	// Registered first, so it runs after the client's Close.
	t.Cleanup(func() { p.Close() })
	cfg.Host, cfg.Port = p.Host(), p.Port()
	cfg.Fallbacks = nil
	return p
}

// faultWaitWaiting waits until a session waits for key in pg_locks and
// returns its pid; ok is false when done (the waiter's result) arrives
// first, in which case the result is put back.
func faultWaitWaiting(t *testing.T, watch *pgxpool.Pool, key pglock.Key, done chan error) (pid int32, ok bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		hs, err := pgtest.Holders(context.Background(), watch, key)
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range hs {
			if !h.Granted {
				return h.PID, true
			}
		}
		select {
		case err := <-done:
			done <- err
			return 0, false
		case <-time.After(5 * time.Millisecond):
		}
	}
	t.Fatalf("no session waiting for %s in pg_locks after 10 s", key)
	return 0, false
}

// faultHolderPID returns the one backend that holds key.
func faultHolderPID(t *testing.T, watch *pgxpool.Pool, key pglock.Key) int32 {
	t.Helper()
	g := pgtest.Granted(t, watch, key)
	if len(g) != 1 {
		t.Fatalf("pg_locks holders of %s = %+v, want one", key, g)
	}
	return g[0].PID
}

// faultNoRowFor fails the test if backend pid holds or waits for key.
func faultNoRowFor(t *testing.T, watch *pgxpool.Pool, key pglock.Key, pid int32) {
	t.Helper()
	hs, err := pgtest.Holders(context.Background(), watch, key)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hs {
		if h.PID == pid {
			t.Errorf("backend %d still in pg_locks for %s after a failed Acquire: %+v", pid, key, h)
		}
	}
}

// faultAlive reports whether backend pid is still in pg_stat_activity.
func faultAlive(t *testing.T, watch *pgxpool.Pool, pid int32) bool {
	t.Helper()
	var alive bool
	err := watch.QueryRow(context.Background(),
		"SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity WHERE pid = $1)", pid).Scan(&alive)
	if err != nil {
		t.Fatal(err)
	}
	return alive
}

// A context that ends during Acquire's first, non-waiting statement does not
// interrupt it: the connection survives and, when Acquire fails, the lock is
// not held at that moment (an interrupted statement would leave a granted
// lock on a backend that has not yet seen its client go).
func TestFaultCancelDuringTry(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	watch := pgtest.Pool(t, 2)
	n := 300
	if testing.Short() {
		n = 60
	}
	// Warm the pool, so that a new connection can only mean a destroyed one.
	var warm []*pgxpool.Conn
	for range 4 {
		c, err := pool.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		warm = append(warm, c)
	}
	for _, c := range warm {
		c.Release()
	}
	failed := 0
	for i := range n {
		l, err := pglock.NewLock(pool, pgtest.UniqueKey(t))
		if err != nil {
			t.Fatal(err)
		}
		before := pool.Stat().NewConnsCount()
		c, cancel := context.WithTimeout(ctx, time.Duration(i%300)*time.Microsecond)
		err = l.Acquire(c)
		cancel()
		if err == nil {
			if err := l.Release(ctx); err != nil {
				t.Fatal(err)
			}
			continue
		}
		failed++
		if h := pgtest.Granted(t, watch, l.Key()); len(h) != 0 {
			t.Fatalf("Acquire failed (%v) yet pg_locks shows the key held: %+v", err, h)
		}
		if pool.Stat().NewConnsCount() != before {
			t.Fatalf("a cancelled Acquire cost a connection (%v)", err)
		}
	}
	t.Logf("%d of %d Acquires failed on their deadline", failed, n)
}

// When the cancel request cannot be delivered (a pooler or proxy that does not
// forward it), a wait that ctx ends is cut off by closing the connection, or,
// when the lock was granted as ctx ended, given back: a caller's connection
// that stays open never holds the lock, nor an open transaction, after a
// failed Acquire.
func TestFaultCancelRequestUndeliverable(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	cfg, err := pgx.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	holders := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	connect := func() *pgx.Conn {
		var dials atomic.Int32
		c := cfg.Copy()
		var d net.Dialer
		c.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			if dials.Add(1) > 1 {
				return nil, errors.New("no cancel requests through here")
			}
			return d.DialContext(ctx, network, addr)
		}
		conn, err := pgx.ConnectConfig(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		return conn
	}
	n := 60
	if testing.Short() {
		n = 15
	}
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		var conn *pgx.Conn
		for i := range n {
			if conn == nil || conn.IsClosed() {
				conn = connect()
				defer conn.Close(ctx)
			}
			key := pgtest.UniqueKey(t)
			holder, _ := pglock.NewLock(holders, key)
			if err := holder.Acquire(ctx); err != nil {
				t.Fatal(err)
			}
			l, _ := pglock.NewLock(conn, key, pglock.WithScope(scope), pglock.WithReleaseTimeout(500*time.Millisecond))
			c, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			go func() { done <- l.Acquire(c) }()
			time.Sleep(2 * time.Millisecond)
			released := make(chan error, 1)
			go func() { released <- holder.Release(ctx) }()
			time.Sleep(time.Duration(i%40) * 10 * time.Microsecond)
			cancel()
			err := <-done
			if rerr := <-released; rerr != nil {
				t.Fatal(rerr)
			}
			if err == nil {
				if err := l.Release(ctx); err != nil {
					t.Fatal(err)
				}
			} else if !conn.IsClosed() {
				var pid int32 = int32(conn.PgConn().PID())
				for _, h := range pgtest.Granted(t, watch, l.Key()) {
					if h.PID == pid {
						t.Fatalf("%v: Acquire failed (%v) yet the caller's live connection holds the lock", scope, err)
					}
				}
				if st := conn.PgConn().TxStatus(); st != 'I' {
					t.Fatalf("%v: the caller's connection was left in a transaction (status %c)", scope, st)
				}
			}
			pgtest.WaitFree(t, watch, l.Key())
		}
	}
}

// A lost hold of a Locker's Do and of a Leader's term: the error names
// ErrLockLost once (issue 22: a Leader's OnDeposed got "pglock: lock lost:
// pglock: release key ...: pglock: lock lost: FATAL: ...").
func TestLostErrorNamesSentinelsOnce(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	bg := context.Background()
	t.Run("Locker.Do", func(t *testing.T) {
		lk := muxLocker(t, pgtest.Pool(t, 2))
		k := faultKey(t)
		started := make(chan struct{})
		doErr := make(chan error, 1)
		go func() {
			doErr <- lk.Do(bg, k, func(ctx context.Context) error {
				close(started)
				<-ctx.Done()
				return ctx.Err()
			})
		}()
		<-started
		pgtest.Terminate(t, watch, faultHolderPID(t, watch, k))
		err := <-doErr
		if !errors.Is(err, pglock.ErrLockLost) {
			t.Fatalf("Do = %v, want ErrLockLost", err)
		}
		namesOnce(t, "Locker.Do after loss", err)
	})
	t.Run("Leader", func(t *testing.T) {
		lk := muxLocker(t, pgtest.Pool(t, 2))
		k := faultKey(t)
		ctx, cancel := context.WithCancel(bg)
		defer cancel()
		elected := make(chan struct{}, 1)
		deposed := make(chan error, 4)
		ld, err := lk.Leader(k, pglock.LeaderConfig{
			OnElected: func(context.Context) { elected <- struct{}{} },
			OnDeposed: func(why error) { deposed <- why },
		})
		if err != nil {
			t.Fatal(err)
		}
		runErr := make(chan error, 1)
		go func() {
			runErr <- ld.Run(ctx, func(ctx context.Context) error {
				<-ctx.Done()
				return ctx.Err()
			})
		}()
		<-elected
		pgtest.Terminate(t, watch, faultHolderPID(t, watch, ld.Key()))
		why := <-deposed
		if !errors.Is(why, pglock.ErrLockLost) {
			t.Errorf("OnDeposed(%v), want ErrLockLost", why)
		} else {
			namesOnce(t, "OnDeposed after loss", why)
		}
		cancel()
		<-runErr
	})
}
