package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// review3Settings is what a pool connection's session looks like, read on
// the connection itself.
type review3Settings struct {
	pid      int32
	idle     string
	idleInTx string
	// stash is pglock.idle_session_timeout (NULL: never set on this
	// session). A hold leaves it empty: a custom setting, once set, cannot
	// be removed from a session, and empty means "nothing kept".
	stash      sql.NullString
	advisories int
}

const review3SettingsSQL = `SELECT pg_backend_pid(), current_setting('idle_session_timeout'),
	current_setting('idle_in_transaction_session_timeout'),
	current_setting('pglock.idle_session_timeout', true),
	(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())`

func review3Read(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) (review3Settings, error) {
	var s review3Settings
	var stash *string
	err := q.QueryRow(ctx, review3SettingsSQL).Scan(&s.pid, &s.idle, &s.idleInTx, &stash, &s.advisories)
	if stash != nil {
		s.stash = sql.NullString{String: *stash, Valid: true}
	}
	return s, err
}

// review3Blocker holds key on a session of its own until release is called.
func review3Blocker(t *testing.T, watch *pgxpool.Pool, key pglock.Key) (release func()) {
	t.Helper()
	ctx := context.Background()
	c, err := watch.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	l, err := pglock.New(c.Conn(), key)
	if err != nil {
		c.Release()
		t.Fatal(err)
	}
	if err := l.Acquire(ctx); err != nil {
		c.Release()
		t.Fatal(err)
	}
	return func() {
		if err := l.Release(ctx); err != nil {
			t.Error(err)
		}
		c.Release()
	}
}

// Invariant: a pool connection returned to the pool carries no lock and no
// changed session setting. A pool with one connection (so every hold runs on
// it) whose sessions start with idle_session_timeout = 37s (the pool's own
// RuntimeParams) goes through Session and Transaction holds, busy tries,
// cancelled waits and a failed Do; after each, the connection's session is
// read with SHOW-style current_setting on the pool itself.
func TestPoolConnBackFromHoldUnchanged(t *testing.T) {
	ctx := context.Background()
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 1
	cfg.ConnConfig.RuntimeParams["idle_session_timeout"] = "37s"
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	watch := pgtest.Pool(t, 2)

	before, err := review3Read(ctx, pool)
	if err != nil {
		t.Fatal(err)
	}
	check := func(step string) {
		t.Helper()
		after, err := review3Read(ctx, pool)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		if after.pid != before.pid {
			// A destroyed connection is allowed; compare the new one with a
			// fresh session's values.
			before.pid = after.pid
		}
		if after.idle != before.idle || after.idleInTx != before.idleInTx || after.advisories != 0 || after.stash.String != before.stash.String {
			t.Fatalf("invariant (a pool connection goes back to the pool as it came) broken after %s: before %+v, after %+v", step, before, after)
		}
	}

	keyS := pgtest.UniqueKey(t)
	for i := range 3 {
		// Session scope: a hold, released.
		l, err := pglock.New(pool, keyS)
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
		check(fmt.Sprintf("session hold %d", i))
		// A busy try and a cancelled wait.
		release := review3Blocker(t, watch, l.Key())
		if ok, err := l.TryAcquire(ctx); ok || err != nil {
			t.Fatalf("busy try: %v %v", ok, err)
		}
		check("busy session try")
		wctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		err = l.Acquire(wctx)
		cancel()
		if !errors.Is(err, pglock.ErrNotAcquired) {
			t.Fatalf("cancelled wait: %v", err)
		}
		check("cancelled session wait")
		release()
		// A Do whose function fails.
		_ = l.Do(ctx, func(context.Context) error { return errors.New("boom") })
		check("failed session Do")

		// Transaction scope.
		lt, err := pglock.New(pool, pgtest.UniqueKey(t), pglock.WithScope(pglock.Transaction))
		if err != nil {
			t.Fatal(err)
		}
		if err := lt.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		if err := lt.Release(ctx); err != nil {
			t.Fatal(err)
		}
		check("transaction hold")
	}
}

// The same on a *sql.DB with pgx's driver.
func TestSQLDBConnBackFromHoldUnchanged(t *testing.T) {
	ctx := context.Background()
	cfg, err := pgx.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	db := stdlib.OpenDB(*cfg)
	db.SetMaxOpenConns(1)
	defer db.Close()
	read := func() (review3Settings, error) {
		var s review3Settings
		err := db.QueryRowContext(ctx, review3SettingsSQL).Scan(&s.pid, &s.idle, &s.idleInTx, &s.stash, &s.advisories)
		return s, err
	}
	before, err := read()
	if err != nil {
		t.Fatal(err)
	}
	l, err := pglock.New(db, pgtest.UniqueKey(t))
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := l.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
	}
	after, err := read()
	if err != nil {
		t.Fatal(err)
	}
	if after.pid == before.pid && (after.idle != before.idle || after.stash.String != before.stash.String || after.advisories != 0) {
		t.Errorf("invariant (a pool connection goes back to the pool as it came) broken: before %+v, after %+v", before, after)
	}
}

// Invariant: never two holders of an exclusive key, through a transaction
// pooler too (issue 20, item 1: "a session lock is granted to the caller only
// when the library has positive proof that the server session holding it
// stays with this client connection"). TestPgBouncerNeverTwoHolders tries
// Lockers only (whose lock connections carry the proof); here the same
// trials run through the paths that take a session lock on a pool
// connection of their own: New on a pool, and a Locker WithMultiplexing(false).
func TestPgBouncerNeverTwoHoldersOnPoolPaths(t *testing.T) {
	resetAlways := map[string]string{"server_reset_query_always": "1"}
	t.Run("New on a pool", func(t *testing.T) {
		b := pgtest.StartPgBouncerWithT(t, "transaction", 2, resetAlways)
		review3PoolerTrials(t, b, 32, 4, 200, 12*time.Second, false, func(pool *pgxpool.Pool, name string) (*pglock.Lock, error) {
			return pglock.New(pool, name)
		})
	})
	t.Run("WithMultiplexing(false)", func(t *testing.T) {
		b := pgtest.StartPgBouncerWithT(t, "transaction", 2, resetAlways)
		review3PoolerTrials(t, b, 32, 4, 200, 12*time.Second, false, func(pool *pgxpool.Pool, name string) (*pglock.Lock, error) {
			lk, err := pglock.NewLocker(pool, pglock.WithMultiplexing(false))
			if err != nil {
				return nil, err
			}
			t.Cleanup(func() { _ = lk.Close() })
			return lk.Lock(name)
		})
	})
}

// review3PoolerTrials is poolerGuardTrials (pooler_guard_test.go) with the
// Lock made by mk instead of a fresh default Locker.
func review3PoolerTrials(t *testing.T, b *pgtest.PgBouncer, bg, workers, trials int, budget time.Duration, refuseAll bool, mk func(pool *pgxpool.Pool, name string) (*pglock.Lock, error)) {
	direct := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	key := mustKey(t, name)
	ctx := context.Background()
	start := time.Now()

	stopLoad := busyPooler(t, b, bg)
	defer stopLoad()

	var (
		pools      []*pgxpool.Pool
		lockers    []*pglock.Locker
		holds      []*guardHold
		refused    int
		busy       int // TryAcquire false, nil while another trial held
		slowestRef time.Duration
		unexpected []string
		violations []string
		maxHeld    int // clients that reported Held() at once, at most
		maxServer  int // server sessions that held the key at once, at most
		unbacked   = map[int]bool{}
		lastBad    string // the last state reported, so that a state is reported once
	)
	cleanup := func() {
		for _, lk := range lockers {
			_ = lk.Close()
		}
		for _, p := range pools {
			p.Close()
		}
		lockers, pools = nil, nil
	}
	defer cleanup()

	// check reads who holds the key on the server, then which clients
	// report Held(): a Lock that still reports Held() after the read did
	// throughout it (Held() does not turn true again without an acquire).
	check := func(when string) {
		granted := pgtest.Granted(t, direct, key)
		var held []int
		for _, h := range holds {
			if h.lock.Held() {
				held = append(held, h.trial)
			}
		}
		maxHeld = max(maxHeld, len(held))
		maxServer = max(maxServer, len(granted))
		if state := fmt.Sprint(held, granted); (len(held) > 1 || len(granted) > 1) && state != lastBad {
			lastBad = state
			violations = append(violations, fmt.Sprintf("INVARIANT never two holders: %s: %d client(s) report Held() for the exclusive key at once (trials %v); %d server session(s) hold it %+v",
				when, len(held), held, len(granted), granted))
		}
		if len(held) > 0 && len(granted) == 0 {
			for _, tr := range held {
				if !unbacked[tr] {
					unbacked[tr] = true
					violations = append(violations, fmt.Sprintf("INVARIANT never two holders: %s: trial %d reports Held() but no server session holds the key", when, tr))
				}
			}
		}
	}

	// workers clients try at once, each trial a client of its own.
	var mu sync.Mutex // guards the state above, and check
	var next atomic.Int64
	var wg sync.WaitGroup
	// heldBy returns a trial that reports Held(), or -1.
	heldBy := func() int {
		for _, h := range holds {
			if h.lock.Held() {
				return h.trial
			}
		}
		return -1
	}
	var ran atomic.Int64
	trial := func(i int) bool {
		ran.Add(1)
		pool, err := pgxpool.New(ctx, b.URL+"&default_query_exec_mode=simple_protocol")
		if err != nil {
			t.Error(err)
			return false
		}
		mu.Lock()
		pools = append(pools, pool)
		mu.Unlock()
		l, err := mk(pool, name)
		if err != nil {
			t.Error(err)
			return false
		}
		tctx, cancel := context.WithTimeout(ctx, guardKeyWait)
		t0 := time.Now()
		ok, err := l.TryAcquire(tctx)
		took := time.Since(t0)
		cancel()
		mu.Lock()
		defer mu.Unlock()
		switch {
		case ok && err == nil:
			holds = append(holds, &guardHold{trial: i, lock: l, took: took})
			check(fmt.Sprintf("trial %d, at once", i))
			if refuseAll {
				violations = append(violations, fmt.Sprintf("trial %d: TryAcquire through the pooler returned true (%v); want ErrTransactionPooler",
					i, took.Round(time.Millisecond)))
			}
		case !ok && errors.Is(err, pglock.ErrTransactionPooler) && errors.Is(err, pglock.ErrNotAcquired):
			refused++
			slowestRef = max(slowestRef, took)
			if refused == 1 {
				t.Logf("first refusal: %v", err)
			}
		case !ok && err == nil && heldBy() >= 0:
			busy++ // another client holds it (checked as a hold of its own)
		default:
			unexpected = append(unexpected, fmt.Sprintf("trial %d: TryAcquire = %v, %v (%v)", i, ok, err, took.Round(time.Millisecond)))
			check(fmt.Sprintf("trial %d, after an unexpected outcome", i))
		}
		if len(holds) > 0 {
			check(fmt.Sprintf("after trial %d", i))
		}
		return true
	}
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= trials || time.Since(start) > budget || !trial(i) {
					return
				}
			}
		})
	}
	wg.Wait()
	check("after the trials")

	// Release what was granted: a hold that reported Held() until its
	// release must release cleanly (F1's holders got ErrLockLost here).
	var releaseErrs []string
	for _, h := range holds {
		wasHeld := h.lock.Held()
		if err := h.lock.Release(ctx); err != nil && wasHeld {
			releaseErrs = append(releaseErrs, fmt.Sprintf("trial %d: %v", h.trial, err))
		}
	}
	for _, lk := range lockers {
		if err := lk.Close(); err != nil {
			t.Errorf("Locker.Close: %v", err)
		}
	}
	cleanup()
	statements := stopLoad()
	pgtest.WaitFree(t, direct, key)
	b.Stop()

	tooks := make([]string, 0, len(holds))
	for _, h := range holds[:min(len(holds), 10)] {
		tooks = append(tooks, h.took.Round(time.Millisecond).String())
	}
	t.Logf("%d of %d trials in %v (%d background statements): refused with ErrTransactionPooler %d, accepted %d %v, busy %d, other %d; slowest refusal %v",
		ran.Load(), trials, time.Since(start).Round(time.Millisecond), statements, refused, len(holds), tooks, busy, len(unexpected), slowestRef.Round(time.Millisecond))
	t.Logf("at most %d client(s) reported Held() at once for the exclusive key; at most %d server session(s) held it; %d accepted hold(s) not held on the server; release errors: %d",
		maxHeld, maxServer, len(unbacked), len(releaseErrs))
	for _, s := range unexpected {
		t.Errorf("neither refused with ErrTransactionPooler nor held: %s", s)
	}
	for i, s := range violations {
		if i == 20 {
			t.Errorf("... and %d more", len(violations)-i)
			break
		}
		t.Error(s)
	}
	for _, s := range releaseErrs {
		t.Errorf("Release of a hold that reported Held(): %s", s)
	}
}
