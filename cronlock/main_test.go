package cronlock_test

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/robfig/cron/v3"

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
type recLog struct{ locktest.LogLines }

func (r *recLog) Info(msg string, kv ...any) { r.Add("INFO", msg, kv...) }

func (r *recLog) Error(err error, msg string, kv ...any) {
	r.Add("ERROR", msg, append(kv, "error", err)...)
}

// syncBuffer is an io.Writer for a slog handler shared by goroutines.
type syncBuffer = locktest.SyncBuffer

func newSlog(w *syncBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
