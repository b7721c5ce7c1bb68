package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// migrated returns a pool on the test database with the pglock schema.
func migrated(t *testing.T, conns int32) *pgxpool.Pool {
	t.Helper()
	pool := pgtest.Pool(t, conns)
	if _, err := pglock.Migrate(context.Background(), pool); err != nil {
		t.Fatal(err)
	}
	return pool
}

// freshDatabase creates an empty database for one test and returns its URL;
// it is dropped when the test ends.
func freshDatabase(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	admin := pgtest.Pool(t, 1)
	name := fmt.Sprintf("pglock_fresh_%d", rand.Uint32())
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = admin.Exec(context.Background(), "DROP DATABASE "+name+" WITH (FORCE)")
	})
	u, err := url.Parse(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	return u.String()
}

// Five replicas migrate a new database at once: one schema, each migration
// applied once, every Migrate reports the same final version; a second round
// applies nothing.
func TestMigrateConcurrent(t *testing.T) {
	t.Parallel()
	dbURL := freshDatabase(t)
	ctx := context.Background()
	const n = 5
	results := make([]pglock.MigrateResult, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			var db any
			if i%2 == 0 {
				pool, err := pgxpool.New(ctx, dbURL)
				if err != nil {
					errs[i] = err
					return
				}
				defer pool.Close()
				db = pool
			} else {
				sdb, err := sql.Open("pgx", dbURL)
				if err != nil {
					errs[i] = err
					return
				}
				defer sdb.Close()
				db = sdb
			}
			<-start
			results[i], errs[i] = pglock.Migrate(ctx, db)
		})
	}
	close(start)
	wg.Wait()
	applied := 0
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("Migrate %d: %v", i, errs[i])
		}
		if results[i].To != pglock.SchemaVersion {
			t.Errorf("Migrate %d: %+v, want To = %d", i, results[i], pglock.SchemaVersion)
		}
		applied += len(results[i].Applied)
	}
	if applied != pglock.SchemaVersion {
		t.Errorf("%d migrations applied across %d Migrates, want each of %d once", applied, n, pglock.SchemaVersion)
	}
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var schemas, versions int
	if err := conn.QueryRow(ctx, "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'pglock'), (SELECT count(*) FROM pglock.migration)").Scan(&schemas, &versions); err != nil {
		t.Fatal(err)
	}
	if schemas != 1 || versions != pglock.SchemaVersion {
		t.Errorf("%d pglock schemas and %d migration rows, want 1 and %d", schemas, versions, pglock.SchemaVersion)
	}
	again, err := pglock.Migrate(ctx, conn)
	if err != nil || len(again.Applied) != 0 || again.From != pglock.SchemaVersion {
		t.Errorf("a second Migrate = %+v, %v; want nothing applied", again, err)
	}
}

// Without the schema, a lock made WithToken is not acquired and says why;
// WithToken in Shared mode is an error.
func TestTokenNeedsSchema(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, freshDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	for _, multiplex := range []bool{true, false} {
		lk, err := pglock.NewLocker(pool, pglock.WithToken(), pglock.WithMultiplexing(multiplex))
		if err != nil {
			t.Fatal(err)
		}
		l, _ := lk.NewLock(pgtest.UniqueKey(t))
		ok, err := l.TryAcquire(ctx)
		if ok || !errors.Is(err, pglock.ErrSchema) || !errors.Is(err, pglock.ErrNotAcquired) {
			t.Errorf("multiplex %v: TryAcquire WithToken without the schema = %v, %v; want ErrSchema", multiplex, ok, err)
		}
		if l.Held() {
			t.Error("held after a failed token")
		}
		lk.Close()
		var n int
		if err := pool.QueryRow(ctx, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())").Scan(&n); err != nil || n != 0 {
			t.Errorf("advisory locks left in the fresh database: %d, %v", n, err)
		}
	}
}

// A shared hold takes no token (others hold the key at the same time), so a
// Locker made WithToken still locks in Shared mode; exclusive holds of the
// same key do take one.
func TestTokenSharedTakesNone(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := migrated(t, 4)
	lk, err := pglock.NewLocker(pool, pglock.WithToken())
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	key := pgtest.UniqueKey(t)
	shared, _ := lk.NewLock(key, pglock.WithMode(pglock.Shared))
	if err := shared.Do(ctx, func(ctx context.Context) error {
		if token, ok := pglock.TokenFromContext(ctx); ok || shared.Token() != 0 {
			t.Errorf("a shared hold has token %d (%v), want none", token, ok)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	excl, _ := lk.NewLock(key)
	if err := excl.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if excl.Token() == 0 {
		t.Error("an exclusive hold of a WithToken Locker has no token")
	}
	if err := excl.Release(ctx); err != nil {
		t.Fatal(err)
	}
}

// 1,000 grants of one key across three Lockers (multiplexed, one pool
// connection per hold, database/sql), in Session and Transaction scope:
// tokens strictly increase in the order of the grants.
func TestTokensIncrease(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := migrated(t, 8)
	key := pgtest.UniqueKey(t)
	db := openSQLDB(t)
	var lockers []*pglock.Locker
	for _, mk := range []func() (*pglock.Locker, error){
		func() (*pglock.Locker, error) { return pglock.NewLocker(pool, pglock.WithToken()) },
		func() (*pglock.Locker, error) {
			return pglock.NewLocker(pool, pglock.WithToken(), pglock.WithMultiplexing(false))
		},
		func() (*pglock.Locker, error) {
			return pglock.NewLocker(db, pglock.WithToken(), pglock.WithScope(pglock.Transaction))
		},
	} {
		lk, err := mk()
		if err != nil {
			t.Fatal(err)
		}
		defer lk.Close()
		lockers = append(lockers, lk)
	}
	var mu sync.Mutex
	var tokens []int64
	var wg sync.WaitGroup
	const grants = 1000
	per := grants / 4
	for i := range 4 { // 4 goroutines over 3 Lockers: some contend within a Locker
		lk := lockers[i%3]
		n := per
		if i == 3 {
			n = grants - 3*per
		}
		wg.Go(func() {
			for range n {
				err := lk.Do(ctx, key, func(ctx context.Context) error {
					token, ok := pglock.TokenFromContext(ctx)
					if !ok || token == 0 {
						return errors.New("no token in Do's context")
					}
					mu.Lock()
					tokens = append(tokens, token)
					mu.Unlock()
					return nil
				})
				if err != nil {
					t.Errorf("Do: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	if len(tokens) != grants {
		t.Fatalf("%d grants, want %d", len(tokens), grants)
	}
	for i := 1; i < len(tokens); i++ {
		if tokens[i] <= tokens[i-1] {
			t.Fatalf("grant %d got token %d after %d: not strictly increasing", i, tokens[i], tokens[i-1])
		}
	}
	t.Logf("tokens %d .. %d over %d grants", tokens[0], tokens[len(tokens)-1], grants)
	pgtest.WaitFree(t, pool, mustKey(t, key))
}

// A holder whose connection was killed while it was paused holds a stale
// token: after a second holder was granted a newer one, the stale holder's
// write through CheckFence fails with ErrFenced and the new holder's lands.
// A write that passed its fence check before the kill holds the next grant
// back until it commits, so it lands before the newer token exists.
func TestFencingStaleHolder(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := migrated(t, 8)
	watch := pgtest.Pool(t, 2)
	table := fmt.Sprintf("fence_writes_%d", rand.Uint32())
	if _, err := pool.Exec(ctx, "CREATE TABLE "+table+" (who text, token bigint)"); err != nil {
		t.Fatal(err)
	}
	defer pool.Exec(context.Background(), "DROP TABLE "+table)
	key := pgtest.UniqueKey(t)
	lkA, _ := pglock.NewLocker(pgtest.Pool(t, 4), pglock.WithToken())
	defer lkA.Close()
	lkB, _ := pglock.NewLocker(pgtest.Pool(t, 4), pglock.WithToken())
	defer lkB.Close()
	write := func(l *pglock.Lock, who string, token int64) error {
		return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			if err := pglock.CheckFence(ctx, tx, l.Key(), token); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "INSERT INTO "+table+" VALUES ($1, $2)", who, token)
			return err
		})
	}

	a, _ := lkA.NewLock(key)
	if err := a.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	tokenA := a.Token()
	if err := write(a, "A", tokenA); err != nil {
		t.Fatalf("the holder's fenced write: %v", err)
	}
	// A pauses; its session is killed; B is granted the key.
	pgtest.Terminate(t, watch, pgtest.Granted(t, watch, a.Key())[0].PID)
	b, _ := lkB.NewLock(key)
	if err := b.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	tokenB := b.Token()
	if tokenB <= tokenA {
		t.Fatalf("the new holder's token %d is not above the stale holder's %d", tokenB, tokenA)
	}
	// A wakes up and writes with its stale token.
	if err := write(a, "A-stale", tokenA); !errors.Is(err, pglock.ErrFenced) {
		t.Fatalf("the stale holder's write = %v, want ErrFenced", err)
	}
	if err := a.Fence(ctx, nil); !errors.Is(err, pglock.ErrFenced) && !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Errorf("Fence of a lost hold = %v", err)
	}
	if err := write(b, "B", tokenB); err != nil {
		t.Fatalf("the new holder's write: %v", err)
	}
	_ = a.Release(ctx)

	// B passes its fence check and keeps its transaction open; its session
	// is killed; C's grant (and token) waits for B's commit.
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Fence(ctx, tx); err != nil {
		t.Fatalf("B's fence: %v", err)
	}
	pgtest.Terminate(t, watch, pgtest.Granted(t, watch, b.Key())[0].PID)
	lkC, _ := pglock.NewLocker(pgtest.Pool(t, 4), pglock.WithToken())
	defer lkC.Close()
	c, _ := lkC.NewLock(key)
	granted := make(chan error, 1)
	go func() { granted <- c.Acquire(ctx) }()
	select {
	case err := <-granted:
		t.Fatalf("C was granted (%v) while B's fenced transaction is open", err)
	case <-time.After(300 * time.Millisecond):
	}
	if _, err := tx.Exec(ctx, "INSERT INTO "+table+" VALUES ('B-late', $1)", tokenB); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatalf("B's late commit: %v", err)
	}
	if err := <-granted; err != nil {
		t.Fatal(err)
	}
	if c.Token() <= tokenB {
		t.Errorf("C's token %d is not above B's %d", c.Token(), tokenB)
	}
	if err := write(b, "B-stale", tokenB); !errors.Is(err, pglock.ErrFenced) {
		t.Errorf("B's write after C's grant = %v, want ErrFenced", err)
	}
	_ = b.Release(ctx)
	if err := c.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if c.Token() != 0 {
		t.Error("Token after release is not 0")
	}
	var got []string
	rows, _ := pool.Query(ctx, "SELECT who FROM "+table+" ORDER BY token, who")
	got, err = pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != "[A B B-late]" {
		t.Errorf("writes that landed = %v, want [A B B-late]", got)
	}
	pgtest.WaitFree(t, watch, c.Key())
}

// ClaimTick records a run once: a second claim of the same (job, tick), by
// any transaction, is refused; a claim rolled back frees it; concurrent
// claims admit one.
func TestClaimTick(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := migrated(t, 12)
	job := pgtest.UniqueKey(t)
	tick := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	claim := func(commit bool) (bool, error) {
		tx, err := pool.Begin(ctx)
		if err != nil {
			return false, err
		}
		ok, err := pglock.ClaimTick(ctx, tx, job, tick)
		if err != nil || !commit {
			_ = tx.Rollback(ctx)
			return ok, err
		}
		return ok, tx.Commit(ctx)
	}
	if ok, err := claim(false); !ok || err != nil {
		t.Fatalf("first claim = %v, %v", ok, err)
	}
	if ok, err := claim(true); !ok || err != nil {
		t.Fatalf("claim after a rolled-back one = %v, %v; want true", ok, err)
	}
	if ok, err := claim(true); ok || err != nil {
		t.Fatalf("second claim = %v, %v; want false", ok, err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	won := 0
	tick = tick.Add(time.Second)
	for range 10 {
		wg.Go(func() {
			ok, err := claim(true)
			if err != nil {
				t.Error(err)
			}
			if ok {
				mu.Lock()
				won++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if won != 1 {
		t.Errorf("%d of 10 concurrent claims won, want 1", won)
	}
	if _, err := pglock.ClaimTick(ctx, nil, job, tick); !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Errorf("ClaimTick without a transaction = %v", err)
	}
	if _, err := pglock.ClaimTick(ctx, nil, "", tick); !errors.Is(err, pglock.ErrInvalidOption) {
		t.Errorf("ClaimTick with no job = %v", err)
	}
}

// A grant that must wait for a fenced transaction (one that passed
// CheckFence and is still open) waits without holding up the Locker's other
// keys on the same lock connection, gets its token once that transaction
// ends, and is let go (the acquire fails, nothing stays locked) when it
// stays open past the release timeout; the other key is never lost. Tokens
// of grants rolled back are not given again.
func TestTokenWaitsForFencedTransaction(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := migrated(t, 6)
	watch := pgtest.Pool(t, 2)
	lk, err := pglock.NewLocker(pgtest.Pool(t, 4), pglock.WithToken(), pglock.WithLockConns(1), pglock.WithReleaseTimeout(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	keyA, keyB := pgtest.UniqueKey(t)+"-a", pgtest.UniqueKey(t)+"-b"
	a, _ := lk.NewLock(keyA)
	if err := a.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	first := a.Token()
	fenced, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Fence(ctx, fenced); err != nil {
		t.Fatal(err)
	}
	if err := a.Release(ctx); err != nil {
		t.Fatal(err)
	}
	// a's next grant must wait for the fenced transaction.
	done := make(chan error, 1)
	go func() { done <- a.Acquire(ctx) }()
	time.Sleep(100 * time.Millisecond)
	b, _ := lk.NewLock(keyB)
	start := time.Now()
	if ok, err := b.TryAcquire(ctx); !ok || err != nil {
		t.Fatalf("TryAcquire of another key on the same lock connection = %v, %v", ok, err)
	}
	if took := time.Since(start); took > 300*time.Millisecond {
		t.Errorf("another key's TryAcquire took %v while a grant waited for a fenced transaction", took)
	}
	select {
	case err := <-done:
		t.Fatalf("the grant did not wait for the fenced transaction: %v", err)
	default:
	}
	if err := fenced.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("the grant after the fenced transaction ended: %v", err)
	}
	if a.Token() <= first {
		t.Errorf("token %d after %d", a.Token(), first)
	}
	if err := a.Release(ctx); err != nil {
		t.Fatal(err)
	}

	// Past the release timeout the grant is let go.
	fenced, err = pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer fenced.Rollback(ctx)
	// a is released (its Token is 0): hold the key's row as a fenced
	// transaction would.
	var newest int64
	if err := fenced.QueryRow(ctx, "SELECT token FROM pglock.fence WHERE key_space = 1 AND key = $1 FOR SHARE", a.Key().Int64()).Scan(&newest); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	err = a.Acquire(ctx)
	if err == nil || !errors.Is(err, pglock.ErrNotAcquired) || !strings.Contains(err.Error(), "still open") {
		t.Fatalf("Acquire while a fenced transaction stays open = %v, want not acquired, saying why", err)
	}
	t.Logf("let go after %v: %v", time.Since(start).Round(time.Millisecond), err)
	pgtest.WaitFree(t, watch, a.Key())
	if !b.Held() {
		t.Error("the other key was lost")
	}
	if err := b.Release(ctx); err != nil {
		t.Errorf("the other key's release: %v", err)
	}
	_ = fenced.Rollback(ctx)

	// A Transaction-scope grant rolled back does not give its number again.
	tx, _ := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithToken(), pglock.WithScope(pglock.Transaction))
	var tokens []int64
	for range 2 {
		_ = tx.Do(ctx, func(ctx context.Context) error {
			token, _ := pglock.TokenFromContext(ctx)
			tokens = append(tokens, token)
			return errors.New("roll back")
		})
	}
	if len(tokens) != 2 || tokens[1] <= tokens[0] {
		t.Errorf("tokens of two rolled-back grants: %v, want increasing", tokens)
	}
}

// Acquires with fencing tokens cancelled at random (while waiting for the
// key, or while the token waits for a fenced transaction that comes and
// goes) leave nothing locked, and every grant that succeeded got a token
// above all earlier ones.
func TestTokenCancelStorm(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := migrated(t, 8)
	watch := pgtest.Pool(t, 2)
	key := pgtest.UniqueKey(t)
	var lockers []*pglock.Locker
	for _, multiplex := range []bool{true, false} {
		lk, err := pglock.NewLocker(pgtest.Pool(t, 6), pglock.WithToken(), pglock.WithMultiplexing(multiplex))
		if err != nil {
			t.Fatal(err)
		}
		defer lk.Close()
		lockers = append(lockers, lk)
	}
	k := mustKey(t, key)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	// A fenced transaction that comes and goes on the key's row.
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			tx, err := pool.Begin(ctx)
			if err != nil {
				t.Error(err)
				return
			}
			_, _ = tx.Exec(ctx, "SELECT token FROM pglock.fence WHERE key_space = 1 AND key = $1 FOR SHARE", k.Int64())
			time.Sleep(time.Duration(rand.IntN(20)) * time.Millisecond)
			_ = tx.Rollback(ctx)
			time.Sleep(time.Duration(rand.IntN(10)) * time.Millisecond)
		}
	})
	var mu sync.Mutex
	var tokens []int64
	granted, cancelled := 0, 0
	var workers sync.WaitGroup
	for i := range 8 {
		lk := lockers[i%2]
		workers.Go(func() {
			for range 25 {
				actx, cancel := context.WithTimeout(ctx, time.Duration(1+rand.IntN(30))*time.Millisecond)
				err := lk.Do(actx, key, func(ctx context.Context) error {
					token, _ := pglock.TokenFromContext(ctx)
					mu.Lock()
					tokens = append(tokens, token)
					mu.Unlock()
					return nil
				})
				cancel()
				mu.Lock()
				if err == nil {
					granted++
				} else if errors.Is(err, pglock.ErrNotAcquired) {
					cancelled++
				} else {
					t.Errorf("Do: %v", err)
				}
				mu.Unlock()
			}
		})
	}
	workers.Wait()
	close(stop)
	wg.Wait()
	t.Logf("%d granted, %d cancelled", granted, cancelled)
	if granted == 0 || cancelled == 0 {
		t.Errorf("%d granted and %d cancelled: the storm did not exercise both", granted, cancelled)
	}
	for i := 1; i < len(tokens); i++ {
		if tokens[i] <= tokens[i-1] {
			t.Fatalf("token %d after %d", tokens[i], tokens[i-1])
		}
	}
	pgtest.WaitFree(t, watch, k)
}
