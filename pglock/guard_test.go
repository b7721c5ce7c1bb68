package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Issue 20, item 3: the lock-table guard sees the whole server. On a
// throwaway server (max_locks_per_transaction 64, max_connections 40: a lock
// table of 2,560 slots, about twice that in fact), nine Lockers of their own
// pools (as nine replicas would be), each allowed a quarter of the table,
// try to take 700 keys each: together they stop near three quarters of the
// table (with a small overshoot: each counts the server's locks only now and
// then), so an innocent session beside them never sees "out of shared
// memory" and an innocent Locker never loses a lock; every acquire that
// returned true is still held until released; the refusals are
// ErrTooManyLocks with the server's figures. WithMaxLocks above what the
// server can hold is an error.
func TestServerWideGuardLeavesTableForOthers(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv, err := pgtest.StartThrowawayWith(ctx, map[string]string{"max_locks_per_transaction": "64", "max_connections": "40"})
	if errors.Is(err, pgtest.ErrNoPostgres) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	const lockers, perLocker, capacity = 9, 700, 64 * 40
	bg := context.Background()
	newPool := func() *pgxpool.Pool {
		p, err := pgxpool.New(bg, srv.URL+"&pool_max_conns=1")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		return p
	}
	watch := newPool()
	var dbOID int64
	if err := watch.QueryRow(bg, "SELECT oid::bigint FROM pg_catalog.pg_database WHERE datname = current_database()").Scan(&dbOID); err != nil {
		t.Fatal(err)
	}

	// WithMaxLocks above the server's table: refused at the first acquire.
	big := muxLocker(t, newPool(), pglock.WithMaxLocks(capacity))
	if _, err := big.TryDo(bg, "too-big", func(context.Context) error { return nil }); !errors.Is(err, pglock.ErrInvalidOption) {
		t.Errorf("TryDo on a Locker WithMaxLocks(%d), above the server's table = %v, want ErrInvalidOption", capacity, err)
	}

	innocent := muxLocker(t, newPool())
	var innocentHeld []*pglock.Lock
	for i := range 5 {
		l, _ := innocent.Lock(fmt.Sprintf("innocent-%d", i))
		if err := l.Acquire(bg); err != nil {
			t.Fatal(err)
		}
		innocentHeld = append(innocentHeld, l)
	}
	bystander, err := pgx.Connect(bg, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer bystander.Close(bg)

	var mu sync.Mutex
	var held []*pglock.Lock
	var refused, other atomic.Int64
	var firstRefusal atomic.Pointer[error]
	var wg sync.WaitGroup
	for r := range lockers {
		lk := muxLocker(t, newPool())
		for g := range 4 {
			wg.Go(func() {
				for i := g; i < perLocker; i += 4 {
					l, _ := lk.Lock(fmt.Sprintf("replica-%d-%d", r, i))
					ok, err := l.TryAcquire(bg)
					switch {
					case err == nil && ok:
						mu.Lock()
						held = append(held, l)
						mu.Unlock()
					case errors.Is(err, pglock.ErrTooManyLocks):
						refused.Add(1)
						firstRefusal.CompareAndSwap(nil, &err)
					case err != nil && other.Add(1) == 1:
						t.Errorf("TryAcquire = %v, want ErrTooManyLocks when refused", err)
					}
				}
			})
		}
	}
	// The bystander works meanwhile: a transaction that creates a table,
	// and new connections.
	stop := make(chan struct{})
	var bystanderErrs []error
	var bw sync.WaitGroup
	bw.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := bystander.Exec(bg, fmt.Sprintf("BEGIN; CREATE TEMP TABLE bystander_%d (i int); ROLLBACK", i)); err != nil {
				bystanderErrs = append(bystanderErrs, err)
				_, _ = bystander.Exec(bg, "ROLLBACK")
			}
			if c, err := pgx.Connect(bg, srv.URL); err != nil {
				bystanderErrs = append(bystanderErrs, err)
			} else {
				_ = c.Close(bg)
			}
		}
	})
	wg.Wait()
	close(stop)
	bw.Wait()

	for _, err := range bystanderErrs {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "53200" {
			t.Errorf("INVARIANT innocent-session-unharmed: the bystander got %v", err)
			break
		}
	}
	for _, l := range innocentHeld {
		select {
		case <-l.Lost():
			t.Errorf("INVARIANT innocent-locker-unharmed: the innocent Locker lost key %s", l.Key())
		default:
		}
	}
	lost := 0
	for _, l := range held {
		select {
		case <-l.Lost():
			lost++
		default:
		}
	}
	if lost > 0 {
		t.Errorf("INVARIANT nil-means-held: %d of %d acquires that returned true were lost", lost, len(held))
	}
	var granted int
	if err := watch.QueryRow(bg, `SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted AND database = $1::oid`, dbOID).Scan(&granted); err != nil {
		t.Fatal(err)
	}
	first := "none"
	if e := firstRefusal.Load(); e != nil {
		first = (*e).Error()
	}
	t.Logf("%d Lockers took %d locks, %d refused (first: %s); pg_locks: %d advisory granted (with the innocent Locker's 5); bystander errors: %d",
		lockers, len(held), refused.Load(), first, granted, len(bystanderErrs))
	if granted != len(held)+len(innocentHeld) {
		t.Errorf("pg_locks holds %d advisory locks, the Locks %d", granted, len(held)+len(innocentHeld))
	}
	// Three quarters of the table, and the overshoot of counting now and
	// then: a sixty-fourth of the table per Locker, or an eighth of what it
	// held.
	if limit := capacity*3/4 + lockers*capacity/64 + capacity*3/4/8; len(held)+len(innocentHeld) > limit {
		t.Errorf("INVARIANT server-wide-guard: the Lockers took %d locks together, want at most %d (3/4 of the %d-slot table, and the guard's overshoot)",
			len(held)+len(innocentHeld), limit, capacity)
	}
	if refused.Load() == 0 {
		t.Error("nothing was refused: the Lockers did not reach the guard")
	}
	for _, l := range append(held, innocentHeld...) {
		wg.Go(func() {
			if err := l.Release(bg); err != nil {
				t.Errorf("Release: %v", err)
			}
		})
	}
	wg.Wait()
}
