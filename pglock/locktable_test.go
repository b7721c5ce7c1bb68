package pglock_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Issue 20, item 4 (found by the second review of issue 19): an "out of
// shared memory" on one statement fails that acquire only (with
// ErrTooManyLocks), and a failed batch keeps nothing it took. On a throwaway
// server with a tiny lock table, a Locker holds keys (some shared, with
// co-holders); another session fills the table with other locks (temporary
// tables in an open transaction, which the Locker's server-wide guard does
// not count); many goroutines then try more keys, combined into batches that
// fail half way: none of the holds is lost, the tries fail with
// ErrTooManyLocks, and once the table empties every hold is still there,
// and after the releases nothing is left and Stats are zero.
func TestLockTableFullFailsThatAcquireOnly(t *testing.T) {
	srv := pgtest.ThrowawayT(t, map[string]string{"max_locks_per_transaction": "10", "max_connections": "20"})
	bg := context.Background()
	pool, err := pgxpool.New(bg, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	watch, err := pgxpool.New(bg, srv.URL+"&pool_max_conns=1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(watch.Close)
	// Read before the table fills: pg_database is a shared catalog, whose
	// lock needs a slot of the full table.
	var dbOID int64
	if err := watch.QueryRow(bg, "SELECT oid::bigint FROM pg_catalog.pg_database WHERE datname = current_database()").Scan(&dbOID); err != nil {
		t.Fatal(err)
	}
	lk := muxLocker(t, pool, pglock.WithLockConns(1), pglock.WithWaitConns(1))
	names, keys := muxKeys(t, lk, 400)
	var mu sync.Mutex
	var held []*pglock.Lock
	take := func(i int) error {
		mode := pglock.Mode(i % 2)
		for range 1 + 2*(i%2) { // shared keys get co-holders
			l, _ := lk.NewLock(names[i], pglock.WithMode(mode))
			ok, err := l.TryAcquire(bg)
			if err != nil {
				return err
			}
			if ok {
				mu.Lock()
				held = append(held, l)
				mu.Unlock()
			}
		}
		return nil
	}
	for i := range 20 {
		if err := take(i); err != nil {
			t.Fatal(err)
		}
	}

	filler, err := pgx.Connect(bg, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer filler.Close(bg)
	fill, err := filler.Begin(bg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fill.Exec(bg, `DO $$ BEGIN
		FOR i IN 1..100000 LOOP
			BEGIN
				EXECUTE format('CREATE TEMP TABLE pglock_fill_%s ()', i);
			EXCEPTION WHEN out_of_memory THEN
				EXIT;
			END;
		END LOOP;
	END $$`); err != nil {
		t.Fatal(err)
	}

	var full, other atomic.Int64
	var wg sync.WaitGroup
	for w := range 30 {
		wg.Go(func() {
			for i := 20 + w; i < len(names); i += 30 {
				err := take(i)
				switch {
				case err == nil:
				case errors.Is(err, pglock.ErrTooManyLocks):
					full.Add(1)
				default:
					if other.Add(1) == 1 {
						t.Errorf("TryAcquire on a full lock table = %v, want ErrTooManyLocks", err)
					}
				}
			}
		})
	}
	wg.Wait()
	lost := 0
	byKey := map[pglock.Key]bool{}
	for _, l := range held {
		select {
		case <-l.Lost():
			lost++
			continue
		default:
		}
		byKey[l.Key()] = true
	}
	if lost > 0 {
		t.Errorf("INVARIANT out-of-shared-memory-fails-that-acquire-only: %d of %d holds were lost while the lock table was full", lost, len(held))
	}
	if full.Load() == 0 {
		t.Errorf("no acquire failed while the table was full: the test did not fill it")
	}
	if err := fill.Rollback(bg); err != nil {
		t.Fatal(err)
	}
	granted := fullTableGranted(t, watch, keys, dbOID)
	t.Logf("%d Locks hold %d keys; %d acquires failed on the full table; pg_locks: %d granted", len(held), len(byKey), full.Load(), granted)
	if granted != len(byKey) {
		t.Errorf("INVARIANT failed-batch-keeps-nothing: %d of the keys granted in pg_locks, but the Locks hold %d", granted, len(byKey))
	}
	rand.Shuffle(len(held), func(i, j int) { held[i], held[j] = held[j], held[i] })
	for _, l := range held {
		wg.Go(func() {
			if err := l.Release(bg); err != nil {
				t.Errorf("Release after the table emptied: %v", err)
			}
		})
	}
	wg.Wait()
	if n := fullTableGranted(t, watch, keys, dbOID); n != 0 {
		t.Errorf("INVARIANT nothing-left: %d keys still granted after every release", n)
	}
	if s := lk.Stats(); s.HeldKeys != 0 || s.Queued != 0 || s.ServerLocks != 0 {
		t.Errorf("INVARIANT stats-zero: Stats after every release = %+v", s)
	}
}

// fullTableGranted counts the keys granted in pg_locks, read through watch
// without touching a shared catalog (whose lock would need a slot of a full
// lock table).
func fullTableGranted(t *testing.T, watch *pgxpool.Pool, keys []pglock.Key, dbOID int64) int {
	t.Helper()
	classids, objids := lockTags(keys)
	var n int
	err := watch.QueryRow(context.Background(), `
		SELECT count(*) FROM pg_catalog.pg_locks l
		JOIN unnest($1::bigint[], $2::bigint[]) AS k(c, o) ON l.classid = k.c::oid AND l.objid = k.o::oid
		WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.database = $3::oid`,
		classids, objids, dbOID).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
