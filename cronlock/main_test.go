package cronlock_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/robfig/cron/v3"

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

// runCrons starts every scheduler, lets them run for d, stops them and
// waits for their running jobs.
func runCrons(crons []*cron.Cron, d time.Duration) {
	for _, c := range crons {
		c.Start()
	}
	time.Sleep(d)
	var wg sync.WaitGroup
	for _, c := range crons {
		wg.Go(func() { <-c.Stop().Done() })
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

// recLog is a cron.Logger that keeps what it is told.
type recLog struct {
	mu    sync.Mutex
	lines []string
}

func (r *recLog) Info(msg string, kv ...any) { r.add("INFO "+msg, kv) }

func (r *recLog) Error(err error, msg string, kv ...any) {
	r.add("ERROR "+msg, append(kv, "error", err))
}

func (r *recLog) add(msg string, kv []any) {
	var b strings.Builder
	b.WriteString(msg)
	for i := 0; i+1 < len(kv); i += 2 {
		fmt.Fprintf(&b, " %v=%v", kv[i], kv[i+1])
	}
	r.mu.Lock()
	r.lines = append(r.lines, b.String())
	r.mu.Unlock()
}

// count returns how many lines contain every one of subs.
func (r *recLog) count(subs ...string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
next:
	for _, l := range r.lines {
		for _, s := range subs {
			if !strings.Contains(l, s) {
				continue next
			}
		}
		n++
	}
	return n
}

func (r *recLog) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Join(r.lines, "\n")
}

// syncBuffer is an io.Writer for a slog handler shared by goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func newSlog(w *syncBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
