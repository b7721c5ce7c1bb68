package pglock_test

// Adversarial review of endSession (a session the Locker closes is gone
// from the server when the close returns), of the Transaction-scope bound
// read once per connection (checkPrimary, Lock.ownTxBegin) and of the key
// table / mux refactor. Each TestReview27* test names the defect it shows,
// or, marked HELD, what it checks that held up.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// r27Pool is a pool on the test server with application_name app (when not
// ""), maxConns connections and edit applied, closed when the test ends; the
// PIDs of its own connections are recorded in pids (the Locker's lock and
// waiting connections are not pool connections: AfterConnect does not run
// for them).
func r27Pool(t testing.TB, u, app string, maxConns int32, pids *sync.Map, edit func(*pgxpool.Config)) *pgxpool.Pool {
	t.Helper()
	return pgtest.PoolWith(t, u, maxConns, func(cfg *pgxpool.Config) {
		if app != "" {
			cfg.ConnConfig.RuntimeParams["application_name"] = app
		}
		if edit != nil {
			edit(cfg)
		}
		if pids != nil {
			after := cfg.AfterConnect
			cfg.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
				pids.Store(int32(c.PgConn().PID()), true)
				if after != nil {
					return after(ctx, c)
				}
				return nil
			}
		}
	})
}

// r27HeldElsewhere returns a fresh key held by a session of another pool
// until the test ends: a Leader's campaign on it waits.
func r27HeldElsewhere(t *testing.T) string {
	t.Helper()
	key := pgtest.UniqueKey(t)
	ol, err := pglock.NewLock(pgtest.Pool(t, 1), key)
	if err != nil {
		t.Fatal(err)
	}
	if err := ol.Acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ol.Release(context.Background()) })
	return key
}

// r27PoolNamed names the pool's own connections app+"/pool" (the Locker's
// connections, made from the pool's configuration without its
// BeforeConnect, keep app): a pool connection still connecting, whose PID
// its AfterConnect has not recorded yet, is not counted as the Locker's.
func r27PoolNamed(app string) func(*pgxpool.Config) {
	return func(cfg *pgxpool.Config) { pgtest.NameSessions(cfg, app) }
}

// r27LockerSessions returns the PIDs of the client backends named app that
// are not pool connections (pids): the Locker's own sessions.
func r27LockerSessions(t testing.TB, watch *pgxpool.Pool, app string, pids *sync.Map) []int32 {
	t.Helper()
	rows, err := watch.Query(context.Background(),
		`SELECT pid FROM pg_catalog.pg_stat_activity WHERE backend_type = 'client backend' AND application_name = $1`, app)
	if err != nil {
		t.Fatal(err)
	}
	all, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		t.Fatal(err)
	}
	var own []int32
	for _, pid := range all {
		if _, pool := pids.Load(pid); !pool {
			own = append(own, pid)
		}
	}
	return own
}

// r27Describe says what the server shows of the sessions pids.
func r27Describe(t testing.TB, watch *pgxpool.Pool, pids []int32) string {
	t.Helper()
	rows, err := watch.Query(context.Background(), `
		SELECT pid, coalesce(state, ''), left(query, 90), (now() - backend_start)::text FROM pg_catalog.pg_stat_activity WHERE pid = ANY($1)`, pids)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out string
	for rows.Next() {
		var pid int32
		var state, query, age string
		if err := rows.Scan(&pid, &state, &query, &age); err != nil {
			t.Fatal(err)
		}
		out += fmt.Sprintf(" [pid %d, %s, age %s: %q]", pid, state, age, query)
	}
	return out
}

// r27AdvisoryOf counts the advisory locks held or awaited by the backends
// named app.
func r27AdvisoryOf(t testing.TB, watch *pgxpool.Pool, app string) int {
	t.Helper()
	var n int
	if err := watch.QueryRow(context.Background(), `
		SELECT count(*) FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a USING (pid)
		WHERE l.locktype = 'advisory' AND a.application_name = $1`, app).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// r27Show runs SHOW idle_in_transaction_session_timeout in the work's
// transaction (TxFromContext).
func r27Show(ctx context.Context) (string, error) {
	tx, ok := pglock.TxFromContext(ctx)
	if !ok {
		return "", errors.New("no transaction in the work's context")
	}
	var v string
	err := tx.QueryRow(ctx, "SHOW idle_in_transaction_session_timeout").Scan(&v)
	return v, err
}

// DEFECT (fixed): the Transaction-scope hold reads whether the session has an
// idle_in_transaction_session_timeout of its own once per connection (at
// the primary check) and trusts it for the connection's whole life. But a
// session's setting does change: a plain SET (by the work of an earlier
// hold, or by any other user of the pool's connection) outlives the
// transaction. A pool whose connections start with a bound of their own
// (RuntimeParams), one of whose users sets it to 0 for the session, then
// gets Transaction-scope holds with no bound at all: the cached "own"
// sends the plain "BEGIN; SELECT pg_advisory_xact_lock(k)", and a frozen
// holder keeps its lock forever, where before this change (the setting was
// read in the lock statement) the hold got AbandonedTransactionTimeout.
func TestReview27TxBoundStaleAfterSessionSET(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	pool := r27Pool(t, pgtest.URL(t), "", 1, nil, func(c *pgxpool.Config) {
		c.ConnConfig.RuntimeParams["idle_in_transaction_session_timeout"] = "10min"
	})
	l, err := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(bg, 10*time.Second)
	defer cancel()
	// The first hold: the connection is checked (its own bound: 10min, kept).
	var first string
	if err := l.Do(ctx, func(ctx context.Context) error {
		first, err = r27Show(ctx)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if first != "10min" {
		t.Fatalf("the first hold's transaction has idle_in_transaction_session_timeout %q, want the session's own 10min", first)
	}
	// Another user of the pool's (only) connection turns the session's
	// bound off.
	if _, err := pool.Exec(ctx, "SET idle_in_transaction_session_timeout = 0"); err != nil {
		t.Fatal(err)
	}
	var second string
	if err := l.Do(ctx, func(ctx context.Context) error {
		second, err = r27Show(ctx)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if second == "0" {
		t.Errorf("a Transaction-scope hold on a session whose own bound was set to 0 since the connection was checked runs with no bound at all"+
			" (idle_in_transaction_session_timeout %q in its transaction, want %v): the per-connection cache of primaryTxSQL is stale,"+
			" and a frozen holder keeps the lock forever", second, pglock.AbandonedTransactionTimeout)
	}
}

// HELD: a pool whose AfterConnect sets the session's bound: the hold keeps
// it; one whose sessions have none gets AbandonedTransactionTimeout; a
// Transaction-scope Lock reused across holds that land on connections of
// both kinds gets the right statement each time (ownTxBegin's cache,
// keyed by beginFor).
func TestReview27TxBoundPerConnection(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	var n atomic.Int32
	pool := r27Pool(t, pgtest.URL(t), "", 2, nil, func(c *pgxpool.Config) {
		c.AfterConnect = func(ctx context.Context, conn *pgx.Conn) error {
			if n.Add(1)%2 == 1 {
				_, err := conn.Exec(ctx, "SET idle_in_transaction_session_timeout = '7min'")
				return err
			}
			return nil
		}
	})
	// Two connections: the first with its own bound, the second without.
	c1, err := pool.Acquire(bg)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := pool.Acquire(bg)
	if err != nil {
		t.Fatal(err)
	}
	pid1, pid2 := c1.Conn().PgConn().PID(), c2.Conn().PgConn().PID()
	c1.Release()
	c2.Release()
	l, err := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(bg, 20*time.Second)
	defer cancel()
	want := map[uint32]string{pid1: "7min", pid2: "1min"}
	seen := map[uint32]int{}
	for i := range 12 {
		// Pin one connection so that the hold lands on the other.
		a, err := pool.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		b, err := pool.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		pinned := a
		if (a.Conn().PgConn().PID() == pid1) == (i%2 == 0) {
			pinned = b
		}
		if pinned == a {
			b.Release()
		} else {
			a.Release()
		}
		try := i%3 == 2
		var got string
		var pid uint32
		work := func(ctx context.Context) error {
			tx, _ := pglock.TxFromContext(ctx)
			pid = tx.Conn().PgConn().PID()
			got, err = r27Show(ctx)
			return err
		}
		if try {
			ok, err := l.TryDo(ctx, work)
			if err != nil || !ok {
				t.Fatalf("TryDo: %v %v", ok, err)
			}
		} else if err := l.Do(ctx, work); err != nil {
			t.Fatal(err)
		}
		pinned.Release()
		seen[pid]++
		if w, ok := want[pid]; !ok || got != w {
			t.Errorf("hold %d (try %v) on backend %d: idle_in_transaction_session_timeout %q in its transaction, want %q", i, try, pid, got, w)
		}
		// After the hold, the session's own setting is as it was.
		c, err := pool.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var after string
		if err := c.QueryRow(ctx, "SHOW idle_in_transaction_session_timeout").Scan(&after); err != nil {
			t.Fatal(err)
		}
		if p := c.Conn().PgConn().PID(); (p == pid1 && after != "7min") || (p == pid2 && after != "0") {
			t.Errorf("after hold %d, backend %d has idle_in_transaction_session_timeout %q for the session", i, p, after)
		}
		c.Release()
	}
	if len(seen) != 2 {
		t.Errorf("holds landed on %v only, want both connections", seen)
	}
}

// HELD: Transaction-scope waits cancelled at random moments (the SET LOCAL
// now comes before the wait, in the same statement) leave nothing behind:
// the pool's connection is idle, out of any transaction, holds no advisory
// lock, and its session's bound is what it was.
func TestReview27TxWaitCancelLeavesNothing(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	app := "r27-txcancel-" + randomSuffix()
	watch := pgtest.Pool(t, 2)
	for _, own := range []bool{false, true} {
		pool := r27Pool(t, pgtest.URL(t), app, 1, nil, func(c *pgxpool.Config) {
			if own {
				c.ConnConfig.RuntimeParams["idle_in_transaction_session_timeout"] = "9min"
			}
		})
		wantSession := "0"
		if own {
			wantSession = "9min"
		}
		key := pgtest.UniqueKey(t)
		blocker, err := pglock.NewLock(watch, key)
		if err != nil {
			t.Fatal(err)
		}
		if err := blocker.Acquire(bg); err != nil {
			t.Fatal(err)
		}
		l, err := pglock.NewLock(pool, key, pglock.WithScope(pglock.Transaction))
		if err != nil {
			t.Fatal(err)
		}
		for i := range 30 {
			d := time.Duration(rand.IntN(3000)) * time.Microsecond
			ctx, cancel := context.WithTimeout(bg, d)
			err := l.Acquire(ctx)
			cancel()
			if err == nil {
				t.Fatalf("own %v round %d: acquired a key another session holds", own, i)
			}
			c, err := pool.Acquire(bg)
			if err != nil {
				t.Fatal(err)
			}
			var setting string
			var locks int
			if err := c.QueryRow(bg, `SELECT current_setting('idle_in_transaction_session_timeout'),
				(SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())`).Scan(&setting, &locks); err != nil {
				t.Fatal(err)
			}
			st := c.Conn().PgConn().TxStatus()
			c.Release()
			if setting != wantSession || locks != 0 || st != 'I' {
				t.Errorf("own %v round %d (cancel after %v): the pool's connection has idle_in_transaction_session_timeout %q (want %q), %d advisory locks, tx status %c",
					own, i, d, setting, wantSession, locks, st)
			}
		}
		if err := blocker.Release(bg); err != nil {
			t.Fatal(err)
		}
		// With the key free, a hold works and has the bound.
		ctx, cancel := context.WithTimeout(bg, 5*time.Second)
		var got string
		if err := l.Do(ctx, func(ctx context.Context) error {
			got, err = r27Show(ctx)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		cancel()
		want := "1min"
		if own {
			want = "9min"
		}
		if got != want {
			t.Errorf("own %v: the hold's transaction has %q, want %q", own, got, want)
		}
	}
	if n := r27AdvisoryOf(t, watch, app); n != 0 {
		t.Errorf("%d advisory locks left", n)
	}
}

// r27Contender holds keys from another "process" (its own Locker) for
// short spells, so that the Locker under test waits in the server's queue on
// waiting connections, until stop is closed.
func r27Contender(t *testing.T, keys []string, stop <-chan struct{}, wg *sync.WaitGroup) {
	other := muxLocker(t, pgtest.Pool(t, 4))
	for _, k := range keys {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				_ = other.Do(ctx, k, func(ctx context.Context) error {
					select {
					case <-time.After(time.Duration(1+rand.IntN(15)) * time.Millisecond):
					case <-stop:
					}
					return nil
				})
				cancel()
				time.Sleep(time.Duration(rand.IntN(5)) * time.Millisecond)
			}
		})
	}
}

// HELD: Locker.Close racing every kind of call on many goroutines, with
// another process contending for the keys (so that waits run on waiting
// connections) and callers cancelling: Close and every call return, no
// race, no panic, no goroutine left (TestMain), and once Close has returned
// no advisory lock of the Locker's sessions is left on the server. A session
// of a connect under way may outlive Close by a few milliseconds (the
// defect TestReview27CloseDuringConnect shows); here each must be gone
// within 200 ms.
func TestReview27CloseStorm(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	keys := r26Keys(t, 6)
	stop := make(chan struct{})
	var cwg sync.WaitGroup
	r27Contender(t, keys[:3], stop, &cwg)
	defer func() { close(stop); cwg.Wait() }()
	const rounds = 12
	var bad []string
	for r := range rounds {
		app := "r27-storm-" + randomSuffix()
		var pids sync.Map
		pool := r27Pool(t, pgtest.URL(t), app, 6, &pids, nil)
		lk, err := pglock.NewLocker(pool, pglock.WithWaitConns(2), pglock.WithLockConns(2))
		if err != nil {
			t.Fatal(err)
		}
		sem, err := lk.Semaphore(keys[5], 2)
		if err != nil {
			t.Fatal(err)
		}
		ld, err := lk.Leader(keys[4], pglock.LeaderConfig{Identity: "r27", MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		ctx, cancelAll := context.WithCancel(bg)
		var calls atomic.Int64
		for g := range 16 {
			wg.Go(func() {
				for i := 0; ctx.Err() == nil; i++ {
					calls.Add(1)
					k := keys[(g+i)%4]
					cctx, cancel := context.WithTimeout(ctx, time.Duration(1+rand.IntN(40))*time.Millisecond)
					switch (g + i) % 6 {
					case 0, 1:
						l, err := lk.NewLock(k)
						if err != nil {
							if !errors.Is(err, pglock.ErrLockerClosed) {
								t.Error(err)
							}
							cancel()
							return
						}
						if l.Acquire(cctx) == nil {
							time.Sleep(time.Duration(rand.IntN(3)) * time.Millisecond)
							_ = l.Release(bg)
						}
					case 2:
						_ = lk.Do(cctx, k, func(context.Context) error { return nil })
					case 3:
						l, err := lk.NewLock(k, pglock.WithMode(pglock.Shared))
						if err != nil {
							if !errors.Is(err, pglock.ErrLockerClosed) {
								t.Error(err)
							}
							cancel()
							return
						}
						if ok, _ := l.TryAcquire(cctx); ok {
							_ = l.Release(bg)
						}
					case 4:
						_ = sem.Do(cctx, func(context.Context) error { return nil })
					case 5:
						_ = lk.DoAll(cctx, []any{keys[(g+i)%4], keys[(g+i+1)%4]}, func(context.Context) error { return nil })
					}
					cancel()
					if errors.Is(ctx.Err(), context.Canceled) {
						return
					}
				}
			})
		}
		wg.Go(func() { _ = ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) })
		time.Sleep(time.Duration(20+rand.IntN(200)) * time.Millisecond)
		closed := make(chan error, 1)
		go func() { closed <- lk.Close() }()
		select {
		case err := <-closed:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: Close did not return within 5 s", r)
		}
		left := r27LockerSessions(t, watch, app, &pids)
		locks := r27AdvisoryOf(t, watch, app)
		what := ""
		if len(left) > 0 {
			what = r27Describe(t, watch, left)
		}
		st := lk.Stats()
		cancelAll()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: calls still running 5 s after Close and their cancel", r)
		}
		if len(left) > 0 && locks == 0 {
			t.Logf("round %d: just after Close, %d sessions of connects under way:%s", r, len(left), what)
			deadline := time.Now().Add(200 * time.Millisecond)
			for len(left) > 0 && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
				left = r27LockerSessions(t, watch, app, &pids)
			}
		}
		if len(left) > 0 || locks > 0 {
			bad = append(bad, fmt.Sprintf("round %d: just after Close: %d of the Locker's sessions on the server (%v), %d advisory locks of them; Stats %+v (calls %d):%s",
				r, len(left), left, locks, st, calls.Load(), what))
		}
		pool.Close()
	}
	for _, b := range bad {
		t.Error(b)
	}
	if len(bad) > 0 {
		t.Errorf("%d of %d rounds: Close returned while sessions it should have ended were still on the server", len(bad), rounds)
	}
}

// r27HoldMany takes keys on lk from goroutines at once (so that some go to
// every lock connection), and keys that watch holds first (so that they are
// waited for, and then held, on waiting connections); it returns the keys
// held.
func r27HoldMany(t *testing.T, lk *pglock.Locker, watch *pgxpool.Pool, n, waited int) []pglock.Key {
	t.Helper()
	bg := context.Background()
	names := r26Keys(t, n+waited)
	var mu sync.Mutex
	var held []pglock.Key
	var wg sync.WaitGroup
	for i, k := range names {
		l, err := lk.NewLock(k)
		if err != nil {
			t.Fatal(err)
		}
		var release func()
		if i >= n {
			// Held by another session first: the Locker waits in the server.
			ol, err := pglock.NewLock(watch, k)
			if err != nil {
				t.Fatal(err)
			}
			if err := ol.Acquire(bg); err != nil {
				t.Fatal(err)
			}
			release = func() { _ = ol.Release(bg) }
		}
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(bg, 10*time.Second)
			defer cancel()
			if err := l.Acquire(ctx); err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			held = append(held, l.Key())
			mu.Unlock()
		})
		if release != nil {
			time.Sleep(20 * time.Millisecond) // let the wait start
			release()
		}
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	return held
}

// r27Busy returns the keys of ks that a session (watch's) cannot take now.
func r27Busy(t testing.TB, watch *pgxpool.Pool, ks []pglock.Key) []pglock.Key {
	t.Helper()
	var busy []pglock.Key
	for _, k := range ks {
		var free bool
		if err := watch.QueryRow(context.Background(), `SELECT pg_try_advisory_lock($1) AND pg_advisory_unlock($1)`, k.Int64()).Scan(&free); err != nil {
			t.Fatal(err)
		}
		if !free {
			busy = append(busy, k)
		}
	}
	return busy
}

// DEFECT (fixed: a connection through a pooler gives back its locks with
// pg_advisory_unlock_all() before Terminate): through PgBouncer in session mode, "when Close returns, another process
// can take the Locker's keys at once" rests on PgBouncer: endSession's
// Terminate reaches PgBouncer, which closes the client socket at once and
// only then resets the server connection it keeps (server_reset_query,
// DISCARD ALL, which unlocks the advisory locks). endSession's EOF then says
// nothing of the server's locks: in about one Close of ten, some or all of
// its keys are still held for 1-6 ms after Close returns.
func TestReview27PgBouncerCloseFreesKeys(t *testing.T) {
	t.Parallel()
	b := pgtest.StartPgBouncerT(t, "session", 20)
	watch := pgtest.Pool(t, 2)
	const rounds = 40
	late := 0
	for r := range rounds {
		pool := r27Pool(t, b.URL, "", 4, nil, nil)
		lk, err := pglock.NewLocker(pool, pglock.WithLockConns(2), pglock.WithWaitConns(2))
		if err != nil {
			t.Fatal(err)
		}
		held := r27HoldMany(t, lk, watch, 6, 2)
		if err := lk.Close(); err != nil {
			t.Fatal(err)
		}
		busy := r27Busy(t, watch, held)
		if len(busy) > 0 {
			late++
			start := time.Now()
			for len(r27Busy(t, watch, busy)) > 0 && time.Since(start) < 5*time.Second {
				time.Sleep(time.Millisecond)
			}
			t.Logf("round %d: just after Close, %d of its %d keys still held in the server (free %v later)", r, len(busy), len(held), time.Since(start))
		}
		pool.Close()
	}
	if late > 0 {
		t.Errorf("through PgBouncer (session mode), %d of %d Closes returned before the server freed the keys: endSession's EOF is PgBouncer's, not the server's", late, rounds)
	}
}

// FIXED: Close racing a cold Locker's first calls. Close ended the
// connections it had, but not a connect under way (lockConn.dial): it cut
// it off and returned; a connect cut mid-way was closed by pgx, one that
// finished by the dial goroutine with a plain Close, both after Close had
// returned, and a lock connection whose first statement Close's cancel cut
// short (pgx's asynchronous close) was not waited for either. In a third of
// the rounds a session of the Locker was still on the server just after
// Close. Now Close waits until every session the Locker started is ended
// (mux.waitSessions): connects under way finish and are ended with
// endSession (cut off only after a second on a silent network), and a
// session pgx closes is counted out when pgx has read it to its end.
// Measured: 6 and 7 of 30 rounds before, 0 of 30 in 15 runs after. The
// pool's own connections are named apart (r27PoolNamed): one still
// connecting has no recorded PID yet.
func TestReview27CloseDuringConnect(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	holders := pgtest.Pool(t, 2)
	keys := r26Keys(t, 4)
	// Keys held elsewhere: the Locker's acquires go to waiting connections.
	for _, k := range keys[2:] {
		ol, err := pglock.NewLock(holders, k)
		if err != nil {
			t.Fatal(err)
		}
		if err := ol.Acquire(bg); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = ol.Release(bg) })
	}
	const rounds = 30
	var bad []string
	for r := range rounds {
		app := "r27-cold-" + randomSuffix()
		var pids sync.Map
		pool := r27Pool(t, pgtest.URL(t), app, 4, &pids, r27PoolNamed(app))
		lk, err := pglock.NewLocker(pool, pglock.WithLockConns(2), pglock.WithWaitConns(2))
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for _, k := range keys {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(bg, 5*time.Second)
				defer cancel()
				_ = lk.Do(ctx, k, func(context.Context) error { return nil })
			})
		}
		time.Sleep(time.Duration(rand.IntN(12000)) * time.Microsecond)
		if err := lk.Close(); err != nil {
			t.Fatal(err)
		}
		left := r27LockerSessions(t, watch, app, &pids)
		wg.Wait()
		if len(left) > 0 {
			// Still there a moment later?
			what := r27Describe(t, watch, left)
			time.Sleep(50 * time.Millisecond)
			later := r27LockerSessions(t, watch, app, &pids)
			bad = append(bad, fmt.Sprintf("round %d: just after Close, %d of the Locker's sessions on the server (%d 50 ms later):%s", r, len(left), len(later), what))
		}
		pool.Close()
	}
	for _, b := range bad {
		t.Log(b)
	}
	if len(bad) > 0 {
		t.Errorf("%d of %d Closes of a Locker that was connecting returned with sessions of its own still on the server", len(bad), rounds)
	}
}

// HELD: lock connections and waiting connections killed by
// pg_terminate_backend just before Close: Close returns at once (endSession
// meets a socket the server closed), every Lost closes, nothing is left.
func TestReview27TerminatedBeforeClose(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	for r := range 5 {
		app := "r27-term-" + randomSuffix()
		var pids sync.Map
		pool := r27Pool(t, pgtest.URL(t), app, 4, &pids, nil)
		lk, err := pglock.NewLocker(pool, pglock.WithLockConns(2), pglock.WithWaitConns(2))
		if err != nil {
			t.Fatal(err)
		}
		held := r27HoldMany(t, lk, watch, 6, 2)
		own := r27LockerSessions(t, watch, app, &pids)
		// Kill some (every other) without waiting for them to go.
		for i, pid := range own {
			if (i+r)%2 == 0 {
				if _, err := watch.Exec(context.Background(), "SELECT pg_terminate_backend($1)", pid); err != nil {
					t.Fatal(err)
				}
			}
		}
		start := time.Now()
		if err := lk.Close(); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		if took > 500*time.Millisecond {
			t.Errorf("round %d: Close took %v with some sessions terminated just before", r, took)
		}
		if left := r27LockerSessions(t, watch, app, &pids); len(left) > 0 {
			t.Errorf("round %d: %d sessions left after Close", r, len(left))
		}
		if busy := r27Busy(t, watch, held); len(busy) > 0 {
			t.Errorf("round %d: %d keys still held after Close", r, len(busy))
		}
		pool.Close()
	}
}

// HELD: the session budget as the server counts it: under bursts of waits with
// cancels (waiting connections given up and replaced), the Locker's
// sessions on the server never exceed Stats().MaxSessions.
func TestReview27BudgetUnderCancels(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	app := "r27-budget-" + randomSuffix()
	var pids sync.Map
	pool := r27Pool(t, pgtest.URL(t), app, 4, &pids, nil)
	const lockConns, waitConns = 1, 2
	lk := muxLocker(t, pool, pglock.WithLockConns(lockConns), pglock.WithWaitConns(waitConns))
	keys := r26Keys(t, 8)
	stop := make(chan struct{})
	var cwg sync.WaitGroup
	r27Contender(t, keys, stop, &cwg)
	ctx, cancel := context.WithCancel(bg)
	var wg sync.WaitGroup
	for g := range 24 {
		wg.Go(func() {
			for i := 0; ctx.Err() == nil; i++ {
				k := keys[(g+i)%len(keys)]
				cctx, c := context.WithTimeout(ctx, time.Duration(rand.IntN(30))*time.Millisecond)
				_ = lk.Do(cctx, k, func(context.Context) error { return nil })
				c()
			}
		})
	}
	deadline := time.Now().Add(4 * time.Second)
	worst, samples := 0, 0
	for time.Now().Before(deadline) {
		n := len(r27LockerSessions(t, watch, app, &pids))
		samples++
		if n > worst {
			worst = n
		}
	}
	cancel()
	wg.Wait()
	close(stop)
	cwg.Wait()
	max := lockConns + waitConns
	t.Logf("worst %d sessions of the Locker on the server in %d samples (budget %d)", worst, samples, max)
	if worst > max {
		t.Errorf("the Locker had %d sessions on the server at once, over its budget of %d (WithLockConns + WithWaitConns)", worst, max)
	}
}

// HELD (a suspected window not hit): a Leader's campaign connection is
// never kept: when its campaign ends
// (its Run's context cancelled) lockconn's PutWaitConn takes it out of the Locker's
// busy set and then closes it, waiting for the server (endSession). A Close
// that comes in between does not see it, and returns while that session is
// still on the server. 30 rounds with Close 0-8 ms after the cancel never
// caught it: the cancel's round trip keeps the connection in the busy set
// until Close has taken it.
func TestReview27CloseRacingCampaignEnd(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	key := r27HeldElsewhere(t)
	const rounds = 30
	var bad []string
	for r := range rounds {
		app := "r27-campaign-" + randomSuffix()
		var pids sync.Map
		pool := r27Pool(t, pgtest.URL(t), app, 4, &pids, r27PoolNamed(app))
		lk, err := pglock.NewLocker(pool)
		if err != nil {
			t.Fatal(err)
		}
		ld, err := lk.Leader(key, pglock.LeaderConfig{Identity: app, MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(bg)
		ran := make(chan error, 1)
		go func() { ran <- ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) }()
		// Wait until the campaign waits in the server.
		deadline := time.Now().Add(5 * time.Second)
		for lk.Stats().LeaderConns == 0 || len(r27LockerSessions(t, watch, app, &pids)) < 2 {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: the campaign did not start: %+v", r, lk.Stats())
			}
			time.Sleep(2 * time.Millisecond)
		}
		time.Sleep(20 * time.Millisecond)
		cancel()
		time.Sleep(time.Duration(rand.IntN(8000)) * time.Microsecond)
		if err := lk.Close(); err != nil {
			t.Fatal(err)
		}
		left := r27LockerSessions(t, watch, app, &pids)
		what := ""
		if len(left) > 0 {
			what = r27Describe(t, watch, left)
		}
		select {
		case <-ran:
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: Run did not return", r)
		}
		if len(left) > 0 {
			bad = append(bad, fmt.Sprintf("round %d: just after Close, %d of the Locker's sessions on the server:%s", r, len(left), what))
		}
		pool.Close()
	}
	for _, b := range bad {
		t.Log(b)
	}
	if len(bad) > 0 {
		t.Errorf("%d of %d Closes racing a campaign's end returned with a session of the Locker still on the server", len(bad), rounds)
	}
}

// HELD (after the doc was mended): Locker.Close said it waits for the
// server "side by side, up to a second on a silent network". A lock
// connection whose watch is pinging when Close comes (the network went
// silent a check interval ago, before the watch noticed) is not closed
// until the ping gives up: Close first stops the watch, and stopping a
// ping waits for it, up to the check interval: 1.65 s here with a 2 s
// interval, every run (it was so before endSession too). The doc now says
// so; the test checks that bound: the check interval and a second.
func TestReview27CloseDuringWatchPingOnASilentNetwork(t *testing.T) {
	t.Parallel()
	const interval = 2 * time.Second
	proxy, pool := faultProxyPool(t, 2)
	lk, err := pglock.NewLocker(pool, pglock.WithLockConns(1), pglock.WithLostCheckInterval(interval))
	if err != nil {
		t.Fatal(err)
	}
	l, err := lk.NewLock(pgtest.UniqueKey(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	proxy.Blackhole()
	// The watch reads for one interval (from about 50 ms after the acquire),
	// then pings, for up to another interval, on the silent network.
	time.Sleep(interval + 400*time.Millisecond)
	select {
	case <-l.Lost():
		t.Skip("the loss was seen before the ping could give up (a loaded machine): nothing to measure")
	default:
	}
	start := time.Now()
	if err := lk.Close(); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	t.Logf("Close took %v with the watch's ping under way on a silent network (check interval %v)", took.Round(time.Millisecond), interval)
	if took > interval+1500*time.Millisecond {
		t.Errorf("Close took %v on a silent network, want at most the check interval (%v) and about a second (Locker.Close's doc)", took, interval)
	}
}
