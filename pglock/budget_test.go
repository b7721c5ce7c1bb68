package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Issue 21: the connection budget holds. A default Locker (2 lock
// connections, 4 waiting connections) that holds 10,000 locks, with two
// Leaders of one key (one campaigns in the server's queue, then leads, on a
// connection of its own; the other queues behind it in the process), goes
// through a burst of waits: 200
// goroutines wait for 40 keys that another session holds and lets go of now
// and then, with random deadlines, holding what they get for a moment.
// Sampled from pg_stat_activity all along, the Locker's server sessions
// never exceed WithLockConns + WithWaitConns + its Leaders; Stats reports
// them by role, never above its MaxSessions, and when the burst is over its
// Sessions is what the server shows.
func TestConnectionBudgetUnderBurst(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a server and holds 10,000 locks")
	}
	srv := pgtest.ThrowawayT(t, map[string]string{"max_locks_per_transaction": "256"})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const (
		app      = "pglock-budget-test"
		held     = 10_000
		hotKeys  = 40
		waiters  = 200
		lockers  = pglock.DefaultLockConns
		waitConn = pglock.DefaultWaitConns
		leaders  = 2
		// Of the two Leaders, one has a connection of its own (see below).
		budget = lockers + waitConn + 1
	)
	cfg, err := pgxpool.ParseConfig(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = app
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	watch, err := pgx.Connect(ctx, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer watch.Close(context.Background())
	other, err := pgx.Connect(ctx, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close(context.Background())

	lk, err := pglock.NewLocker(pool)
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	var leaderIdentity string // the Leaders' (all the default)
	sessions := func() int {
		var n int
		// A Leader's campaign session carries the Leader's identity
		// (LeaderConfig.Identity) instead of the pool's name.
		if err := watch.QueryRow(ctx, `SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1 OR application_name = $2`,
			app, leaderIdentity).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}

	// Two Leaders of one key that the other session holds: one campaigns in
	// the server's queue, on a connection of its own, the other waits for it
	// in the process.
	leaderKey, err := lk.Key("budget-leader")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Exec(ctx, "SELECT pg_advisory_lock($1)", leaderKey.Int64()); err != nil {
		t.Fatal(err)
	}
	runCtx, stopLeaders := context.WithCancel(ctx)
	var lw sync.WaitGroup
	var elected atomic.Int32
	for range leaders {
		ld, err := lk.Leader("budget-leader", pglock.LeaderConfig{})
		if err != nil {
			t.Fatal(err)
		}
		leaderIdentity = ld.Identity()
		lw.Go(func() {
			_ = ld.Run(runCtx, func(ctx context.Context) error {
				elected.Add(1)
				<-ctx.Done()
				return nil
			})
		})
	}
	defer func() { stopLeaders(); lw.Wait() }()

	// 10,000 held.
	heldLocks := make([]*pglock.Lock, held)
	var fw sync.WaitGroup
	errs := make(chan error, 64)
	for w := range 64 {
		fw.Go(func() {
			for i := w; i < held; i += 64 {
				l, err := lk.NewLock(fmt.Sprintf("budget-held-%d", i))
				if err == nil {
					err = l.Acquire(ctx)
				}
				if err != nil {
					errs <- err
					return
				}
				heldLocks[i] = l
			}
		})
	}
	fw.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for lk.Stats().LeaderConns != 1 {
		time.Sleep(time.Millisecond)
	}

	// The other session holds the hot keys, and lets go of one and takes
	// another now and then, so that waits are granted while others wait.
	hot := make([]pglock.Key, hotKeys)
	for i := range hot {
		k, err := lk.Key(fmt.Sprintf("budget-hot-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		hot[i] = k
		if _, err := other.Exec(ctx, "SELECT pg_advisory_lock($1)", k.Int64()); err != nil {
			t.Fatal(err)
		}
	}
	burstCtx, endBurst := context.WithTimeout(ctx, 3*time.Second)
	defer endBurst()
	var bw sync.WaitGroup
	bw.Go(func() {
		for burstCtx.Err() == nil {
			k := hot[rand.IntN(hotKeys)]
			var ok bool
			if err := other.QueryRow(ctx, "SELECT pg_advisory_unlock($1)", k.Int64()).Scan(&ok); err != nil || !ok {
				t.Errorf("the other session's unlock: %v %v", ok, err)
				return
			}
			time.Sleep(time.Duration(rand.IntN(5)) * time.Millisecond)
			// Take it back, waiting behind the Locker's waiters if need be.
			wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
			_, err := other.Exec(wctx, "SELECT pg_advisory_lock($1)", k.Int64())
			wcancel()
			if err != nil {
				t.Errorf("the other session's lock: %v", err)
				return
			}
		}
	})
	var granted, timedOut atomic.Int64
	for range waiters {
		bw.Go(func() {
			for burstCtx.Err() == nil {
				l, err := lk.NewLock(hot[rand.IntN(hotKeys)])
				if err != nil {
					t.Error(err)
					return
				}
				actx, acancel := context.WithTimeout(burstCtx, time.Duration(5+rand.IntN(100))*time.Millisecond)
				err = l.Acquire(actx)
				acancel()
				switch {
				case err == nil:
					granted.Add(1)
					time.Sleep(time.Millisecond)
					if err := l.Release(ctx); err != nil {
						t.Errorf("Release: %v", err)
					}
				case errors.Is(err, context.DeadlineExceeded), errors.Is(err, pglock.ErrUnavailable):
					// ErrUnavailable: the deadline came while a waiting
					// connection was being opened.
					timedOut.Add(1)
				default:
					t.Errorf("Acquire: %v", err)
				}
			}
		})
	}
	// Sample the server's sessions and the Locker's Stats all along.
	maxSeen, maxStats, maxHolding, samples := 0, 0, 0, 0
	var over []string
	for burstCtx.Err() == nil {
		n := sessions()
		s := lk.Stats()
		samples++
		maxSeen, maxStats, maxHolding = max(maxSeen, n), max(maxStats, s.Sessions), max(maxHolding, s.HoldingConns)
		if n > budget {
			over = append(over, fmt.Sprintf("%d sessions in pg_stat_activity (Stats: %+v)", n, s))
		}
		if s.Sessions > s.MaxSessions || s.MaxSessions > budget ||
			s.WaitConns != s.WaitingConns+s.HoldingConns+s.IdleConns+s.LeaderConns {
			over = append(over, fmt.Sprintf("Stats: %+v", s))
		}
		time.Sleep(2 * time.Millisecond)
	}
	bw.Wait()
	// The campaign is won: the Leader leads on its own connection.
	var ok bool
	if err := other.QueryRow(ctx, "SELECT pg_advisory_unlock($1)", leaderKey.Int64()).Scan(&ok); err != nil || !ok {
		t.Fatalf("the other session's unlock of the Leaders' key: %v %v", ok, err)
	}
	for elected.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	t.Logf("burst: %d waits granted, %d timed out; %d samples: at most %d sessions in pg_stat_activity, %d in Stats (budget %d), %d waiting connections holding",
		granted.Load(), timedOut.Load(), samples, maxSeen, maxStats, budget, maxHolding)
	for i, o := range over {
		if i == 5 {
			break
		}
		t.Errorf("INVARIANT connection-budget: %s, budget %d", o, budget)
	}
	if granted.Load() == 0 || timedOut.Load() == 0 {
		t.Errorf("the burst did not exercise both grants (%d) and timeouts (%d)", granted.Load(), timedOut.Load())
	}

	// Quiet now: Stats says what the server shows.
	deadline := time.Now().Add(5 * time.Second)
	for {
		s, n := lk.Stats(), sessions()
		if s.Sessions == n && s.LockConns == lockers && s.LeaderConns == 1 && s.ServerLocks == held+1 {
			t.Logf("after the burst: %+v", s)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the burst, Stats %+v, pg_stat_activity %d sessions", s, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, l := range heldLocks {
		if err := l.Release(ctx); err != nil {
			t.Fatal(err)
		}
	}
}
