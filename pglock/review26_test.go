package pglock_test

// Adversarial review of issue 24 (deadlocks between holders, deadlock.go).
// Each TestReview26* test names the defect it shows, or, marked HELD, what
// it checks that held up.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// r26Locker is a Locker on pool, closed when the test ends.
func r26Locker(t testing.TB, pool *pgxpool.Pool, opts ...pglock.Option) *pglock.Locker {
	t.Helper()
	lk, err := pglock.NewLocker(pool, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	return lk
}

// r26Hold takes key on lk with a Lock of its own (outside any Do) and
// returns its release.
func r26Hold(t testing.TB, lk *pglock.Locker, key any, opts ...pglock.Option) (*pglock.Lock, func()) {
	t.Helper()
	l, err := lk.NewLock(key, opts...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	return l, func() { once.Do(func() { _ = l.Release(context.Background()) }) }
}

// r26Keys returns n distinct key names for the test.
func r26Keys(t testing.TB, n int) []string {
	base := pgtest.UniqueKey(t)
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("%s-%d", base, i)
	}
	return keys
}

// r26Skip skips a test that shows a defect left unfixed, unless
// PGLOCK_REVIEW26_UNSKIP=1 (to see it fail).
func r26Skip(t *testing.T, why string) {
	t.Helper()
	if os.Getenv("PGLOCK_REVIEW26_UNSKIP") != "1" {
		t.Skip(why)
	}
}

// r26Result is how a goroutine's wait ended.
type r26Result struct {
	who string
	err error
	at  time.Duration
}

// r26Nested runs, in a goroutine, lk.Do(ctx, outer) and inside it, once
// go is closed, lk.Do of inner; the inner Do's outcome goes to out, and the
// outer hold lasts until release is closed. It returns a channel closed once
// the outer key is held.
func r26Nested(ctx context.Context, who string, lk *pglock.Locker, outer, inner any, start <-chan struct{}, release <-chan struct{}, out chan<- r26Result, wg *sync.WaitGroup) <-chan struct{} {
	holding := make(chan struct{})
	wg.Go(func() {
		err := lk.Do(ctx, outer, func(ctx context.Context) error {
			close(holding)
			<-start
			t0 := time.Now()
			err := lk.Do(ctx, inner, func(context.Context) error { return nil })
			out <- r26Result{who, err, time.Since(t0)}
			<-release
			return nil
		})
		if err != nil {
			select {
			case <-holding:
			default:
				close(holding)
				out <- r26Result{who + " (outer)", err, 0}
			}
		}
	})
	return holding
}

// r26NoEndWithin fails the test when a result arrives on out within d.
func r26NoEndWithin(t *testing.T, out <-chan r26Result, d time.Duration, what string) {
	t.Helper()
	select {
	case r := <-out:
		t.Fatalf("%s: the wait of %s ended after %v with %v; want it still waiting (no cycle)", what, r.who, r.at, r.err)
	case <-time.After(d):
	}
}

// TestReview26UnheldContextWithHoldIsNoHold: ContextWithHold of a Lock that
// is not held carries no hold (a nested Do of its key "fails", as the
// package says); yet holdTags counts it as live (its gen is noHold, which
// holdGen returns for a Lock not held), so a wait in that context claims a
// hold of the key, and a holder that waits for another holder of that key
// closes a cycle that does not exist: false ErrDeadlock.
//
// A goroutine waits for k2, in ContextWithHold(ctx, an unheld Lock of k1);
// B holds k2 and waits for k1, which a plain Lock holds. Nobody waits for A.
func TestReview26UnheldContextWithHoldIsNoHold(t *testing.T) {
	bg := context.Background()
	lk := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 8, nil))
	keys := r26Keys(t, 2)
	k1, k2 := keys[0], keys[1]
	unheld, err := lk.NewLock(k1)
	if err != nil {
		t.Fatal(err)
	}
	_, releaseD := r26Hold(t, lk, k1)
	defer releaseD()

	ctx, cancel := context.WithTimeout(bg, 20*time.Second)
	defer cancel()
	out := make(chan r26Result, 4)
	start, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	let := func() { once.Do(func() { close(release) }) }
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	defer let()
	<-r26Nested(ctx, "B", lk, k2, k1, start, release, out, &wg)
	close(start)
	wg.Go(func() {
		t0 := time.Now()
		err := lk.Do(pglock.ContextWithHold(ctx, unheld), k2, func(context.Context) error { return nil })
		out <- r26Result{"A", err, time.Since(t0)}
	})
	r26NoEndWithin(t, out, 2500*time.Millisecond, "ContextWithHold of an unheld Lock")
	releaseD()
	let() // B lets k2 go once granted k1
	for range 2 {
		if r := <-out; r.err != nil {
			t.Errorf("%s, once k1 was let go: %v", r.who, r.err)
		}
	}
}

// r26Database creates a database on the test server and returns its URL;
// it is dropped when the test ends.
func r26Database(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	admin := pgtest.Pool(t, 1)
	name := fmt.Sprintf("pglock_r26_%d", rand.Uint32())
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

// TestReview26OtherDatabaseIsNoCycle: advisory keys are per database, but
// the process's records of waits are one table for every PostgreSQL Locker
// (cycleRec.space is nil for all of them): a wait of a Locker on another
// database (or server) joins the graph, as a wait "no server sees", and two
// waits for the same key numbers on two databases make a cycle that does
// not exist: false ErrDeadlock.
//
// On database 1, A holds k1 and waits for k2, which a plain Lock holds; on
// database 2, B holds k2 and waits for k1, which a plain Lock holds.
// Neither waits for the other.
func TestReview26OtherDatabaseIsNoCycle(t *testing.T) {
	url2 := r26Database(t)
	for _, where := range []string{"key table", "server"} {
		t.Run(where, func(t *testing.T) {
			if where == "key table" {
				r26Skip(t, "defect: waits in a Locker's key table (pid 0) of every PostgreSQL Locker share one lock table space (cycleRec.space is nil for all), "+
					"so two such waits on two databases with the same key numbers read as a cycle; "+
					"fix: make cycleRec.space the database (the server's identity and current_database(), read once per source, e.g. at mux.init, "+
					"with the holds of holdTags filtered by it too); a config-derived host/port/database would split one database reached two ways")
			}
			bg := context.Background()
			keys := r26Keys(t, 2)
			k1, k2 := keys[0], keys[1]
			lkA := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 8, nil))
			lkB := r26Locker(t, pgtest.PoolWith(t, url2, 8, nil))
			// The plain holders: on the waiters' own Lockers (the waits
			// are in their key tables), or on Lockers of their own (the
			// waits are in the server).
			hA, hB := lkA, lkB
			if where == "server" {
				hA = r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 4, nil))
				hB = r26Locker(t, pgtest.PoolWith(t, url2, 4, nil))
			}
			_, relA := r26Hold(t, hA, k2)
			defer relA()
			_, relB := r26Hold(t, hB, k1)
			defer relB()

			ctx, cancel := context.WithTimeout(bg, 20*time.Second)
			defer cancel()
			out := make(chan r26Result, 4)
			start, release := make(chan struct{}), make(chan struct{})
			var wg sync.WaitGroup
			defer wg.Wait()
			defer cancel()
			defer close(release)
			<-r26Nested(ctx, "A (database 1)", lkA, k1, k2, start, release, out, &wg)
			<-r26Nested(ctx, "B (database 2)", lkB, k2, k1, start, release, out, &wg)
			close(start)
			r26NoEndWithin(t, out, 2500*time.Millisecond, "two databases")
			relA()
			relB()
			for range 2 {
				if r := <-out; r.err != nil {
					t.Errorf("%s, once its key was let go: %v", r.who, r.err)
				}
			}
		})
	}
}

// TestReview26LostHoldIsNoHold: a wait's record names the holds its context
// carried when the wait began, and keeps naming them after a hold is lost
// (ContextWithHold's context is not ended by a loss, unlike Do's): once
// another session takes the key, a holder that waits for it closes a cycle
// through the stale hold: false ErrDeadlock.
//
// A holds k1 (an Acquire, carried by ContextWithHold) and waits for k2,
// which C holds; A's hold of k1 is lost (its session ended); D takes k1;
// C waits for k1. C waits for D, which waits for nothing.
func TestReview26LostHoldIsNoHold(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	keys := r26Keys(t, 2)
	k1, k2 := keys[0], keys[1]
	// A's hold on a Locker of its own, so that ending its session loses
	// nothing else.
	lkH := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 4, nil))
	hA, relHA := r26Hold(t, lkH, k1)
	defer relHA()
	lk := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 8, nil))

	ctx, cancel := context.WithTimeout(bg, 20*time.Second)
	defer cancel()
	out := make(chan r26Result, 4)
	start, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	let := func() { once.Do(func() { close(release) }) }
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	defer let()
	<-r26Nested(ctx, "C", lk, k2, k1, start, release, out, &wg)
	wg.Go(func() {
		t0 := time.Now()
		err := lk.Do(pglock.ContextWithHold(ctx, hA), k2, func(context.Context) error { return nil })
		out <- r26Result{"A", err, time.Since(t0)}
	})
	time.Sleep(100 * time.Millisecond) // A waits
	holders := pgtest.Granted(t, watch, mustKey(t, k1))
	if len(holders) != 1 {
		t.Fatalf("k1 holders: %v", holders)
	}
	pgtest.Terminate(t, watch, holders[0].PID)
	select {
	case <-hA.Lost():
	case <-time.After(5 * time.Second):
		t.Fatal("A's hold was not reported lost")
	}
	_, relD := r26Hold(t, r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 4, nil)), k1)
	defer relD()
	close(start) // C waits for k1, held by D
	r26NoEndWithin(t, out, 2500*time.Millisecond, "a lost hold")
	relD()
	let() // C lets k2 go once granted k1
	for range 2 {
		if r := <-out; r.err != nil {
			t.Errorf("%s, once k1 was let go: %v", r.who, r.err)
		}
	}
}

// TestReview26DeepNestingCycleEnds: a wait names at most maxCycleTags (24)
// holds, the innermost ones, in its record too, not only in its statement's
// comment: a cycle through the 25th hold out is not seen even in one
// process, and lasts until the contexts end.
//
// A holds h0 (outermost) ... h24 and waits for x; B holds x and waits for
// h0.
func TestReview26DeepNestingCycleEnds(t *testing.T) {
	bg := context.Background()
	lk := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 8, nil))
	const depth = 25
	keys := r26Keys(t, depth+1)
	x := keys[depth]
	ctx, cancel := context.WithTimeout(bg, 8*time.Second)
	defer cancel()
	out := make(chan r26Result, 4)
	start, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	let := func() { once.Do(func() { close(release) }) }
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	defer let()
	<-r26Nested(ctx, "B", lk, x, keys[0], start, release, out, &wg)
	aHolds := make(chan struct{})
	wg.Go(func() {
		var nest func(ctx context.Context, i int) error
		nest = func(ctx context.Context, i int) error {
			if i == depth {
				close(aHolds)
				<-start
				t0 := time.Now()
				err := lk.Do(ctx, x, func(context.Context) error { return nil })
				out <- r26Result{"A", err, time.Since(t0)}
				<-release
				return nil
			}
			return lk.Do(ctx, keys[i], func(ctx context.Context) error { return nest(ctx, i+1) })
		}
		if err := nest(ctx, 0); err != nil {
			t.Errorf("A's holds: %v", err)
		}
	})
	<-aHolds
	t0 := time.Now()
	close(start)
	r := <-out
	t.Logf("%s after %v: %v", r.who, time.Since(t0), r.err)
	if !errors.Is(r.err, pglock.ErrDeadlock) {
		t.Fatalf("the first wait of a cycle through the 25th hold out to end: %s with %v; want ErrDeadlock", r.who, r.err)
	}
	if d := time.Since(t0); d > 2500*time.Millisecond {
		t.Errorf("the cycle ended after %v; want within deadlock_timeout + 1 s", d)
	}
	let()
	if r := <-out; r.err != nil {
		t.Errorf("the other wait: %v", r.err)
	}
}

// r26CheckCycle is checkCycle (one ErrDeadlock, the other wait granted
// once the victim lets go) on lks.
func r26CheckCycle(t *testing.T, lks [2]*pglock.Locker, what string) {
	t.Helper()
	checkCycle(t, lks, what)
}

// TestReview26ExecModes (HELD): a nested wait's statement runs with
// pgx.QueryExecModeExec and a per-wait text; the cycle check's statement
// runs on a lock connection or a pool connection. With a pool whose default
// exec mode is another one, cycles still end, once, on lock connections and
// with a connection per hold.
func TestReview26ExecModes(t *testing.T) {
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeSimpleProtocol, pgx.QueryExecModeDescribeExec} {
		for _, perHold := range []bool{false, true} {
			t.Run(fmt.Sprintf("%v/perhold=%v", mode, perHold), func(t *testing.T) {
				var lks [2]*pglock.Locker
				for i := range lks {
					pool := pgtest.PoolWith(t, pgtest.URL(t), 8, func(c *pgxpool.Config) { c.ConnConfig.DefaultQueryExecMode = mode })
					var opts []pglock.Option
					if perHold {
						opts = append(opts, pglock.WithMultiplexing(false))
					}
					lks[i] = r26Locker(t, pool, opts...)
				}
				r26CheckCycle(t, lks, mode.String())
			})
		}
	}
}

// TestReview26PgBouncer: through PgBouncer (session pooling), a
// connection's PgConn().PID() is PgBouncer's, not the server's, so
// cycleRec.waitsOn records a pid that pg_locks never shows: the wait counts
// as one "no server sees" as well as its server row (no record matches it),
// the server rows of an ended wait are not left out of later checks
// (newWaitGraph's ended map is by that pid), and both waits of a cycle can
// end.
func TestReview26PgBouncer(t *testing.T) {
	for _, perHold := range []bool{false, true} {
		t.Run(fmt.Sprintf("perhold=%v", perHold), func(t *testing.T) {
			bouncer := pgtest.StartPgBouncerT(t, "session", 40)
			var lks [2]*pglock.Locker
			for i := range lks {
				pool := pgtest.PoolWith(t, bouncer.URL, 8, nil)
				var opts []pglock.Option
				if perHold {
					opts = append(opts, pglock.WithMultiplexing(false))
				}
				lks[i] = r26Locker(t, pool, opts...)
			}
			for range 3 {
				r26CheckCycle(t, lks, "PgBouncer")
			}
		})
	}
}

// TestReview26SemaphoreWaitIsNoCycle: a Semaphore's head waits for every
// slot at once (waitAny), granted when any one frees; each of those waits is
// recorded as a wait of the enclosing hold, and one slot whose holder waits
// for that hold is taken for a cycle, though another slot's holder waits for
// nothing: false ErrDeadlock.
//
// A holds k1 and waits for a slot of a Semaphore of 2; B holds slot 1 and
// waits for k1; C holds slot 2 and waits for nothing (it lets go later).
func TestReview26SemaphoreWaitIsNoCycle(t *testing.T) {
	bg := context.Background()
	lk := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 12, nil))
	k1 := r26Keys(t, 1)[0]
	sem, err := lk.Semaphore(pgtest.UniqueKey(t), 2)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(bg, 20*time.Second)
	out := make(chan r26Result, 4)
	start, release, releaseC := make(chan struct{}), make(chan struct{}), make(chan struct{})
	var onceC sync.Once
	letC := func() { onceC.Do(func() { close(releaseC) }) }
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	defer close(release)
	defer letC()
	cHolds, bHolds, aHolds := make(chan struct{}), make(chan struct{}), make(chan struct{})
	wg.Go(func() {
		err := sem.Do(ctx, func(context.Context) error { close(cHolds); <-releaseC; return nil })
		if err != nil {
			t.Errorf("C: %v", err)
		}
	})
	<-cHolds
	wg.Go(func() {
		err := sem.Do(ctx, func(ctx context.Context) error {
			close(bHolds)
			<-start
			t0 := time.Now()
			err := lk.Do(ctx, k1, func(context.Context) error { return nil })
			out <- r26Result{"B (slot holder, waits for k1)", err, time.Since(t0)}
			<-release
			return nil
		})
		if err != nil {
			t.Errorf("B: %v", err)
		}
	})
	<-bHolds
	wg.Go(func() {
		err := lk.Do(ctx, k1, func(ctx context.Context) error {
			close(aHolds)
			<-start
			t0 := time.Now()
			err := sem.Do(ctx, func(context.Context) error { return nil })
			out <- r26Result{"A (holds k1, waits for a slot)", err, time.Since(t0)}
			return nil
		})
		if err != nil {
			t.Errorf("A: %v", err)
		}
	})
	<-aHolds
	close(start)
	r26NoEndWithin(t, out, 2500*time.Millisecond, "a Semaphore with a free-to-be slot")
	letC()
	for range 2 {
		if r := <-out; r.err != nil {
			t.Errorf("%s, once C let its slot go: %v", r.who, r.err)
		}
	}
}

// TestReview26KeySetPartialHoldCycleEnds: a key set (DoAll) that waits for
// its next key holds the lower ones, but its wait's context does not carry
// them (acquireSet waits with the caller's ctx): a holder that waits for one
// of them closes a cycle that no check sees, and both wait until their
// contexts end.
//
// A's DoAll holds ka and waits for kb; B holds kb and waits for ka. Either
// wait may be the one that ends (the first whose check finds the cycle).
func TestReview26KeySetPartialHoldCycleEnds(t *testing.T) {
	bg := context.Background()
	lk := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 8, nil))
	base := rand.Int64N(1 << 60)
	ka, kb := pglock.Int64Key(base), pglock.Int64Key(base+1) // DoAll takes ka first
	ctx, cancel := context.WithTimeout(bg, 6*time.Second)
	out := make(chan r26Result, 4)
	start, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	let := func() { once.Do(func() { close(release) }) }
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	defer let()
	<-r26Nested(ctx, "B (holds kb, waits for ka)", lk, kb, ka, start, release, out, &wg)
	wg.Go(func() {
		t0 := time.Now()
		err := lk.DoAll(ctx, []any{ka, kb}, func(context.Context) error { <-release; return nil })
		out <- r26Result{"A (DoAll: holds ka, waits for kb)", err, time.Since(t0)}
	})
	// A holds ka and waits for kb, held by B in the same Locker: in its
	// key table.
	locktest.WaitFor(t, "A's DoAll to wait for kb", func() bool { return lk.Stats().Queued == 1 })
	t0 := time.Now()
	close(start)
	// Either wait's check may find the cycle first and end its own wait
	// (a cycle no server sees: see cycleRec.check); the other then gets
	// its key. Its result can reach out before the ended one's.
	r := <-out
	t.Logf("%s after %v: %v", r.who, time.Since(t0), r.err)
	if r.err == nil && strings.HasPrefix(r.who, "B") {
		// B got ka: A's DoAll must have ended its wait, for the cycle.
		let()
		if a := <-out; !errors.Is(a.err, pglock.ErrDeadlock) {
			t.Fatalf("B got ka after %v, and A's DoAll ended with %v; want ErrDeadlock (the cycle ended by A's wait)", r.at, a.err)
		}
		return
	}
	if !errors.Is(r.err, pglock.ErrDeadlock) {
		t.Fatalf("the first wait of a cycle through a key set's partial hold to end: %s with %v; want ErrDeadlock", r.who, r.err)
	}
	let()
	if r := <-out; r.err != nil {
		t.Errorf("the other: %v", r.err)
	}
}

// TestReview26QueuedSharedCycleEnds: a Shared request waits behind an
// Exclusive request queued before it (PostgreSQL's queue, and the key
// table's FIFO), not only for conflicting holders; the graph has no such
// edge (a shared wait meets shared holds only), so a cycle through the
// queue never ends.
//
// S holds k Shared and waits for j; Y holds j and asks k Shared, behind E,
// a plain Exclusive wait for k queued while S held it. Y waits for E, E
// for S, S for Y.
func TestReview26QueuedSharedCycleEnds(t *testing.T) {
	r26Skip(t, "defect: a wait queued behind a conflicting wait (a Shared request behind an Exclusive one) has no edge to it, so a cycle through the queue never ends; "+
		"fix: give a wait an edge to the conflicting waits for its key queued before it (server rows ordered by pg_locks.waitstart, the key table's FIFO for local waits)")
	for _, perHold := range []bool{true, false} {
		t.Run(fmt.Sprintf("perhold=%v", perHold), func(t *testing.T) {
			bg := context.Background()
			watch := pgtest.Pool(t, 2)
			var opts []pglock.Option
			if perHold {
				opts = append(opts, pglock.WithMultiplexing(false))
			}
			// Three Lockers, so that every wait is in the server's queue.
			lkS := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 6, nil), opts...)
			lkY := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 6, nil), opts...)
			lkE := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 4, nil), opts...)
			keys := r26Keys(t, 2)
			k, j := keys[0], keys[1]
			ctx, cancel := context.WithTimeout(bg, 8*time.Second)
			out := make(chan r26Result, 4)
			startS, startY, release := make(chan struct{}), make(chan struct{}), make(chan struct{})
			var once sync.Once
			let := func() { once.Do(func() { close(release) }) }
			var wg sync.WaitGroup
			defer wg.Wait()
			defer cancel()
			defer let()
			sHolds, yHolds := make(chan struct{}), make(chan struct{})
			lS, err := lkS.NewLock(k, pglock.WithMode(pglock.Shared))
			if err != nil {
				t.Fatal(err)
			}
			wg.Go(func() {
				_ = lS.Do(ctx, func(ctx context.Context) error {
					close(sHolds)
					<-startS
					t0 := time.Now()
					err := lkS.Do(ctx, j, func(context.Context) error { return nil })
					out <- r26Result{"S (holds k Shared, waits for j)", err, time.Since(t0)}
					<-release
					return nil
				})
			})
			<-sHolds
			wg.Go(func() {
				_ = lkY.Do(ctx, j, func(ctx context.Context) error {
					close(yHolds)
					<-startY
					lY, err := lkY.NewLock(k, pglock.WithMode(pglock.Shared))
					if err != nil {
						return err
					}
					t0 := time.Now()
					err = lY.Do(ctx, func(context.Context) error { return nil })
					out <- r26Result{"Y (holds j, asks k Shared)", err, time.Since(t0)}
					<-release
					return nil
				})
			})
			<-yHolds
			wg.Go(func() {
				err := lkE.Do(ctx, k, func(context.Context) error { return nil })
				out <- r26Result{"E (plain, asks k Exclusive)", err, 0}
			})
			r26WaitWaiting(t, watch, mustKey(t, k), 1)
			t0 := time.Now()
			close(startS)
			time.Sleep(100 * time.Millisecond)
			close(startY)
			r26WaitWaiting(t, watch, mustKey(t, k), 2) // Y queued behind E
			r := <-out
			t.Logf("%s after %v: %v", r.who, time.Since(t0), r.err)
			if !errors.Is(r.err, pglock.ErrDeadlock) {
				t.Fatalf("the first wait of a cycle through the queue to end: %s with %v; want ErrDeadlock", r.who, r.err)
			}
		})
	}
}

// r26WaitWaiting waits (up to 5 s) until n sessions wait for key.
func r26WaitWaiting(t *testing.T, watch *pgxpool.Pool, key pglock.Key, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		hs, err := pgtest.Holders(context.Background(), watch, key)
		if err != nil {
			t.Fatal(err)
		}
		waiting := 0
		for _, h := range hs {
			if !h.Granted {
				waiting++
			}
		}
		if waiting >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions wait for %s, want %d: %v", waiting, key, n, hs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestReview26PreparedTransactionHold: pg_locks shows an advisory lock held
// by a prepared transaction with a NULL pid; cycleSQL reads it (a key that
// something waits for) into an int32, the scan fails, and so does every
// check of the database while anything waits for such a key: no cycle
// ends.
func TestReview26PreparedTransactionHold(t *testing.T) {
	srv := pgtest.ThrowawayT(t, map[string]string{"max_prepared_transactions": "2"})
	bg := context.Background()
	admin := pgtest.PoolWith(t, srv.URL, 2, nil)
	orphan := rand.Int64()
	conn, err := pgx.Connect(bg, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(bg, "BEGIN"); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(bg, "SELECT pg_advisory_xact_lock($1)", orphan); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(bg, "PREPARE TRANSACTION 'r26_orphan'"); err != nil {
		t.Fatal(err)
	}
	_ = conn.Close(bg)
	t.Cleanup(func() { _, _ = admin.Exec(context.Background(), "ROLLBACK PREPARED 'r26_orphan'") })

	lk := r26Locker(t, pgtest.PoolWith(t, srv.URL, 8, nil))
	// Something waits for the prepared transaction's key.
	octx, ocancel := context.WithCancel(bg)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ocancel()
	wg.Go(func() { _ = lk.Do(octx, pglock.Int64Key(orphan), func(context.Context) error { return nil }) })
	r26WaitWaitingOn(t, admin, pglock.Int64Key(orphan))
	checkCycle(t, [2]*pglock.Locker{lk, lk}, "a prepared transaction's hold in pg_locks")
}

// r26WaitWaitingOn waits (up to 5 s) until a session waits for key; it
// reads pg_locks itself (pgtest.Holders cannot read a NULL pid).
func r26WaitWaitingOn(t *testing.T, watch *pgxpool.Pool, key pglock.Key) {
	t.Helper()
	c, o, s := key.LockTag()
	deadline := time.Now().Add(5 * time.Second)
	for {
		var n int
		if err := watch.QueryRow(context.Background(), `SELECT count(*) FROM pg_catalog.pg_locks
			WHERE locktype = 'advisory' AND NOT granted AND classid = $1::oid AND objid = $2::oid AND objsubid = $3::smallint`,
			int64(c), int64(o), s).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing waits for %s", key)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The helper process of TestReview26LocalWaitsAcrossProcesses: the
// server's URL, and the keys the process holds, then waits for.
const (
	r26URLEnv   = "PGLOCK_REVIEW26_URL"
	r26OuterEnv = "PGLOCK_REVIEW26_OUTER"
	r26InnerEnv = "PGLOCK_REVIEW26_INNER"
)

// TestReview26Helper is one process of TestReview26LocalWaitsAcrossProcesses;
// run directly, it skips. A goroutine holds the outer key in a Do and prints
// "holding"; on the line "head" another goroutine waits for the inner key
// in a plain Do (no hold); on "go" the first one waits for the inner key in
// a nested Do and prints "nested granted|deadlock|error <ms> <err>"; when
// stdin closes it lets go and prints "done".
func TestReview26Helper(t *testing.T) {
	u := os.Getenv(r26URLEnv)
	if u == "" {
		t.Skip("a process of TestReview26LocalWaitsAcrossProcesses")
	}
	outer, inner := os.Getenv(r26OuterEnv), os.Getenv(r26InnerEnv)
	bg := context.Background()
	pool, err := pgxpool.New(bg, u)
	if err != nil {
		fmt.Printf("error %v\n", err)
		return
	}
	defer pool.Close()
	lk, err := pglock.NewLocker(pool)
	if err != nil {
		fmt.Printf("error %v\n", err)
		return
	}
	defer lk.Close()
	ctx, cancel := context.WithTimeout(bg, 15*time.Second)
	defer cancel()
	var mu sync.Mutex
	say := func(f string, args ...any) { mu.Lock(); fmt.Printf(f+"\n", args...); mu.Unlock() }
	goCh, doneCh := make(chan struct{}), make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		err := lk.Do(ctx, outer, func(ctx context.Context) error {
			say("holding")
			<-goCh
			t0 := time.Now()
			err := lk.Do(ctx, inner, func(context.Context) error { return nil })
			switch {
			case err == nil:
				say("nested granted %d", time.Since(t0).Milliseconds())
			case errors.Is(err, pglock.ErrDeadlock):
				say("nested deadlock %d %q", time.Since(t0).Milliseconds(), err.Error())
			default:
				say("nested error %d %q", time.Since(t0).Milliseconds(), err.Error())
			}
			<-doneCh
			return nil
		})
		if err != nil {
			say("error %q", err.Error())
		}
	})
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		switch in.Text() {
		case "head":
			wg.Go(func() {
				err := lk.Do(ctx, inner, func(context.Context) error { return nil })
				say("head %v", err)
			})
		case "go":
			close(goCh)
		}
	}
	close(doneCh)
	cancel()
	wg.Wait()
	say("done")
}

// TestReview26LocalWaitsAcrossProcesses: a nested wait that queues in its
// Locker's key table behind a plain wait (the head of the key's local queue,
// which waits in the server without a hold) is seen by no server, and its
// own process cannot see the other side's: a cycle of two such waits in two
// processes never ends.
//
// Process 1 holds k1 and process 2 holds k2 (each in a Do); a plain Do of
// k2 waits in process 1, and of k1 in process 2; then each holder waits,
// in a nested Do, for the other's key, behind its process's plain wait.
func TestReview26LocalWaitsAcrossProcesses(t *testing.T) {
	r26Skip(t, "defect: a nested wait queued in the key table behind a plain wait is seen by no server and by no other process, so a cycle of two such waits across processes never ends; "+
		"fix: a wait inside a hold does not queue behind a plain head: it waits in the server itself (on a waiting connection, with its comment), or the head's statement is re-sent with the comment of the holds queued behind it")
	u := pgtest.URL(t)
	watch := pgtest.Pool(t, 2)
	keys := r26Keys(t, 2)
	k1, k2 := keys[0], keys[1]
	type proc struct {
		stdin io.WriteCloser
		lines chan string
	}
	var procs []*proc
	for _, ks := range [][2]string{{k1, k2}, {k2, k1}} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestReview26Helper$", "-test.count=1", "-test.timeout=1m")
		cmd.Env = append(os.Environ(), r26URLEnv+"="+u, r26OuterEnv+"="+ks[0], r26InnerEnv+"="+ks[1])
		cmd.Stderr = os.Stderr
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		p := &proc{lines: make(chan string, 16)}
		if p.stdin, err = cmd.StdinPipe(); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		go func() {
			defer close(p.lines)
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				p.lines <- sc.Text()
			}
		}()
		procs = append(procs, p)
	}
	next := func(p *proc, within time.Duration, prefixes ...string) string {
		t.Helper()
		timeout := time.After(within)
		for {
			select {
			case l, ok := <-p.lines:
				if !ok {
					return ""
				}
				for _, pre := range prefixes {
					if strings.HasPrefix(l, pre) {
						return l
					}
				}
			case <-timeout:
				return ""
			}
		}
	}
	for _, p := range procs {
		if l := next(p, 20*time.Second, "holding", "error"); l != "holding" {
			t.Fatalf("a process could not take its first key: %q", l)
		}
	}
	for _, p := range procs {
		if _, err := io.WriteString(p.stdin, "head\n"); err != nil {
			t.Fatal(err)
		}
	}
	r26WaitWaiting(t, watch, mustKey(t, k1), 1)
	r26WaitWaiting(t, watch, mustKey(t, k2), 1)
	t0 := time.Now()
	for _, p := range procs {
		if _, err := io.WriteString(p.stdin, "go\n"); err != nil {
			t.Fatal(err)
		}
	}
	first := make(chan string, 2)
	for _, p := range procs {
		go func() { first <- next(p, 4*time.Second, "nested") }()
	}
	l := <-first
	if l == "" {
		l = <-first
	}
	t.Logf("after %v: %q", time.Since(t0), l)
	if !strings.HasPrefix(l, "nested deadlock") {
		t.Fatalf("no wait of a cycle of key-table waits in two processes ended within 4 s (%q); want one ErrDeadlock", l)
	}
	for _, p := range procs {
		_ = p.stdin.Close()
	}
}

// r26Quiet checks that no wait inside a hold is recorded any more and that
// no check runs for 1.1 s (a deadlock_timeout and then some).
func r26Quiet(t *testing.T, what string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for pglock.CycleRecords() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d waits inside holds still recorded after they returned", what, pglock.CycleRecords())
		}
		time.Sleep(10 * time.Millisecond)
	}
	before := pglock.DeadlockChecks()
	time.Sleep(1100 * time.Millisecond)
	if n := pglock.DeadlockChecks() - before; n != 0 {
		t.Errorf("%s: %d checks ran after every wait had returned", what, n)
	}
}

// TestReview26NothingOutlivesTheWait (HELD): a wait inside a hold that ends
// by its WithWait bound, by its context, or by the Locker's Close leaves no
// record, runs no more checks, and leaves nothing in pg_locks.
func TestReview26NothingOutlivesTheWait(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	keys := r26Keys(t, 2)
	k1, k2 := keys[0], keys[1]
	other := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 4, nil))
	_, rel := r26Hold(t, other, k2)
	defer rel()
	for _, how := range []string{"WithWait", "context", "Close"} {
		lk := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 4, nil))
		ctx, cancel := context.WithTimeout(bg, 10*time.Second)
		if how == "context" {
			var c2 context.CancelFunc
			ctx, c2 = context.WithTimeout(ctx, 1500*time.Millisecond)
			defer c2()
		}
		if how == "Close" {
			time.AfterFunc(1500*time.Millisecond, func() { _ = lk.Close() })
		}
		var opts []pglock.Option
		if how == "WithWait" {
			opts = append(opts, pglock.WithWait(1500*time.Millisecond))
		}
		before := pglock.DeadlockChecks()
		err := lk.Do(ctx, k1, func(ctx context.Context) error {
			l, err := lk.NewLock(k2, opts...)
			if err != nil {
				return err
			}
			return l.Do(ctx, func(context.Context) error { return nil })
		})
		cancel()
		if !errors.Is(err, pglock.ErrNotAcquired) || errors.Is(err, pglock.ErrDeadlock) {
			t.Errorf("%s: the nested wait ended with %v; want ErrNotAcquired, not ErrDeadlock", how, err)
		}
		if pglock.DeadlockChecks() == before {
			t.Errorf("%s: the nested wait was never checked", how)
		}
		r26Quiet(t, how)
		pgtest.WaitFree(t, watch, mustKey(t, k1))
	}
}

// TestReview26OneOffCheckConnectionsClose (HELD): with a connection per
// hold and a pool that the holds use up, a check opens a connection of its
// own (poolRows); each is closed: the server's sessions do not grow while
// the wait goes on, and the cycle is still ended.
func TestReview26OneOffCheckConnectionsClose(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	const app = "pglock-r26-oneoff"
	sessions := func() int {
		var n int
		if err := watch.QueryRow(bg, `SELECT count(*) FROM pg_stat_activity WHERE application_name = $1`, app).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	var lks [2]*pglock.Locker
	for i := range lks {
		// Two connections: the hold and the nested wait use both.
		pool := pgtest.PoolWith(t, pgtest.URL(t), 2, func(c *pgxpool.Config) { c.ConnConfig.RuntimeParams["application_name"] = app })
		lks[i] = r26Locker(t, pool, pglock.WithMultiplexing(false))
	}
	// A long wait first: the checks run on connections of their own.
	keys := r26Keys(t, 2)
	_, rel := r26Hold(t, r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 2, nil)), keys[1])
	done := make(chan error, 1)
	go func() {
		done <- lks[0].Do(bg, keys[0], func(ctx context.Context) error {
			return lks[0].Do(ctx, keys[1], func(context.Context) error { return nil })
		})
	}()
	// The hold's session and the nested wait's (in the server's queue).
	k1, err := lks[0].Key(keys[1])
	if err != nil {
		t.Fatal(err)
	}
	locktest.WaitFor(t, "the nested wait in the server", func() bool { return locktest.Waiters(t, watch, k1) == 1 })
	at := sessions()
	before := pglock.DeadlockChecks()
	locktest.WaitFor(t, "two checks", func() bool { return pglock.DeadlockChecks() >= before+2 })
	// A check counts as it starts, and closes its connection as it ends:
	// they go within seconds; a connection left open would stay.
	deadline := time.Now().Add(10 * time.Second)
	for sessions() > at && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := sessions(); n > at {
		t.Errorf("%d sessions 10 s after two checks on a used-up pool, %d before: the checks' connections stay open", n, at)
	}
	rel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	r26CheckCycle(t, lks, "a used-up pool")
}

// TestReview26ChecksPerWait: every wait inside a hold reads pg_locks and
// pg_stat_activity (twice over pg_locks, which copies the whole lock table)
// every deadlock_timeout, on its own: N waits cost N such statements a
// second, on the lock connections that every lock of the Locker shares,
// though one read a period would serve every wait of the process. Here 60
// holders wait for one hot key for 2.5 s.
func TestReview26ChecksPerWait(t *testing.T) {
	r26Skip(t, "cost: checks grow with the waits inside holds (one pg_locks read per wait per deadlock_timeout, on shared lock connections); "+
		"fix: one check per database per period for the whole process (a checker that reads the rows once and walks from every record), "+
		"started while any record waits")
	bg := context.Background()
	lk := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 8, nil))
	keys := r26Keys(t, 61)
	hot := keys[60]
	_, rel := r26Hold(t, r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 2, nil)), hot)
	ctx, cancel := context.WithTimeout(bg, 2500*time.Millisecond)
	defer cancel()
	before := pglock.DeadlockChecks()
	var wg sync.WaitGroup
	for i := range 60 {
		wg.Go(func() {
			_ = lk.Do(ctx, keys[i], func(ctx context.Context) error {
				return lk.Do(ctx, hot, func(context.Context) error { return nil })
			})
		})
	}
	wg.Wait()
	rel()
	n := pglock.DeadlockChecks() - before
	t.Logf("%d checks (pg_locks reads) for 60 waits of 2.5 s", n)
	if n > 10 {
		t.Errorf("%d checks for 60 waits of 2.5 s in one process; want a few (one a period)", n)
	}
}

// TestReview26ContextWithHoldNilContext: ContextWithHold(nil, l) returns a
// context whose parent is nil; a Do in it panics (nil pointer) inside the
// library, where a nil context given to Do is an error (ErrNotAcquired,
// "nil context").
func TestReview26ContextWithHoldNilContext(t *testing.T) {
	lk := r26Locker(t, pgtest.PoolWith(t, pgtest.URL(t), 4, nil))
	keys := r26Keys(t, 2)
	l, rel := r26Hold(t, lk, keys[0])
	defer rel()
	var err error
	func() {
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("panic: %v", p)
			}
		}()
		//lint:ignore SA1012 the nil context is the input under test
		err = lk.Do(pglock.ContextWithHold(nil, l), keys[1], func(context.Context) error { return nil }) //nolint:staticcheck
	}()
	if !errors.Is(err, pglock.ErrNotAcquired) {
		t.Fatalf("Do in ContextWithHold(nil, l) = %v; want ErrNotAcquired (nil context)", err)
	}
}
