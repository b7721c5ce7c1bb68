package gocronlock_test

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-co-op/gocron/v2"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// newLockers returns n Lockers, each on a pool of its own: n replicas.
func newLockers(t *testing.T, n int, opts ...pglock.Option) []*pglock.Locker {
	t.Helper()
	out := make([]*pglock.Locker, n)
	for i := range out {
		lk, err := pglock.NewLocker(pgtest.Pool(t, 3), opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = lk.Close() })
		out[i] = lk
	}
	return out
}

// newScheduler returns a gocron scheduler that is shut down when the test
// ends (Shutdown is safe to call twice).
func newScheduler(t *testing.T, opts ...gocron.SchedulerOption) gocron.Scheduler {
	t.Helper()
	s, err := gocron.NewScheduler(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Shutdown() })
	return s
}

// shutdown shuts the schedulers down at once and waits for their jobs.
func shutdown(t *testing.T, ss ...gocron.Scheduler) {
	t.Helper()
	var wg sync.WaitGroup
	for _, s := range ss {
		wg.Go(func() {
			if err := s.Shutdown(); err != nil {
				t.Errorf("Shutdown: %v", err)
			}
		})
	}
	wg.Wait()
}

// grantedPIDs returns the pids that hold key (not those waiting), read
// through obs. Unlike pgtest.Granted it may be called from any goroutine.
func grantedPIDs(ctx context.Context, obs *pgxpool.Pool, key pglock.Key) ([]int32, error) {
	hs, err := pgtest.Holders(ctx, obs, key)
	if err != nil {
		return nil, err
	}
	var pids []int32
	for _, h := range hs {
		if h.Granted {
			pids = append(pids, h.PID)
		}
	}
	return pids, nil
}

// tickLog records which replica ran which tick, and what went wrong.
type tickLog struct {
	mu       sync.Mutex
	runs     map[time.Time][]int // tick -> replicas that ran it
	starts   []run
	problems []string
	inFlight int
}

type run struct {
	at      time.Time
	replica int
}

// enter records a run of replica at the tick tick, and any overlap; call
// the result when the run ends.
func (l *tickLog) enter(tick time.Time, replica int) func() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.runs == nil {
		l.runs = map[time.Time][]int{}
	}
	l.runs[tick] = append(l.runs[tick], replica)
	l.starts = append(l.starts, run{time.Now(), replica})
	if l.inFlight++; l.inFlight > 1 {
		l.problems = append(l.problems, fmt.Sprintf("replica %d started while %d other run(s) were in progress", replica, l.inFlight-1))
	}
	return func() {
		l.mu.Lock()
		l.inFlight--
		l.mu.Unlock()
	}
}

func (l *tickLog) problem(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.problems = append(l.problems, fmt.Sprintf(format, args...))
}

// ticks returns the ticks in order with the replicas that ran each, and a
// readable listing.
func (l *tickLog) ticks() (ticks []time.Time, runs map[time.Time][]int, listing string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k := range l.runs {
		ticks = append(ticks, k)
	}
	sort.Slice(ticks, func(i, j int) bool { return ticks[i].Before(ticks[j]) })
	var b strings.Builder
	for _, k := range ticks {
		fmt.Fprintf(&b, "  tick %s: replicas %v\n", k.Format("15:04:05.000"), l.runs[k])
	}
	return ticks, l.runs, b.String()
}

// runsSince returns the runs that started at or after t.
func (l *tickLog) runsSince(t time.Time) []run {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []run
	for _, r := range l.starts {
		if !r.at.Before(t) {
			out = append(out, r)
		}
	}
	return out
}

// recLog is a gocron.Logger that keeps what it is told.
type recLog struct{ locktest.LogLines }

func (r *recLog) Debug(msg string, kv ...any) { r.Add("DEBUG", msg, kv...) }
func (r *recLog) Info(msg string, kv ...any)  { r.Add("INFO", msg, kv...) }
func (r *recLog) Warn(msg string, kv ...any)  { r.Add("WARN", msg, kv...) }
func (r *recLog) Error(msg string, kv ...any) { r.Add("ERROR", msg, kv...) }

// waitFor polls cond every 10 ms until it holds or d passes.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}
