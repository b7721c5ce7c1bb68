package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

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
// memory" and an innocent Locker never loses a lock (but by its connection's
// statement bound on a starved machine); every acquire that
// returned true is still held until released; the refusals are
// ErrTooManyLocks with the server's figures. WithMaxLocks above what the
// server can hold is an error.
func TestServerWideGuardLeavesTableForOthers(t *testing.T) {
	srv := pgtest.ThrowawayT(t, map[string]string{"max_locks_per_transaction": "64", "max_connections": "40"})
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

	innocentHeld := innocentLocks(t, muxLocker(t, newPool()))
	stopBystander := startBystander(t, srv.URL)
	results := make([]guardTries, lockers)
	var wg sync.WaitGroup
	for r := range lockers {
		lk := muxLocker(t, newPool())
		wg.Go(func() {
			results[r] = tryKeys(lk, perLocker, 4, func(i int) string { return fmt.Sprintf("replica-%d-%d", r, i) })
		})
	}
	wg.Wait()
	innocentHeld = checkUnharmed(t, stopBystander(), innocentHeld)
	var held []*pglock.Lock
	var refused int
	var firstRefusal error
	for _, r := range results {
		held, refused = append(held, r.held...), refused+r.refused
		if firstRefusal == nil {
			firstRefusal = r.firstRefusal
		}
		if r.firstOther != nil {
			t.Errorf("TryAcquire = %v (%d such), want ErrTooManyLocks when refused", r.firstOther, r.other)
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
	t.Logf("%d Lockers took %d locks, %d refused (first: %v); pg_locks: %d advisory granted (with the innocent Locker's 5)",
		lockers, len(held), refused, firstRefusal, granted)
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
	if refused == 0 {
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

// guardTries is what tryKeys got.
type guardTries struct {
	held                     []*pglock.Lock
	refused, other           int // ErrTooManyLocks, and any other error
	firstRefusal, firstOther error
}

// tryKeys has goroutines goroutines of lk try the keys name(0..tries-1),
// each once, with TryAcquire, and returns the Locks it holds and what the
// others said.
func tryKeys(lk *pglock.Locker, tries, goroutines int, name func(i int) string) guardTries {
	var mu sync.Mutex
	var r guardTries
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := g; i < tries; i += goroutines {
				l, err := lk.NewLock(name(i))
				ok := false
				if err == nil {
					ok, err = l.TryAcquire(context.Background())
				}
				mu.Lock()
				switch {
				case err == nil && ok:
					r.held = append(r.held, l)
				case errors.Is(err, pglock.ErrTooManyLocks):
					r.refused++
					if r.firstRefusal == nil {
						r.firstRefusal = err
					}
				case err != nil:
					r.other++
					if r.firstOther == nil {
						r.firstOther = err
					}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return r
}

// startBystander runs an innocent session's work in a loop (a transaction
// that creates a table, and a new connection) until the returned stop is
// called, which returns the errors it met.
func startBystander(t *testing.T, url string) (stop func() []error) {
	t.Helper()
	bg := context.Background()
	bystander, err := pgx.Connect(bg, url)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var errs []error
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			default:
			}
			if _, err := bystander.Exec(bg, fmt.Sprintf("BEGIN; CREATE TEMP TABLE bystander_%d (i int); ROLLBACK", i)); err != nil {
				errs = append(errs, err)
				_, _ = bystander.Exec(bg, "ROLLBACK")
			}
			if c, err := pgx.Connect(bg, url); err != nil {
				errs = append(errs, err)
			} else {
				_ = c.Close(bg)
			}
		}
	})
	return func() []error {
		close(done)
		wg.Wait()
		_ = bystander.Close(bg)
		return errs
	}
}

// checkUnharmed fails the test if the bystander met "out of shared memory"
// or an innocent Locker's lock was lost, and returns the innocent locks still
// held. A lock lost by its connection's statement bound (the server did not
// answer within it: a machine starved of CPU, not the guard's failure) is
// logged, released and left out.
func checkUnharmed(t *testing.T, bystanderErrs []error, innocent []*pglock.Lock) []*pglock.Lock {
	t.Helper()
	for _, err := range bystanderErrs {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "53200" {
			t.Errorf("INVARIANT innocent-session-unharmed: the bystander got %v (%d errors in all)", err, len(bystanderErrs))
			break
		}
	}
	var held []*pglock.Lock
	for _, l := range innocent {
		select {
		case <-l.Lost():
			err := l.Release(context.Background())
			if lostByStatementBound(err) {
				t.Logf("the innocent Locker lost key %s by its statement bound (a starved machine): %v", l.Key(), err)
				continue
			}
			t.Errorf("INVARIANT innocent-locker-unharmed: the innocent Locker lost key %s: %v", l.Key(), err)
		default:
			held = append(held, l)
		}
	}
	return held
}

// lostByStatementBound reports whether err, a lost hold's Release error,
// says that its lock connection was closed because the server did not answer
// a statement within the connection's bound (a deadline on the socket or on
// the statement's context).
func lostByStatementBound(err error) bool {
	s := fmt.Sprint(err)
	return strings.Contains(s, "i/o timeout") || strings.Contains(s, "timeout: context deadline exceeded")
}

// innocentLocks takes five keys on lk, an innocent Locker beside the ones
// that fill the lock table.
func innocentLocks(t *testing.T, lk *pglock.Locker) []*pglock.Lock {
	t.Helper()
	var ls []*pglock.Lock
	for i := range 5 {
		l, err := lk.NewLock(fmt.Sprintf("innocent-%d", i))
		if err == nil {
			err = l.Acquire(context.Background())
		}
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
	}
	return ls
}
