package pglock_test

import (
	"bufio"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Issue 24, deadlocks that end. With lock connections (and with a pool
// connection per hold) a hold lives on one session and the next wait of its
// holder on another, so PostgreSQL's deadlock detector never sees a cycle
// of such waits; the library finds it (see deadlock.go).

// The deadlock test's child processes: the server's URL, the keys the child
// holds then waits for, and how its Locker is made.
const (
	cycleURLEnv  = "PGLOCK_TEST_CYCLE_URL"
	cycleKeysEnv = "PGLOCK_TEST_CYCLE_KEYS"
	cycleModeEnv = "PGLOCK_TEST_CYCLE_MODE"
)

// cycleLocker makes the Locker of a deadlock test: "mux" (the default
// Locker), "perhold" (WithMultiplexing(false)) or "sql" (a default Locker on
// a *sql.DB).
func cycleLocker(ctx context.Context, url, mode string) (*pglock.Locker, func(), error) {
	if mode == "sql" {
		db, err := sql.Open("pgx", url)
		if err != nil {
			return nil, nil, err
		}
		lk, err := pglock.NewLocker(db)
		if err != nil {
			_ = db.Close()
			return nil, nil, err
		}
		return lk, func() { lk.Close(); _ = db.Close() }, nil
	}
	// A pool that holds and nested waits cannot use up (with a connection
	// per hold, each holder that waits uses two).
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, nil, err
	}
	cfg.MaxConns = 24
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	var opts []pglock.Option
	if mode == "perhold" {
		opts = append(opts, pglock.WithMultiplexing(false))
	}
	lk, err := pglock.NewLocker(pool, opts...)
	if err != nil {
		pool.Close()
		return nil, nil, err
	}
	return lk, func() { lk.Close(); pool.Close() }, nil
}

// TestDeadlockHelper is one process of TestDeadlockAcrossProcesses; run
// directly, it skips. It holds its first key in a Do, prints "holding",
// waits for a line on stdin, then, inside the Do, takes its second key in a
// nested Do and prints "granted" or "deadlock" or "error <err>", with the
// time the wait took; it lets go when stdin closes, and prints "done".
func TestDeadlockHelper(t *testing.T) {
	url := os.Getenv(cycleURLEnv)
	if url == "" {
		t.Skip("a process of the deadlock test")
	}
	keys := strings.Split(os.Getenv(cycleKeysEnv), ",")
	bg := context.Background()
	lk, done, err := cycleLocker(bg, url, os.Getenv(cycleModeEnv))
	if err != nil {
		fmt.Printf("error %v\n", err)
		os.Exit(2)
	}
	defer done()
	in := bufio.NewScanner(os.Stdin)
	ctx, cancel := context.WithTimeout(bg, 30*time.Second)
	defer cancel()
	err = lk.Do(ctx, keys[0], func(ctx context.Context) error {
		fmt.Println("holding")
		in.Scan()
		start := time.Now()
		err := lk.Do(ctx, keys[1], func(context.Context) error {
			fmt.Printf("granted %d\n", time.Since(start).Milliseconds())
			return nil
		})
		switch {
		case errors.Is(err, pglock.ErrDeadlock):
			fmt.Printf("deadlock %d %q\n", time.Since(start).Milliseconds(), err.Error())
		case err != nil:
			fmt.Printf("error %d %q\n", time.Since(start).Milliseconds(), err.Error())
		}
		in.Scan() // until stdin closes
		return nil
	})
	if err != nil {
		fmt.Printf("error 0 %q\n", err.Error())
	}
	fmt.Println("done")
}

// TestDeadlockAcrossProcesses: two processes, A holds k1 and waits for k2,
// B holds k2 and waits for k1, with default Lockers (lock connections), with
// WithMultiplexing(false) (a pool connection per hold) and on a *sql.DB: one
// wait fails with ErrDeadlock within deadlock_timeout (1 s) + 1 s of the
// cycle's closing, the other is granted once that side lets go, and nothing
// is left in pg_locks.
func TestDeadlockAcrossProcesses(t *testing.T) {
	for _, mode := range []string{"mux", "perhold", "sql"} {
		t.Run(mode, func(t *testing.T) {
			url := pgtest.URL(t)
			db := pgtest.Pool(t, 4)
			k1 := pgtest.UniqueKey(t) + "-1"
			k2 := pgtest.UniqueKey(t) + "-2"
			var procs []*child
			for _, keys := range []string{k1 + "," + k2, k2 + "," + k1} {
				procs = append(procs, startChild(t, "TestDeadlockHelper", cycleURLEnv+"="+url, cycleKeysEnv+"="+keys, cycleModeEnv+"="+mode))
			}
			// line returns p's next line that starts with one of prefixes
			// ("" if none came within 20 s, or p ended); next fails the
			// test then.
			line := func(p *child, prefixes ...string) string {
				timeout := time.After(20 * time.Second)
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
			next := func(p *child, prefixes ...string) string {
				t.Helper()
				l := line(p, prefixes...)
				if l == "" {
					t.Fatalf("no line starting with %q within 20 s", prefixes)
				}
				return l
			}
			for _, p := range procs {
				if l := next(p, "holding", "error"); l != "holding" {
					t.Fatalf("a process could not take its first key: %s", l)
				}
			}
			// Both wait at once: the cycle closes as the later one starts.
			start := time.Now()
			for _, p := range procs {
				if _, err := io.WriteString(p.stdin, "go\n"); err != nil {
					t.Fatal(err)
				}
			}
			// The first answer must be a deadlock, within 2 s of the cycle.
			first := make(chan [2]any, 2)
			for i, p := range procs {
				go func() { first <- [2]any{i, line(p, "granted", "deadlock", "error")} }()
			}
			r := <-first
			elapsed := time.Since(start)
			victim, got := r[0].(int), r[1].(string)
			t.Logf("%s: process %d after %v: %s", mode, victim, elapsed, got)
			if !strings.HasPrefix(got, "deadlock") {
				t.Fatalf("the first wait to end: %s; want a deadlock", got)
			}
			if elapsed > 2*time.Second+500*time.Millisecond {
				t.Errorf("the cycle was ended %v after the waits began; want within deadlock_timeout + 1 s (+0.5 s for the processes' lines)", elapsed)
			}
			// The victim lets its first key go; the other is granted.
			_ = procs[victim].stdin.Close()
			if l := next(procs[victim], "done"); l != "done" {
				t.Fatal(l)
			}
			other := <-first
			t.Logf("%s: process %d: %s", mode, other[0], other[1])
			if !strings.HasPrefix(other[1].(string), "granted") {
				t.Errorf("the other wait: %s; want granted once the victim let go", other[1])
			}
			_ = procs[1-victim].stdin.Close()
			next(procs[1-victim], "done")
			for _, p := range procs {
				_ = p.cmd.Wait()
			}
			for _, k := range []string{k1, k2} {
				key, _ := pglock.KeyOf(k)
				pgtest.WaitFree(t, db, key)
			}
		})
	}
}

// TestDeadlockInOneLocker: two goroutines of one default Locker, each
// holding one key and waiting for the other's in a nested Do, wait in the
// Locker's own key table, where no server sees them: one fails with
// ErrDeadlock within a second or two, the other is granted; the same for a
// Locker made WithMultiplexing(false), whose waits are in the server.
func TestDeadlockInOneLocker(t *testing.T) {
	for _, mode := range []string{"mux", "perhold"} {
		t.Run(mode, func(t *testing.T) {
			bg := context.Background()
			lk, done, err := cycleLocker(bg, pgtest.URL(t), mode)
			if err != nil {
				t.Fatal(err)
			}
			defer done()
			checkCycle(t, [2]*pglock.Locker{lk, lk}, mode)
		})
	}
}

// TestDeadlockAcrossLockers: the same between two Lockers of one process,
// on pools of their own (the server's queue on one side, the key table on
// none).
func TestDeadlockAcrossLockers(t *testing.T) {
	bg := context.Background()
	var lks [2]*pglock.Locker
	for i := range lks {
		lk, done, err := cycleLocker(bg, pgtest.URL(t), "mux")
		if err != nil {
			t.Fatal(err)
		}
		defer done()
		lks[i] = lk
	}
	checkCycle(t, lks, "two Lockers")
}

// checkCycle runs the cycle on lks (goroutine i on lks[i]).
func checkCycle(t *testing.T, lks [2]*pglock.Locker, what string) {
	t.Helper()
	bg := context.Background()
	k1 := pgtest.UniqueKey(t) + "-1"
	k2 := pgtest.UniqueKey(t) + "-2"
	keys := [2][2]string{{k1, k2}, {k2, k1}}
	ctx, cancel := context.WithTimeout(bg, 20*time.Second)
	defer cancel()
	var holding, waiting sync.WaitGroup
	holding.Add(2)
	waiting.Add(1)
	type result struct {
		i       int
		err     error
		elapsed time.Duration
	}
	results := make(chan result, 2)
	release := [2]chan struct{}{make(chan struct{}), make(chan struct{})}
	var once [2]sync.Once
	let := func(i int) { once[i].Do(func() { close(release[i]) }) }
	defer func() { let(0); let(1) }()
	var start time.Time
	for i := range 2 {
		go func() {
			err := lks[i].Do(ctx, keys[i][0], func(ctx context.Context) error {
				holding.Done()
				waiting.Wait()
				err := lks[i].Do(ctx, keys[i][1], func(context.Context) error { return nil })
				results <- result{i, err, time.Since(start)}
				<-release[i]
				return nil
			})
			if err != nil {
				results <- result{i, fmt.Errorf("outer Do: %w", err), 0}
			}
		}()
	}
	holding.Wait()
	start = time.Now()
	waiting.Done()
	r := <-results
	t.Logf("%s: goroutine %d after %v: %v", what, r.i, r.elapsed, r.err)
	if !errors.Is(r.err, pglock.ErrDeadlock) || !errors.Is(r.err, pglock.ErrNotAcquired) {
		t.Fatalf("the first wait to end: %v; want ErrDeadlock and ErrNotAcquired", r.err)
	}
	if r.elapsed > 2*time.Second {
		t.Errorf("the cycle was ended after %v; want within deadlock_timeout + 1 s", r.elapsed)
	}
	let(r.i)
	other := <-results
	if other.err != nil {
		t.Errorf("the other wait: %v; want granted once the victim let go", other.err)
	}
	let(other.i)
}

// TestLongWaitIsNoDeadlock: a holder that waits for a key whose holder is
// busy, not waiting, is not in a cycle: its wait goes on past several
// checks and is granted when the key is let go.
func TestLongWaitIsNoDeadlock(t *testing.T) {
	bg := context.Background()
	db := pgtest.Pool(t, 2)
	lk, done, err := cycleLocker(bg, pgtest.URL(t), "mux")
	if err != nil {
		t.Fatal(err)
	}
	defer done()
	k1 := pgtest.UniqueKey(t) + "-1"
	k2 := pgtest.UniqueKey(t) + "-2"
	other, err := lk.NewLock(k2)
	if err != nil {
		t.Fatal(err)
	}
	if err := other.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	// k2's holder waits for nothing; a goroutine holds k1 and waits for k2.
	errc := make(chan error, 1)
	waiting := make(chan struct{})
	go func() {
		errc <- lk.Do(bg, k1, func(ctx context.Context) error {
			close(waiting)
			return lk.Do(ctx, k2, func(context.Context) error { return nil })
		})
	}()
	<-waiting
	// Three checks of this wait (no other test runs in parallel here).
	before := pglock.DeadlockChecks()
	for pglock.DeadlockChecks() < before+3 {
		select {
		case err := <-errc:
			t.Fatalf("the wait ended while k2 was held: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	if pgtest.Granted(t, db, mustKey(t, k1)) == nil {
		t.Fatal("k1 is not held while its holder waits")
	}
	if err := other.Release(bg); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("the wait, once k2 was let go: %v", err)
	}
}

// TestDeadlockOfThree: three Lockers (as three replicas), each holding one
// key and waiting for the next one's: one wait ends with ErrDeadlock, then
// the other two are granted in turn.
func TestDeadlockOfThree(t *testing.T) {
	bg := context.Background()
	const n = 3
	var lks [n]*pglock.Locker
	for i := range lks {
		lk, done, err := cycleLocker(bg, pgtest.URL(t), []string{"mux", "perhold", "mux"}[i])
		if err != nil {
			t.Fatal(err)
		}
		defer done()
		lks[i] = lk
	}
	var keys [n]string
	for i := range keys {
		keys[i] = fmt.Sprintf("%s-%d", pgtest.UniqueKey(t), i)
	}
	ctx, cancel := context.WithTimeout(bg, 20*time.Second)
	defer cancel()
	var holding, waiting sync.WaitGroup
	holding.Add(n)
	waiting.Add(1)
	type result struct {
		i   int
		err error
	}
	results := make(chan result, n)
	var outer sync.WaitGroup
	for i := range n {
		outer.Go(func() {
			_ = lks[i].Do(ctx, keys[i], func(ctx context.Context) error {
				holding.Done()
				waiting.Wait()
				err := lks[i].Do(ctx, keys[(i+1)%n], func(context.Context) error { return nil })
				results <- result{i, err}
				return nil
			})
		})
	}
	holding.Wait()
	start := time.Now()
	waiting.Done()
	deadlocks := 0
	for range n {
		r := <-results
		t.Logf("replica %d after %v: %v", r.i, time.Since(start), r.err)
		switch {
		case errors.Is(r.err, pglock.ErrDeadlock):
			deadlocks++
		case r.err != nil:
			t.Errorf("replica %d: %v", r.i, r.err)
		}
	}
	outer.Wait()
	if deadlocks != 1 {
		t.Errorf("%d waits ended as deadlocks, want 1", deadlocks)
	}
}

// TestDeadlockTransactionScope: the same cycle between two Lockers in
// Transaction scope (a transaction of its own per hold, on a pool
// connection each).
func TestDeadlockTransactionScope(t *testing.T) {
	var lks [2]*pglock.Locker
	for i := range lks {
		pool := pgtest.Pool(t, 8)
		lk, err := pglock.NewLocker(pool, pglock.WithScope(pglock.Transaction))
		if err != nil {
			t.Fatal(err)
		}
		defer lk.Close()
		lks[i] = lk
	}
	checkCycle(t, lks, "Transaction scope")
}

// TestDeadlockStorm races goroutines of two Lockers that each take a key,
// then another inside it, for a few seconds. With random pairs every wait
// ends, granted or with ErrDeadlock, never by its context's end; with the
// keys always taken in the same order there is no cycle, and no wait ends
// with ErrDeadlock. Nothing is left locked.
func TestDeadlockStorm(t *testing.T) {
	for _, ordered := range []bool{true, false} {
		name := map[bool]string{true: "ordered", false: "random"}[ordered]
		t.Run(name, func(t *testing.T) {
			bg := context.Background()
			db := pgtest.Pool(t, 2)
			var lks [2]*pglock.Locker
			for i := range lks {
				lk, done, err := cycleLocker(bg, pgtest.URL(t), []string{"mux", "perhold"}[i])
				if err != nil {
					t.Fatal(err)
				}
				defer done()
				lks[i] = lk
			}
			const nkeys = 4
			var keys [nkeys]string
			for i := range keys {
				keys[i] = fmt.Sprintf("%s-%d", pgtest.UniqueKey(t), i)
			}
			var granted, deadlocks atomic.Int64
			deadline := time.Now().Add(4 * time.Second)
			var wg sync.WaitGroup
			errs := make(chan error, 64)
			for g := range 8 {
				lk := lks[g%2]
				wg.Go(func() {
					rng := rand.New(rand.NewPCG(uint64(g), uint64(time.Now().UnixNano())))
					for time.Now().Before(deadline) {
						a, b := rng.IntN(nkeys), rng.IntN(nkeys-1)
						if b >= a {
							b++
						}
						if ordered && a > b {
							a, b = b, a
						}
						ctx, cancel := context.WithTimeout(bg, 15*time.Second)
						err := lk.Do(ctx, keys[a], func(ctx context.Context) error {
							return lk.Do(ctx, keys[b], func(context.Context) error {
								granted.Add(1)
								return nil
							})
						})
						cancel()
						switch {
						case err == nil:
						case errors.Is(err, pglock.ErrDeadlock):
							deadlocks.Add(1)
						default:
							errs <- err
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Errorf("a wait ended otherwise than granted or as a deadlock: %v", err)
			}
			t.Logf("%s: %d nested holds granted, %d waits ended as deadlocks", name, granted.Load(), deadlocks.Load())
			if ordered && deadlocks.Load() != 0 {
				t.Errorf("%d deadlocks reported with the keys taken in one order", deadlocks.Load())
			}
			if !ordered && deadlocks.Load() == 0 {
				t.Errorf("no deadlock in a storm of random pairs: the test proved nothing")
			}
			for _, k := range keys {
				pgtest.WaitFree(t, db, mustKey(t, k))
			}
		})
	}
}
