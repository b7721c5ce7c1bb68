package pglock_test

// Second adversarial review of the lock connections (issue 19, after
// 35782a3). Every test names the invariant it checks in its failure message.

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// review2AppPool returns a pool whose connections (and so the lock and
// waiting connections of a Locker on it) carry a unique application_name,
// and a function counting the server sessions with that name.
func review2AppPool(t *testing.T, maxConns int32) (*pgxpool.Pool, func() int) {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("review2-%d-%d", time.Now().UnixNano()%1e9, rand.IntN(1e6))
	cfg.ConnConfig.RuntimeParams["application_name"] = name
	cfg.MaxConns = maxConns
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	watch := pgtest.Pool(t, 2)
	return pool, func() int {
		var n int
		if err := watch.QueryRow(context.Background(),
			`SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1`, name).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
}

// Invariant (DESIGN "Lock connections": the number of server sessions is a
// documented function of the options, never exceeded; Leader doc: a
// campaign's waiting connection is its own, outside WithWaitConns;
// LockerStats.WaitConns: at most WithWaitConns plus one per Leader).
//
// Found in review (fixed by mux.handsTo): a Leader's term is handed, by the release's retake (mux.give), to a local
// Acquire of the same key queued behind it: that hold now lives on the
// Leader's campaign connection, which holds no place among WithWaitConns. The
// Leader campaigns again on a new connection, and an ordinary wait takes the
// one place: 3 sessions against a budget of 1 + 1 once the Leader's Run has
// returned (Stats.WaitConns 2 against WithWaitConns 1 and no Leader).
//
// The cause was that mux.wait gives a campaign an unplaced connection (mux.go:531,
// waitConn(false) at mux.go:681), and mux.give hands an exclusive hold to the
// next local waiter by a retake on the same connection (mux.go:754,
// keyTable.handOff at keytable.go:293, now keytable.Table.HandOff) whatever
// the waiter is: the ordinary Acquire now holds a key on a connection outside
// WithWaitConns, for as long as it (and any chain of hand-offs after it)
// keeps the key. The reverse hand-
// off (a placed connection to a queued Leader) keeps a place for a whole term.
func TestLeaderHandOffKeepsSessionBudget(t *testing.T) {
	bg := context.Background()
	pool, sessions := review2AppPool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool, pglock.WithLockConns(1), pglock.WithWaitConns(1))
	names, keys := muxKeys(t, lk, 2)
	x := locktest.HoldElsewhere(t, keys[0])
	y := locktest.HoldElsewhere(t, keys[1])

	ld, err := lk.Leader(names[0], pglock.LeaderConfig{MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	elected := make(chan struct{}, 8)
	stepDown := make(chan struct{})
	runDone := make(chan error, 1)
	go func() {
		runDone <- ld.Run(ctx, func(tctx context.Context) error {
			elected <- struct{}{}
			select {
			case <-stepDown:
			case <-tctx.Done():
			}
			return nil // Run returns: the Leader no longer runs
		})
	}()
	locktest.WaitFor(t, "the Leader's campaign to wait in the server", func() bool { return locktest.Waiters(t, watch, keys[0]) == 1 })

	g, _ := lk.NewLock(names[0])
	gDone := make(chan error, 1)
	go func() { gDone <- g.Acquire(bg) }()
	locktest.WaitFor(t, "the local Acquire to queue behind the Leader", func() bool { return lk.Stats().Queued == 1 })

	if err := x.Release(bg); err != nil {
		t.Fatal(err)
	}
	<-elected
	close(stepDown) // the term ends; the release hands the key to g
	if err := <-gDone; err != nil {
		t.Fatalf("local Acquire after the Leader's term: %v", err)
	}
	if err := <-runDone; err != nil {
		t.Fatalf("Leader.Run after a term whose fn returned nil = %v", err)
	}

	h, _ := lk.NewLock(names[1])
	hDone := make(chan error, 1)
	hctx, hcancel := context.WithCancel(bg)
	go func() { hDone <- h.Acquire(hctx) }()
	locktest.WaitFor(t, "an ordinary wait in the server", func() bool { return locktest.Waiters(t, watch, keys[1]) == 1 })

	const budget = 1 + 1 // WithLockConns + WithWaitConns, no Leader running
	time.Sleep(100 * time.Millisecond)
	n, s := sessions(), lk.Stats()
	if n > budget || s.WaitConns > 1 {
		t.Errorf("INVARIANT session-budget: %d server sessions of the Locker (Stats %+v), budget WithLockConns(1)+WithWaitConns(1)+0 running Leaders = %d: the key that the Leader's release handed to a queued Acquire lives on the Leader's campaign connection, outside the places, while another wait takes the place",
			n, s, budget)
	}

	hcancel()
	<-hDone
	cancel()
	_ = g.Release(bg)
	_ = y.Release(bg)
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}
}

// Invariant (ErrUnavailable, issue 19 item 11): a server that cannot be
// reached fails an acquire with ErrUnavailable, never with an error that
// reads as a busy key (context.DeadlineExceeded) while the caller's context
// is live; and a failed first setup is started again by the next caller.
//
// Found in review (fixed in mux.connect): a cold Locker whose first connect runs into the pool's ConnectTimeout (a
// network that drops packets) returns ErrNotAcquired wrapping
// context.DeadlineExceeded, without ErrUnavailable, to a caller with 10 s
// left: pgx's connect error wraps the connect bound's DeadlineExceeded, and
// unavailable() (transient.go:26) refuses every error that matches it.
func TestConnectTimeoutIsUnavailable(t *testing.T) {
	bg := context.Background()
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	p := faultProxy(t, cfg.ConnConfig)
	cfg.ConnConfig.ConnectTimeout = 300 * time.Millisecond
	pool, err := pgxpool.NewWithConfig(bg, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, pool)
	name := pgtest.UniqueKey(t)

	p.Blackhole()
	ctx, cancel := context.WithTimeout(bg, 10*time.Second)
	defer cancel()
	l, _ := lk.NewLock(name)
	err = l.Acquire(ctx)
	if err == nil {
		t.Fatal("Acquire through a blackholed network succeeded")
	}
	if !errors.Is(err, pglock.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("INVARIANT unreachable-is-ErrUnavailable: Acquire (caller's context live, 10 s) on a cold Locker whose connect timed out = %v; errors.Is ErrUnavailable %v, context.DeadlineExceeded %v (reads as a busy key)",
			err, errors.Is(err, pglock.ErrUnavailable), errors.Is(err, context.DeadlineExceeded))
	}
	p.Restore()
	// The failed setup runs again for the next caller.
	if err := l.Acquire(ctx); err != nil {
		t.Fatalf("INVARIANT failed-init-restarts: Acquire after the network came back = %v", err)
	}
	if err := l.Release(bg); err != nil {
		t.Error(err)
	}
	pgtest.WaitFree(t, watch, l.Key())
}

// hiddenDriver is pgx's database/sql driver behind a connection type that
// does not expose the *pgx.Conn: to the Locker it is "another driver"
// (lib/pq), so a Locker on it keeps one connection per hold (mux.perHold).
type hiddenDriver struct{ inner driver.Driver }

type hiddenConn struct{ c driver.Conn }

func (d hiddenDriver) Open(name string) (driver.Conn, error) {
	c, err := d.inner.Open(name)
	if err != nil {
		return nil, err
	}
	return &hiddenConn{c}, nil
}

func (h *hiddenConn) Prepare(q string) (driver.Stmt, error) { return h.c.Prepare(q) }
func (h *hiddenConn) Close() error                          { return h.c.Close() }

//lint:ignore SA1019 driver.Conn requires Begin; database/sql calls BeginTx
func (h *hiddenConn) Begin() (driver.Tx, error) { return h.c.Begin() }
func (h *hiddenConn) BeginTx(ctx context.Context, o driver.TxOptions) (driver.Tx, error) {
	return h.c.(driver.ConnBeginTx).BeginTx(ctx, o)
}
func (h *hiddenConn) PrepareContext(ctx context.Context, q string) (driver.Stmt, error) {
	return h.c.(driver.ConnPrepareContext).PrepareContext(ctx, q)
}
func (h *hiddenConn) ExecContext(ctx context.Context, q string, a []driver.NamedValue) (driver.Result, error) {
	return h.c.(driver.ExecerContext).ExecContext(ctx, q, a)
}
func (h *hiddenConn) QueryContext(ctx context.Context, q string, a []driver.NamedValue) (driver.Rows, error) {
	return h.c.(driver.QueryerContext).QueryContext(ctx, q, a)
}
func (h *hiddenConn) Ping(ctx context.Context) error { return h.c.(driver.Pinger).Ping(ctx) }
func (h *hiddenConn) ResetSession(ctx context.Context) error {
	return h.c.(driver.SessionResetter).ResetSession(ctx)
}
func (h *hiddenConn) IsValid() bool {
	if v, ok := h.c.(driver.Validator); ok {
		return v.IsValid()
	}
	return true
}
func (h *hiddenConn) CheckNamedValue(v *driver.NamedValue) error {
	if c, ok := h.c.(driver.NamedValueChecker); ok {
		return c.CheckNamedValue(v)
	}
	return driver.ErrSkip
}

var registerHidden sync.Once

func review2OtherDriverDB(t *testing.T) *sql.DB {
	t.Helper()
	registerHidden.Do(func() { sql.Register("review2-other", hiddenDriver{stdlib.GetDefaultDriver()}) })
	db, err := sql.Open("review2-other", pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(4)
	t.Cleanup(func() { db.Close() })
	return db
}

// Invariant (Locker.Close: "makes ... the acquires of its Locks fail with
// ErrLockerClosed"; issue 19 item 10): an Acquire with a live context that
// is waiting when the Locker is closed fails with ErrLockerClosed, and holds
// nothing. On a *sql.DB with another driver (mux.perHold, one connection per
// hold), Close does not reach the wait: it goes on polling and takes the key
// once it is freed, after Close, and returns nil (Held true).
//
// Found in review (fixed by perHoldBackend); the cause was that mux.open hands a per-hold Locker's acquires to sqlSource
// (mux.go:100), whose polling wait (backend_sql.go:201-221) watches only the
// caller's context; mux.close (cancelClosing, closing every lock connection)
// has nothing of the per-hold holds or waits to close, and Lock.acquire
// checks the Locker's closed flag only before it starts (lock.go:243).
func TestCloseInterruptsPerHoldWait(t *testing.T) {
	bg := context.Background()
	db := review2OtherDriverDB(t)
	watch := pgtest.Pool(t, 2)
	lk, err := pglock.NewLocker(db)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	name := pgtest.UniqueKey(t)
	key := locktest.Key(t, lk, name)
	// Warm: the Locker has found out its driver.
	if err := lk.Do(bg, name+":warm", func(context.Context) error { return nil }); err != nil {
		t.Fatal(err)
	}
	x := locktest.HoldElsewhere(t, key)
	l, _ := lk.NewLock(name)
	done := make(chan error, 1)
	go func() { done <- l.Acquire(bg) }()
	time.Sleep(300 * time.Millisecond)
	_ = lk.Close()
	var got error
	select {
	case got = <-done:
	case <-time.After(time.Second):
		_ = x.Release(bg) // free the key: does the closed Locker take it?
		select {
		case got = <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("Acquire still waiting 6 s after Close")
		}
	}
	if got == nil || !errors.Is(got, pglock.ErrLockerClosed) {
		t.Errorf("INVARIANT close-is-ErrLockerClosed: Acquire(Background) waiting on a Locker on *sql.DB (non-pgx driver, one connection per hold) when it was closed = %v (held %v); want ErrLockerClosed",
			got, l.Held())
	}
	if l.Held() {
		_ = l.Release(bg)
	}
	_ = x.Release(bg)
	pgtest.WaitFree(t, watch, key)
}
