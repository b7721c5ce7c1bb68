package bench

import (
	"context"
	"errors"
	"fmt"
	"runtime/pprof"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Each side of a contention benchmark runs for roundTime per round, and
// roundsPerLoop rounds per iteration of the benchmark loop: 12 rounds of
// each of three sides take 1.8 s, past the default benchtime, so one
// iteration is the whole run (a larger -benchtime adds iterations).
const (
	roundTime     = 50 * time.Millisecond
	roundsPerLoop = 12
)

// errTwoHolders is the sign that exclusion failed on one key.
var errTwoHolders = errors.New("two holders of one key at once")

// grantLoop is one side of a contention benchmark, run by goroutine w for
// one round: it acquires and releases k until the time is past until,
// calling held(t0) while holding each grant, t0 being when it started to
// acquire it.
type grantLoop func(ctx context.Context, w int, k pglock.Key, until time.Time, held func(t0 time.Time) error) error

// contender is a side of a contention benchmark and what it measured.
type contender struct {
	name    string
	loop    grantLoop
	keys    []pglock.Key      // per goroutine
	waits   [][]time.Duration // per goroutine: each grant's wait
	elapsed time.Duration     // the rounds' total time
	rates   []float64         // each round's grants per second
	// meter reads the CPU time used; cpuClient and cpuServer sum what the
	// rounds used, on each end.
	meter                *cpuMeter
	cpuClient, cpuServer time.Duration
}

// round runs c's loop in n goroutines for d, recording each grant's wait.
// The goroutines start in turn from goroutine shift (varied from round to
// round, so that starting first favours none of them over the rounds). On
// one key, held checks that no two goroutines hold it at once.
func (c *contender) round(b *testing.B, ctx context.Context, n, shift int, d time.Duration, oneKey bool) {
	var inside atomic.Int32
	errs := make([]error, n)
	var wg sync.WaitGroup
	client0, server0 := c.meter.read()
	start := time.Now()
	until := start.Add(d)
	for j := range n {
		w := (j + shift) % n
		wg.Go(func() {
			// The side's name labels its CPU profile samples: go tool
			// pprof -tagfocus side=perhold.
			pprof.Do(context.Background(), pprof.Labels("side", c.name), func(context.Context) {
				errs[w] = c.loop(ctx, w, c.keys[w], until, func(t0 time.Time) error {
					c.waits[w] = append(c.waits[w], time.Since(t0))
					if oneKey {
						if inside.Add(1) != 1 {
							return errTwoHolders
						}
						inside.Add(-1)
					}
					return nil
				})
			})
		})
	}
	before := 0
	for _, ws := range c.waits {
		before += len(ws)
	}
	wg.Wait()
	took := time.Since(start)
	c.elapsed += took
	client1, server1 := c.meter.read()
	c.cpuClient += client1 - client0
	c.cpuServer += server1 - server0
	must(b, errors.Join(errs...))
	_, total := c.grants()
	c.rates = append(c.rates, float64(total-before)/took.Seconds())
}

// medianRatio is the median over the rounds of c's grants per second over
// base's in the same round (the sides run one after the other in each
// round): the paired ratio least moved by a burst of the machine's noise,
// which the ratio of the totals takes in whole.
func (c *contender) medianRatio(base *contender) float64 {
	n := min(len(c.rates), len(base.rates))
	rs := make([]float64, n)
	for i := range n {
		rs[i] = c.rates[i] / base.rates[i]
	}
	slices.Sort(rs)
	if n == 0 {
		return 0
	}
	if n%2 == 1 {
		return rs[n/2]
	}
	return (rs[n/2-1] + rs[n/2]) / 2
}

// lockerLoop is Locker.Do of lk, the work holding the key.
func lockerLoop(lk *pglock.Locker) grantLoop {
	return func(ctx context.Context, w int, k pglock.Key, until time.Time, held func(time.Time) error) error {
		for time.Now().Before(until) {
			t0 := time.Now()
			if err := lk.Do(ctx, k, func(context.Context) error { return held(t0) }); err != nil {
				return err
			}
		}
		return nil
	}
}

// rawLoop is raw pgx on a pool connection pinned for the round: lock,
// hold, unlock.
func rawLoop(pool *pgxpool.Pool) grantLoop {
	return func(ctx context.Context, w int, k pglock.Key, until time.Time, held func(time.Time) error) error {
		c, err := pool.Acquire(ctx)
		if err != nil {
			return err
		}
		defer c.Release()
		for time.Now().Before(until) {
			t0 := time.Now()
			if _, err := c.Exec(ctx, "SELECT pg_advisory_lock($1::bigint)", k.Int64()); err != nil {
				return err
			}
			herr := held(t0)
			var ok bool
			if err := c.QueryRow(ctx, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()).Scan(&ok); err != nil {
				return err
			}
			if herr != nil {
				return herr
			}
			if !ok {
				return fmt.Errorf("raw unlock of %s: not held", k)
			}
		}
		return nil
	}
}

// runRounds gives each of sides a key per goroutine (one key for all when
// oneKey), warms them up, then runs them in rounds of n goroutines for the
// benchmark loop, in an order that rotates every round, measuring the CPU
// of this process and of pool's database's sessions.
func runRounds(b *testing.B, ctx context.Context, pool *pgxpool.Pool, sides []*contender, n int, oneKey bool) {
	for _, s := range sides {
		s.keys = keys(b, n)
		if oneKey {
			for w := range s.keys {
				s.keys[w] = s.keys[0]
			}
		}
		// Warm up (lock connections opened, statements prepared), then
		// start the figures afresh.
		s.waits = make([][]time.Duration, n)
		s.round(b, ctx, n, 0, 5*time.Millisecond, oneKey)
		s.waits, s.elapsed, s.rates = make([][]time.Duration, n), 0, nil
	}
	// Every session is open now: the CPU of the server's processes can be
	// read from here on.
	meter, err := newCPUMeter(ctx, pool)
	must(b, err)
	for _, s := range sides {
		s.meter = meter
	}
	r := 0
	for b.Loop() {
		for range roundsPerLoop {
			for j := range sides {
				sides[(r+j)%len(sides)].round(b, ctx, n, r, roundTime, oneKey)
			}
			r++
		}
	}
}

// grants returns the grants of each goroutine and their total.
func (c *contender) grants() (per []int, total int) {
	per = make([]int, len(c.waits))
	for w, ws := range c.waits {
		per[w] = len(ws)
		total += len(ws)
	}
	return per, total
}

// report reports c's figures: grants per second, the wait's 50th and 99th
// percentiles and the fairness, max/min grants per goroutine over the whole
// benchmark (a goroutine with none counts as one). It returns the grants
// per second and the 99th percentile.
func (c *contender) report(b *testing.B) (rate, p99 float64) {
	per, total := c.grants()
	if total == 0 {
		b.Fatalf("%s: no grants", c.name)
	}
	rate = float64(total) / c.elapsed.Seconds()
	all := slices.Concat(c.waits...)
	slices.Sort(all)
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }
	p99 = us(all[len(all)*99/100])
	b.ReportMetric(rate, c.name+"-grants/s")
	b.ReportMetric(us(all[len(all)/2]), c.name+"-p50-wait-us")
	b.ReportMetric(p99, c.name+"-p99-wait-us")
	b.ReportMetric(float64(slices.Max(per))/float64(max(slices.Min(per), 1)), c.name+"-fairness")
	if c.meter != nil {
		perGrant := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 / float64(total) }
		b.ReportMetric(perGrant(c.cpuClient), c.name+"-client-cpu-us/grant")
		if len(c.meter.pids) > 0 {
			b.ReportMetric(perGrant(c.cpuServer), c.name+"-server-cpu-us/grant")
		}
	}
	return rate, p99
}

// Contention: N goroutines (N = 2, 8, 32) each looping acquire, hold (no
// work but the bookkeeping), release, on ONE key (they take turns: the
// hand-off) and on DISTINCT keys (one each), for each context (see
// contexts). Three sides, on one pool of N connections:
//
//   - mux: Locker.Do of one multiplexing Locker (the default a user gets);
//   - perhold: Locker.Do of a Locker made WithMultiplexing(false), one pool
//     connection per hold;
//   - raw: raw pgx, each goroutine pinning a pool connection for the round
//     and looping pg_advisory_lock / pg_advisory_unlock on it.
//
// They run in alternating rounds of roundTime in one benchmark loop (the
// order rotating every round), so that all three see the same machine
// noise; a side's figures are over all its rounds. Reported per side s: s-grants/s, s-p50-wait-us and s-p99-wait-us
// (wait: from the start of an acquire to holding the lock) and s-fairness
// (max/min grants per goroutine); and per library side s the paired
// ratios s/raw-grants (grants/s over raw's; target >= 1.00 on one key),
// s/raw-grants-median (the median over the rounds of the same ratio within
// each round, which a burst of noise moves less) and s/raw-p99 (p99 wait
// over raw's; target <= 1.2). And each side's CPU time per grant, in this
// process (s-client-cpu-us/grant: the goroutines, the runtime, the system
// calls) and in the server's processes (s-server-cpu-us/grant, read from
// /proc when the server runs on this machine): where the client and the
// server share the machine's cores, a side's grants per second follow from
// their sum.
func BenchmarkContention(b *testing.B) {
	for _, oneKey := range []bool{true, false} {
		scenario := "one-key"
		if !oneKey {
			scenario = "distinct-keys"
		}
		b.Run(scenario, func(b *testing.B) {
			for _, n := range []int{2, 8, 32} {
				b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
					eachContext(b, func(b *testing.B, ctx context.Context) {
						b.Run("paired", func(b *testing.B) { contention(b, ctx, n, oneKey) })
					})
				})
			}
		})
	}
}

func contention(b *testing.B, ctx context.Context, n int, oneKey bool) {
	pool := pgtest.Pool(b, int32(n))
	warmPool(ctx, b, pool, n)
	mux := newLocker(b, pool)
	perHold := newLocker(b, pool, pglock.WithMultiplexing(false))
	sides := []*contender{
		{name: "mux", loop: lockerLoop(mux)},
		{name: "perhold", loop: lockerLoop(perHold)},
		{name: "raw", loop: rawLoop(pool)},
	}
	runRounds(b, ctx, pool, sides, n, oneKey)
	rawRate, rawP99 := sides[2].report(b)
	for _, s := range sides[:2] {
		rate, p99 := s.report(b)
		b.ReportMetric(rate/rawRate, s.name+"/raw-grants")
		b.ReportMetric(s.medianRatio(sides[2]), s.name+"/raw-grants-median")
		b.ReportMetric(p99/rawP99, s.name+"/raw-p99")
	}
	if s := mux.Stats(); s.ServerLocks != 0 {
		b.Fatalf("mux Locker after the run: %+v", s)
	}
}
