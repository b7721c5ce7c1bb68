package pglock_test

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Issue 24's proofs, across processes: the semaphore's bound and the key
// sets' exclusion hold between real processes (each with its own default
// Locker on its own pool), not only between Lockers of one process. The
// children are this test binary run again (see startChild); each writes the
// interval of every grant (wall-clock UnixNano at the start of the function
// and just before it returns: inside the hold) to a file the parent names,
// and the parent checks the merged history.

// The children's environment: the server, the child's role and number, the
// name its keys derive from, the semaphore's size, and the file it writes
// its intervals to.
const (
	p24URLEnv  = "PGLOCK_TEST_P24_URL"
	p24RoleEnv = "PGLOCK_TEST_P24_ROLE"
	p24IDEnv   = "PGLOCK_TEST_P24_ID"
	p24NameEnv = "PGLOCK_TEST_P24_NAME"
	p24SizeEnv = "PGLOCK_TEST_P24_SIZE"
	p24OutEnv  = "PGLOCK_TEST_P24_OUT"
)

const (
	// p24SemProcesses processes of p24SemGoroutines goroutines loop Do on a
	// Semaphore of p24SemSize slots for p24SemRun.
	p24SemProcesses  = 3
	p24SemGoroutines = 20
	p24SemSize       = 3
	p24SemRun        = 10 * time.Second
	// p24SetProcesses processes of p24SetGoroutines goroutines take
	// p24SetEach random sets of 3 of p24SetKeys keys each, with DoAll.
	p24SetProcesses  = 2
	p24SetGoroutines = 4
	p24SetEach       = 250 // 2,000 sets in all, as issue 24 asks
	p24SetKeys       = 10
)

// "error" line.
func p24Child(url string) (*pglock.Locker, func()) {
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		p24Exit(err)
	}
	lk, err := pglock.NewLocker(pool)
	if err != nil {
		p24Exit(err)
	}
	return lk, func() { _ = lk.Close(); pool.Close() }
}

// p24Exit ends a child that could not do its part.
func p24Exit(err error) {
	fmt.Printf("error %q\n", err.Error())
	os.Exit(2)
}

// p24Interval is one grant as a child saw it (UnixNano): when its Do was
// called, when the function began and was about to return, and when Do
// returned (its release done); proc is the child, and keys (for key sets)
// a bit per key of the set.
type p24Interval struct {
	proc                          int
	keys                          int
	called, start, stop, returned int64
}

// p24Read reads the intervals a child wrote to path (lines "keys called
// start stop returned").
func p24Read(t *testing.T, path string, proc int) []p24Interval {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []p24Interval
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var v [5]int64
		fields := strings.Fields(sc.Text())
		if len(fields) != len(v) {
			t.Fatalf("%s: %q", path, sc.Text())
		}
		for i, s := range fields {
			if v[i], err = strconv.ParseInt(s, 10, 64); err != nil {
				t.Fatalf("%s: %q: %v", path, sc.Text(), err)
			}
		}
		if v[1] > v[2] || v[2] > v[3] || v[3] > v[4] {
			t.Fatalf("%s: an interval that ends before it starts: %q", path, sc.Text())
		}
		out = append(out, p24Interval{proc: proc, keys: int(v[0]), called: v[1], start: v[2], stop: v[3], returned: v[4]})
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// p24Write writes intervals to path, one line each.
func p24Write(path string, intervals []p24Interval) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	for _, iv := range intervals {
		fmt.Fprintf(w, "%d %d %d %d %d\n", iv.keys, iv.called, iv.start, iv.stop, iv.returned)
	}
	return errors.Join(w.Flush(), f.Close())
}

// p24MaxOverlap returns the most intervals that were inside their holds at
// one instant. An interval that ends at the instant another starts does
// not overlap it.
func p24MaxOverlap(intervals []p24Interval) int {
	type event struct {
		at    int64
		delta int
	}
	events := make([]event, 0, 2*len(intervals))
	for _, iv := range intervals {
		events = append(events, event{iv.start, 1}, event{iv.stop, -1})
	}
	slices.SortFunc(events, func(a, b event) int {
		return cmp.Or(cmp.Compare(a.at, b.at), cmp.Compare(a.delta, b.delta)) // ends first
	})
	cur, most := 0, 0
	for _, e := range events {
		cur += e.delta
		most = max(most, cur)
	}
	return most
}

// p24Percentile returns the p-th percentile of sorted.
func p24Percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)*p/100, len(sorted)-1)]
}

// TestProof24SemaphoreChild is one process of TestSemaphoreAcrossProcesses;
// run directly, it skips. It prints "ready" once its Locker is connected,
// waits for a line on stdin, then runs p24SemGoroutines goroutines that
// loop Do on the Semaphore for p24SemRun, each wait with a cancellable
// context, one in five of them cancelled (or timed out) after 0-20 ms. It
// writes its grants' intervals to the file named by p24OutEnv and prints
// "done grants G storms S cancelled C connecting K failed F fewest M" (S:
// the waits given a short context, C: those it ended, K of them while a
// connection was being opened; M: the fewest grants of one goroutine), then closes its Locker when stdin closes.
func TestProof24SemaphoreChild(t *testing.T) {
	url := os.Getenv(p24URLEnv)
	if url == "" || os.Getenv(p24RoleEnv) != "semaphore" {
		t.Skip("a process of TestSemaphoreAcrossProcesses")
	}
	bg := context.Background()
	n, err := strconv.Atoi(os.Getenv(p24SizeEnv))
	if err != nil {
		p24Exit(err)
	}
	lk, closeLocker := p24Child(url)
	defer closeLocker()
	s, err := lk.Semaphore(os.Getenv(p24NameEnv), n)
	if err != nil {
		p24Exit(err)
	}
	// Connected before the race starts.
	if _, err := s.TryDo(bg, func(context.Context) error { return nil }); err != nil {
		p24Exit(err)
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	in.Scan()

	until := time.Now().Add(p24SemRun)
	grants := make([][]p24Interval, p24SemGoroutines)
	storms := make([]int, p24SemGoroutines)
	cancelled := make([]int, p24SemGoroutines)
	connecting := make([]int, p24SemGoroutines)
	failed := make([]int, p24SemGoroutines)
	var wg sync.WaitGroup
	for g := range p24SemGoroutines {
		wg.Go(func() {
			for time.Now().Before(until) {
				ctx, cancel := context.WithCancel(bg)
				stopTimer := func() bool { return false }
				storm := rand.IntN(5) == 0
				if storm {
					storms[g]++
					// Half cancelled, half past a deadline.
					d := rand.N(20 * time.Millisecond)
					if rand.IntN(2) == 0 {
						stopTimer = time.AfterFunc(d, cancel).Stop
					} else {
						ctx, cancel = context.WithTimeout(ctx, d)
					}
				}
				called := time.Now().UnixNano()
				ran := false
				err := s.Do(ctx, func(context.Context) error {
					ran = true
					start := time.Now().UnixNano()
					time.Sleep(rand.N(5 * time.Millisecond))
					grants[g] = append(grants[g], p24Interval{called: called, start: start, stop: time.Now().UnixNano()})
					return nil
				})
				if ran {
					grants[g][len(grants[g])-1].returned = time.Now().UnixNano()
				}
				stopTimer()
				// A deadline that has passed counts as ended even before
				// the context's timer fires (on a loaded machine it can
				// fire after Do returned): the library sees it so too
				// (lockconn.ContextEnded).
				ended := context.Cause(ctx)
				if dl, ok := ctx.Deadline(); ended == nil && ok && !time.Now().Before(dl) {
					ended = context.DeadlineExceeded
				}
				storm = storm && ended != nil
				cancel()
				switch {
				case err == nil:
				case storm && !ran && errors.Is(err, pglock.ErrNotAcquired) && errors.Is(err, ended):
					cancelled[g]++
				case storm && !ran && errors.Is(err, pglock.ErrNotAcquired) && errors.Is(err, pglock.ErrUnavailable) &&
					errors.Is(ended, context.DeadlineExceeded):
					// A deadline that passed while a connection was being
					// opened: ErrUnavailable, not the deadline (see
					// ErrUnavailable's doc).
					cancelled[g]++
					connecting[g]++
				default:
					failed[g]++
					fmt.Fprintf(os.Stderr, "Do: %v\n", err)
				}
			}
		})
	}
	wg.Wait()
	var all []p24Interval
	fewest := -1
	for _, gs := range grants {
		all = append(all, gs...)
		if fewest < 0 || len(gs) < fewest {
			fewest = len(gs)
		}
	}
	if err := p24Write(os.Getenv(p24OutEnv), all); err != nil {
		p24Exit(err)
	}
	fmt.Printf("done grants %d storms %d cancelled %d connecting %d failed %d fewest %d\n",
		len(all), p24Sum(storms), p24Sum(cancelled), p24Sum(connecting), p24Sum(failed), fewest)
	_, _ = io.Copy(io.Discard, os.Stdin)
}

func p24Sum(xs []int) (n int) {
	for _, x := range xs {
		n += x
	}
	return n
}

// Issue 24, semaphores, across processes: p24SemProcesses processes x
// p24SemGoroutines goroutines loop Do on one Semaphore of p24SemSize slots
// for p24SemRun, with a storm of cancelled waits. Their merged grant
// intervals never overlap more than the size, and reach it; the slot locks
// sampled in pg_locks every 5 ms never exceed it; every goroutine of every
// process gets turns; nothing of the Semaphore is held once the loops end
// (the children's Lockers still open: a cancelled wait that kept a slot
// would show), nor after they exit. It reports the time from a release to
// the grant of a waiter.
func TestSemaphoreAcrossProcesses(t *testing.T) {
	const n = p24SemSize
	url := pgtest.URL(t)
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	var slotKeys []pglock.Key
	for i := range n {
		k, err := pglock.KeyOf(fmt.Sprintf("%s#%d", name, i))
		if err != nil {
			t.Fatal(err)
		}
		slotKeys = append(slotKeys, k)
	}
	queueKey, err := pglock.KeyOf(name + "#queue")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	procs := make([]*child, p24SemProcesses)
	for i := range procs {
		procs[i] = startChild(t, "TestProof24SemaphoreChild",
			p24URLEnv+"="+url, p24RoleEnv+"=semaphore", p24NameEnv+"="+name,
			p24SizeEnv+"="+strconv.Itoa(n), p24OutEnv+"="+filepath.Join(dir, strconv.Itoa(i)))
	}
	for _, p := range procs {
		p.next(t, "ready")
	}

	// Sample the slot locks granted, every 5 ms, from a connection of the
	// parent's.
	classids, objids := lockTags(slotKeys)
	stop := make(chan struct{})
	type sampled struct {
		most, samples, total int
		err                  error
	}
	samples := make(chan sampled, 1)
	go func() {
		var r sampled
		defer func() { samples <- r }()
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			var c int
			if r.err = watch.QueryRow(context.Background(), `
				SELECT count(*) FROM pg_catalog.pg_locks l
				JOIN unnest($1::bigint[], $2::bigint[]) AS k(c, o) ON l.classid = k.c::oid AND l.objid = k.o::oid
				WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
				  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())`,
				classids, objids).Scan(&c); r.err != nil {
				return
			}
			r.most, r.samples, r.total = max(r.most, c), r.samples+1, r.total+c
		}
	}()
	sessions := func() (n int64) {
		if err := watch.QueryRow(context.Background(),
			`SELECT sessions FROM pg_catalog.pg_stat_database WHERE datname = current_database()`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	sessionsBefore := sessions()
	for _, p := range procs {
		p.send(t, "go")
	}
	var intervals []p24Interval
	perProc := make([]string, len(procs))
	for i, p := range procs {
		line := p.next(t, "done ")
		var grants, storms, cancelled, connecting, failed, fewest int
		if _, err := fmt.Sscanf(line, "done grants %d storms %d cancelled %d connecting %d failed %d fewest %d",
			&grants, &storms, &cancelled, &connecting, &failed, &fewest); err != nil {
			t.Fatalf("child %d: %q: %v", i, line, err)
		}
		perProc[i] = fmt.Sprintf("%d grants (fewest %d a goroutine); %d of %d waits with a 0-20 ms context ended by it (%d while a connection was opened)",
			grants, fewest, cancelled, storms, connecting)
		if failed > 0 {
			t.Errorf("child %d: %d Do failed other than by their cancelled context: %s", i, failed, p.stderr.String())
		}
		if fewest == 0 {
			t.Errorf("child %d: a goroutine never got a slot in %v (starved)", i, p24SemRun)
		}
		if cancelled == 0 {
			t.Errorf("child %d: no wait was cancelled: the storm did not happen", i)
		}
		ivs := p24Read(t, filepath.Join(dir, strconv.Itoa(i)), i)
		if len(ivs) != grants {
			t.Errorf("child %d: %d intervals written, %d grants", i, len(ivs), grants)
		}
		intervals = append(intervals, ivs...)
	}
	close(stop)
	sample := <-samples
	sessionsDuring := sessions() - sessionsBefore
	if sample.err != nil {
		t.Fatalf("sampling pg_locks: %v", sample.err)
	}
	// The loops have ended and the Lockers are still open: a slot or the
	// queue key kept by a cancelled wait would stay held.
	for _, k := range append(slices.Clone(slotKeys), queueKey) {
		pgtest.WaitFree(t, watch, k)
	}

	most := p24MaxOverlap(intervals)
	switch {
	case most > n:
		t.Errorf("INVARIANT at-most-n: %d grants of a semaphore of %d overlapped in time across processes", most, n)
	case most < n:
		t.Errorf("at most %d grants overlapped, want %d: the semaphore was never full", most, n)
	}
	if sample.most > n {
		t.Errorf("INVARIANT at-most-n: pg_locks showed %d slot locks granted at once, want at most %d", sample.most, n)
	}

	// The latency of a grant after a release: for each grant that waited
	// through a release (the latest end of an interval, any process, before
	// its start came after its Do was called), the time from that release
	// to its start. waits: from the call of Do to the start of its
	// function, every grant; busy: the time inside functions.
	stops := make([]int64, len(intervals))
	for i, iv := range intervals {
		stops[i] = iv.stop
	}
	slices.Sort(stops)
	var latencies, waits, releases []time.Duration
	var busy time.Duration
	for _, iv := range intervals {
		waits = append(waits, time.Duration(iv.start-iv.called))
		releases = append(releases, time.Duration(iv.returned-iv.stop))
		busy += time.Duration(iv.stop - iv.start)
		i, _ := slices.BinarySearch(stops, iv.start) // stops[i-1] < iv.start
		if i == 0 || stops[i-1] <= iv.called {
			continue
		}
		latencies = append(latencies, time.Duration(iv.start-stops[i-1]))
	}
	slices.Sort(latencies)
	slices.Sort(waits)
	slices.Sort(releases)
	t.Logf("%d processes x %d goroutines, %v: %d grants; max overlap %d (size %d); pg_locks max %d slot locks in %d samples (mean %.2f)",
		len(procs), p24SemGoroutines, p24SemRun, len(intervals), most, n, sample.most, sample.samples,
		float64(sample.total)/float64(max(sample.samples, 1)))
	for i, s := range perProc {
		t.Logf("process %d: %s", i, s)
	}
	t.Logf("grant after a release (%d grants that waited through one): p50 %v, p99 %v, max %v",
		len(latencies), p24Percentile(latencies, 50), p24Percentile(latencies, 99), p24Percentile(latencies, 100))
	t.Logf("wait from Do to its function, every grant: p50 %v, p99 %v; the slots were inside functions %.0f%% of the run",
		p24Percentile(waits, 50), p24Percentile(waits, 99), 100*busy.Seconds()/(n*p24SemRun.Seconds()))
	t.Logf("release, from the function's return to Do's: p50 %v, p99 %v", p24Percentile(releases, 50), p24Percentile(releases, 99))
	t.Logf("server sessions opened during the run: %d (stats are sent by backends as they go: a lower bound)", sessionsDuring)
	if len(latencies) == 0 {
		t.Error("no grant waited through a release: the semaphore was never contended")
	}

	for _, p := range procs {
		p.end(t)
	}
	for _, k := range append(slotKeys, queueKey) {
		pgtest.WaitFree(t, watch, k)
	}
}

// p24SetName is the name of key i of a key-set test whose keys derive from
// base.
func p24SetName(base string, i int) string { return fmt.Sprintf("%s-%d", base, i) }

// TestProof24KeySetChild is one process of TestKeySetsAcrossProcesses; run
// directly, it skips. It prints "ready" once its Locker is connected, then
// obeys the lines of its stdin:
//   - "run": p24SetGoroutines goroutines take p24SetEach random sets of 3
//     of the p24SetKeys keys each with DoAll (each with a 20 s context),
//     write the sets' intervals to the file named by p24OutEnv, and it
//     prints "ran R failed F timedout T";
//   - "hold I": it holds key I in a Do, prints "holding", and lets go at
//     the next line, then prints "released";
//   - "try I,J,K": TryDoAll of keys I, J and K; if it runs its function, it
//     prints "inside" and returns at the next line; then "tried true" or
//     "tried false".
//
// It closes its Locker when stdin closes.
func TestProof24KeySetChild(t *testing.T) {
	url := os.Getenv(p24URLEnv)
	if url == "" || os.Getenv(p24RoleEnv) != "keyset" {
		t.Skip("a process of TestKeySetsAcrossProcesses")
	}
	bg := context.Background()
	base := os.Getenv(p24NameEnv)
	id, err := strconv.Atoi(os.Getenv(p24IDEnv))
	if err != nil {
		p24Exit(err)
	}
	lk, closeLocker := p24Child(url)
	defer closeLocker()
	// Connected before the race starts.
	if _, err := lk.TryDo(bg, p24SetName(base, 0)+"-warm", func(context.Context) error { return nil }); err != nil {
		p24Exit(err)
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		cmd, arg, _ := strings.Cut(in.Text(), " ")
		switch cmd {
		case "run":
			sets := make([][]p24Interval, p24SetGoroutines)
			failed := make([]int, p24SetGoroutines)
			timedOut := make([]int, p24SetGoroutines)
			var wg sync.WaitGroup
			for g := range p24SetGoroutines {
				wg.Go(func() {
					rng := rand.New(rand.NewPCG(uint64(id), uint64(g)))
					for range p24SetEach {
						perm := rng.Perm(p24SetKeys)[:3]
						mask := 0
						set := make([]any, len(perm))
						for i, k := range perm {
							mask |= 1 << k
							set[i] = p24SetName(base, k)
						}
						hold := time.Duration(rng.Int64N(int64(200 * time.Microsecond)))
						ctx, cancel := context.WithTimeout(bg, 20*time.Second)
						called := time.Now().UnixNano()
						err := lk.DoAll(ctx, set, func(context.Context) error {
							start := time.Now().UnixNano()
							time.Sleep(hold)
							sets[g] = append(sets[g], p24Interval{keys: mask, called: called, start: start, stop: time.Now().UnixNano()})
							return nil
						})
						if len(sets[g]) > 0 && sets[g][len(sets[g])-1].returned == 0 {
							sets[g][len(sets[g])-1].returned = time.Now().UnixNano()
						}
						cancel()
						switch {
						case errors.Is(err, context.DeadlineExceeded):
							timedOut[g]++
							fmt.Fprintf(os.Stderr, "DoAll %v: timed out: %v\n", perm, err)
						case err != nil:
							failed[g]++
							fmt.Fprintf(os.Stderr, "DoAll %v: %v\n", perm, err)
						}
					}
				})
			}
			wg.Wait()
			if err := p24Write(os.Getenv(p24OutEnv), slices.Concat(sets...)); err != nil {
				p24Exit(err)
			}
			fmt.Printf("ran %d failed %d timedout %d\n", len(slices.Concat(sets...)), p24Sum(failed), p24Sum(timedOut))
		case "hold":
			i, err := strconv.Atoi(arg)
			if err != nil {
				p24Exit(err)
			}
			if err := lk.Do(bg, p24SetName(base, i), func(context.Context) error {
				fmt.Println("holding")
				in.Scan()
				return nil
			}); err != nil {
				p24Exit(err)
			}
			fmt.Println("released")
		case "try":
			var set []any
			for _, s := range strings.Split(arg, ",") {
				i, err := strconv.Atoi(s)
				if err != nil {
					p24Exit(err)
				}
				set = append(set, p24SetName(base, i))
			}
			ok, err := lk.TryDoAll(bg, set, func(context.Context) error {
				fmt.Println("inside")
				in.Scan()
				return nil
			})
			if err != nil {
				p24Exit(err)
			}
			fmt.Printf("tried %t\n", ok)
		default:
			p24Exit(fmt.Errorf("unknown command %q", in.Text()))
		}
	}
}

// Issue 24, key sets, across processes: p24SetProcesses processes (a
// default Locker each) take p24SetEach random sets of 3 of p24SetKeys keys
// from each of p24SetGoroutines goroutines with DoAll, at once. No DoAll
// fails or times out (a deadlock between the processes would: each has
// 20 s); in the merged history no two sets that share a key overlap in
// time; and nothing is held afterwards. Then a TryDoAll of a set in which
// one key (lowest, middle or highest in the sets' order) is held by the
// other process returns false and holds nothing: pg_locks shows the set's
// keys with one row, the other process's hold of the busy key. Once that
// is let go, the same try holds all three.
func TestKeySetsAcrossProcesses(t *testing.T) {
	url := pgtest.URL(t)
	watch := pgtest.Pool(t, 2)
	base := pgtest.UniqueKey(t)
	keys := make([]pglock.Key, p24SetKeys)
	for i := range keys {
		var err error
		if keys[i], err = pglock.KeyOf(p24SetName(base, i)); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	procs := make([]*child, p24SetProcesses)
	for i := range procs {
		procs[i] = startChild(t, "TestProof24KeySetChild",
			p24URLEnv+"="+url, p24RoleEnv+"=keyset", p24NameEnv+"="+base,
			p24IDEnv+"="+strconv.Itoa(i), p24OutEnv+"="+filepath.Join(dir, strconv.Itoa(i)))
	}
	for _, p := range procs {
		p.next(t, "ready")
	}

	start := time.Now()
	for _, p := range procs {
		p.send(t, "run")
	}
	var sets []p24Interval
	for i, p := range procs {
		line := p.next(t, "ran ")
		var ran, failed, timedOut int
		if _, err := fmt.Sscanf(line, "ran %d failed %d timedout %d", &ran, &failed, &timedOut); err != nil {
			t.Fatalf("child %d: %q: %v", i, line, err)
		}
		t.Logf("process %d: %s", i, line)
		if timedOut > 0 {
			t.Errorf("child %d: %d DoAll timed out after 20 s (a deadlock?): %s", i, timedOut, p.stderr.String())
		}
		if failed > 0 {
			t.Errorf("child %d: %d DoAll failed: %s", i, failed, p.stderr.String())
		}
		if want := p24SetGoroutines * p24SetEach; ran != want {
			t.Errorf("child %d: %d sets ran, want %d", i, ran, want)
		}
		ivs := p24Read(t, filepath.Join(dir, strconv.Itoa(i)), i)
		if len(ivs) != ran {
			t.Errorf("child %d: %d intervals written, %d sets ran", i, len(ivs), ran)
		}
		sets = append(sets, ivs...)
	}
	elapsed := time.Since(start)
	// The children's Lockers are still open: a key a DoAll kept would stay
	// held.
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}

	// The history: the sets of each key, in the order they began, each
	// begins after every earlier one ended (last: the one that ended
	// latest). handoffs counts a key passing from one process to the
	// other.
	overlaps, handoffs := 0, 0
	for k := range p24SetKeys {
		var of []p24Interval
		for _, s := range sets {
			if s.keys&(1<<k) != 0 {
				of = append(of, s)
			}
		}
		if len(of) == 0 {
			t.Errorf("no set took key %d", k)
			continue
		}
		slices.SortFunc(of, func(a, b p24Interval) int { return cmp.Compare(a.start, b.start) })
		for i := 1; i < len(of); i++ {
			if of[i].proc != of[i-1].proc {
				handoffs++
			}
		}
		for i, last := 1, of[0]; i < len(of); i++ {
			if of[i].start < last.stop {
				overlaps++
				if overlaps <= 5 {
					t.Errorf("INVARIANT one-holder: key %d held by a set of process %d from %d to %d and by one of process %d from %d",
						k, last.proc, last.start, last.stop, of[i].proc, of[i].start)
				}
			}
			if of[i].stop > last.stop {
				last = of[i]
			}
		}
	}
	if overlaps > 0 {
		t.Errorf("INVARIANT one-holder: %d overlaps of sets that share a key", overlaps)
	}
	t.Logf("%d sets of 3 of %d keys by %d processes in %v; %d times a key passed from one process to the other; %d overlaps",
		len(sets), p24SetKeys, len(procs), elapsed.Round(time.Millisecond), handoffs, overlaps)
	if handoffs == 0 {
		t.Error("no key passed between the processes: they did not race")
	}

	// TryDoAll of a set in which the other process holds one key. The set
	// in the order its keys are taken: by value.
	set := []int{0, 1, 2}
	value := func(i int) int64 {
		c, o, _ := keys[i].LockTag()
		return int64(uint64(c)<<32 | uint64(o))
	}
	slices.SortFunc(set, func(a, b int) int { return cmp.Compare(value(a), value(b)) })
	setKeys := []pglock.Key{keys[set[0]], keys[set[1]], keys[set[2]]}
	setArg := fmt.Sprintf("%d,%d,%d", set[2], set[0], set[1])
	// rows returns the rows of pg_locks (granted or waiting) of the set's
	// keys.
	rows := func() (out []pgtest.Holder) {
		for _, k := range setKeys {
			hs, err := pgtest.Holders(context.Background(), watch, k)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, hs...)
		}
		return out
	}
	for h := range procs {
		holder, trier := procs[h], procs[1-h]
		for pos, busy := range set {
			holder.send(t, "hold "+strconv.Itoa(busy))
			holder.next(t, "holding")
			before := rows()
			if len(before) != 1 || !before[0].Granted {
				t.Fatalf("process %d holds key %d: pg_locks shows %+v for the set", h, busy, before)
			}
			trier.send(t, "try "+setArg)
			if line := trier.next(t, "tried "); line != "tried false" {
				t.Errorf("TryDoAll of a set whose key %d (%d of 3 in order) process %d holds: %s, want false", busy, pos+1, h, line)
			}
			if after := rows(); len(after) != 1 || after[0] != before[0] {
				t.Errorf("after a TryDoAll that found key %d (%d of 3 in order) busy, pg_locks shows %+v for the set; want only the holder's %+v",
					busy, pos+1, after, before[0])
			}
			holder.send(t, "release")
			holder.next(t, "released")
			pgtest.WaitFree(t, watch, keys[busy])
		}
		// Free, the same try holds the three keys while its function runs.
		trier.send(t, "try "+setArg)
		trier.next(t, "inside")
		if in := rows(); len(in) != 3 || !in[0].Granted || !in[1].Granted || !in[2].Granted {
			t.Errorf("inside a TryDoAll of a free set, pg_locks shows %+v for the set; want its 3 keys granted", in)
		}
		trier.send(t, "leave")
		if line := trier.next(t, "tried "); line != "tried true" {
			t.Errorf("TryDoAll of a free set: %s, want true", line)
		}
		for _, k := range setKeys {
			pgtest.WaitFree(t, watch, k)
		}
	}

	t.Logf("TryDoAll: %d tries of a set with one key (each of its 3 places in order) held by the other process, %d of the free set",
		len(procs)*len(set), len(procs))

	for _, p := range procs {
		p.end(t)
	}
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}
}
