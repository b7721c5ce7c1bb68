package pglock_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// The fleet test's child processes: the server's URL and the child's number.
const (
	fleetURLEnv = "PGLOCK_TEST_FLEET_URL"
	fleetIDEnv  = "PGLOCK_TEST_FLEET_ID"
)

// fleetLockers is how many default Lockers each process of the fleet runs;
// fleetTries how many keys each tries.
const (
	fleetProcesses = 4
	fleetLockers   = 3
	fleetTries     = 2000
)

// TestGuardFleetHelper is a replica of the fleet test; run directly, it
// skips. It runs fleetLockers default Lockers, each on a pool of its own,
// that try fleetTries keys each (from 4 goroutines), then prints
// "held H refused R lost L other O" (lost: acquires that returned true whose
// Lost() closed since), waits for its stdin to close, releases everything,
// and prints "released".
func TestGuardFleetHelper(t *testing.T) {
	url := os.Getenv(fleetURLEnv)
	if url == "" {
		t.Skip("a replica of the fleet test")
	}
	id := os.Getenv(fleetIDEnv)
	bg := context.Background()
	results := make([]guardTries, fleetLockers)
	var wg sync.WaitGroup
	for r := range fleetLockers {
		pool, err := pgxpool.New(bg, url)
		if err != nil {
			fmt.Printf("error %v\n", err)
			os.Exit(2)
		}
		defer pool.Close()
		lk, err := pglock.NewLocker(pool)
		if err != nil {
			fmt.Printf("error %v\n", err)
			os.Exit(2)
		}
		defer lk.Close()
		wg.Go(func() {
			results[r] = tryKeys(lk, fleetTries, 4, func(i int) string { return fmt.Sprintf("fleet-%s-%d-%d", id, r, i) })
		})
	}
	wg.Wait()
	var held []*pglock.Lock
	refused, other := 0, 0
	for _, r := range results {
		held, refused, other = append(held, r.held...), refused+r.refused, other+r.other
		if r.firstOther != nil {
			fmt.Fprintf(os.Stderr, "TryAcquire: %v\n", r.firstOther)
		}
	}
	// A lost hold's Release says why. A lock connection whose statement
	// the server did not answer within its bound (1 s) is closed, and its
	// locks reported lost: the client's own bound, on a machine starved of
	// CPU, not the guard's failure. Any other loss is.
	lost, timedOut := 0, 0
	for _, l := range held {
		select {
		case <-l.Lost():
			lost++
			err := l.Release(bg)
			if lostByStatementBound(err) {
				timedOut++
			} else {
				fmt.Fprintf(os.Stderr, "lost: %v\n", err)
			}
		default:
		}
	}
	fmt.Printf("held %d refused %d lost %d other %d timedout %d\n", len(held), refused, lost, other, timedOut)
	_, _ = io.Copy(io.Discard, os.Stdin)
	for _, l := range held {
		wg.Go(func() {
			if err := l.Release(bg); err != nil {
				fmt.Fprintf(os.Stderr, "Release: %v\n", err)
			}
		})
	}
	wg.Wait()
	fmt.Println("released")
}

// Issue 20, item 3, across processes: on a server with PostgreSQL's default
// lock table (max_locks_per_transaction 64, max_connections 100: 6,400
// slots), four replica processes of three default Lockers each (each Locker
// allowed a quarter of the table, so twelve of them could ask for three
// times it) take keys until refused. Beside them, an innocent session creates
// tables and opens connections and an innocent Locker holds five keys: the
// session never sees "out of shared memory", the Locker never loses a lock,
// every acquire that returned true is held and in pg_locks unless it was
// reported lost by its connection's statement bound (a starved machine; the
// innocent Locker's likewise, see checkUnharmed), the
// refusals are ErrTooManyLocks, and the fleet stops near three quarters of
// the table. Nothing is left when the replicas release.
func TestGuardFleetOfProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a server and four processes")
	}
	srv := pgtest.ThrowawayT(t, map[string]string{"max_locks_per_transaction": "64", "max_connections": "100"})
	const capacity = 64 * 100
	bg := context.Background()
	watch, err := pgx.Connect(bg, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer watch.Close(bg)

	innocentPool, err := pgxpool.New(bg, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer innocentPool.Close()
	innocentHeld := innocentLocks(t, muxLocker(t, innocentPool))
	stopBystander := startBystander(t, srv.URL)

	var replicas []*child
	for id := range fleetProcesses {
		replicas = append(replicas, startChild(t, "TestGuardFleetHelper",
			fleetURLEnv+"="+srv.URL, fmt.Sprintf("%s=%d", fleetIDEnv, id)))
	}
	// next returns the replica's next line that starts with prefix.
	next := func(r *child, prefix string) string {
		t.Helper()
		timer := time.NewTimer(2 * time.Minute)
		defer timer.Stop()
		for {
			select {
			case line, ok := <-r.lines:
				if !ok {
					t.Fatalf("replica exited before %q: stderr: %s", prefix, r.stderr.String())
				}
				if strings.HasPrefix(line, "error ") {
					t.Fatalf("replica: %s", line)
				}
				if strings.HasPrefix(line, prefix) {
					return line
				}
			case <-timer.C:
				t.Fatalf("replica did not say %q", prefix)
			}
		}
	}
	var held, refused, lostAll int
	for i, r := range replicas {
		line := next(r, "held ")
		var h, rf, lost, other, timedOut int
		if _, err := fmt.Sscanf(line, "held %d refused %d lost %d other %d timedout %d", &h, &rf, &lost, &other, &timedOut); err != nil {
			t.Fatalf("replica %d: %q: %v", i, line, err)
		}
		t.Logf("replica %d: %s", i, line)
		if lost > timedOut {
			t.Errorf("INVARIANT nil-means-held: replica %d lost %d of its %d locks, %d of them not by its statement bound: %s",
				i, lost, h, lost-timedOut, r.stderr.String())
		}
		lostAll += lost
		if other > 0 {
			t.Errorf("replica %d: %d acquires failed with another error than ErrTooManyLocks: %s", i, other, r.stderr.String())
		}
		held += h
		refused += rf
	}
	innocentHeld = checkUnharmed(t, stopBystander(), innocentHeld)
	var granted int
	if err := watch.QueryRow(bg, `SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted`).Scan(&granted); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d processes of %d Lockers took %d locks, %d refused; pg_locks: %d advisory granted (with the innocent Locker's 5)",
		fleetProcesses, fleetLockers, held, refused, granted)
	if want := held - lostAll + len(innocentHeld); granted != want {
		t.Errorf("INVARIANT nil-means-held: pg_locks holds %d advisory locks, the replicas (but for %d reported lost) and the innocent Locker %d",
			granted, lostAll, want)
	}
	// Three quarters of the table, and each Locker's overshoot between its
	// counts (a sixty-fourth of the table, or an eighth of what it held).
	if limit := capacity*3/4 + fleetProcesses*fleetLockers*capacity/64 + capacity*3/4/8; granted > limit {
		t.Errorf("INVARIANT server-wide-guard: the fleet took %d locks together, want at most %d (3/4 of the %d-slot table, and the guard's overshoot)",
			granted, limit, capacity)
	}
	if refused == 0 {
		t.Error("nothing was refused: the fleet did not reach the guard")
	}
	for i, r := range replicas {
		_ = r.stdin.Close()
		next(r, "released")
		if err := r.cmd.Wait(); err != nil {
			t.Errorf("replica %d: %v: %s", i, err, r.stderr.String())
		}
	}
	for _, l := range innocentHeld {
		if err := l.Release(bg); err != nil {
			t.Errorf("Release: %v", err)
		}
	}
	waitNoAdvisory(t, watch)
}

// lockedBuilder is a strings.Builder that a process's output copier writes
// while the test reads it.
type lockedBuilder struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuilder) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuilder) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
