package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// TestReview23GuardRace: on a server with a small lock table (capacity 200,
// limit 150), three multiplexing Lockers and NewLock holders on pools and
// caller transactions take keys from many goroutines, some with short
// deadlines, until refused. Nothing deadlocks (the test ends), no statement
// runs out of shared memory, and the server's advisory locks stay near the
// limit.
func TestReview23GuardRace(t *testing.T) {
	srv := pgtest.ThrowawayT(t, map[string]string{"max_locks_per_transaction": "10", "max_connections": "20"})
	bg := context.Background()
	watch := urlPool(t, srv.URL, 1)
	var lockers []*pglock.Locker
	for range 3 {
		lockers = append(lockers, muxLocker(t, urlPool(t, srv.URL, 2), pglock.WithLockConns(2), pglock.WithWaitConns(1)))
	}
	for _, lk := range lockers { // warm: init and self-test done
		if err := lk.Do(bg, "warm", func(context.Context) error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	callerPool := urlPool(t, srv.URL, 4)
	var maxSeen atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			var n int64
			if err := watch.QueryRow(bg, "SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory'").Scan(&n); err == nil {
				for {
					m := maxSeen.Load()
					if n <= m || maxSeen.CompareAndSwap(m, n) {
						break
					}
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	var oom, refused, ok atomic.Int64
	var errMu sync.Mutex
	others := map[string]int{}
	record := func(err error) {
		switch {
		case err == nil:
			ok.Add(1)
		case errors.Is(err, pglock.ErrTooManyLocks):
			refused.Add(1)
		case errors.Is(err, context.DeadlineExceeded), errors.Is(err, pglock.ErrNotAcquired) && errors.Is(err, context.DeadlineExceeded):
		default:
			if contains(err.Error(), "shared memory") {
				oom.Add(1)
			}
			msg := err.Error()
			if i := strings.Index(msg, "key "); i >= 0 {
				if j := strings.Index(msg[i:], ": "); j >= 0 {
					msg = msg[:i] + msg[i+j:]
				}
			}
			errMu.Lock()
			others[msg]++
			errMu.Unlock()
		}
	}
	release := make(chan struct{})
	var holders sync.WaitGroup
	deadline := time.Now().Add(4 * time.Second)
	for g := range 24 {
		holders.Add(1)
		go func() {
			defer holders.Done()
			for i := 0; time.Now().Before(deadline); i++ {
				ctx, cancel := context.WithTimeout(bg, time.Duration(2+i%30)*time.Millisecond)
				key := fmt.Sprintf("guard-race-%d-%d", g, i)
				switch g % 4 {
				case 0, 1, 2:
					lk := lockers[g%3]
					l, err := lk.NewLock(key)
					if err != nil {
						t.Error(err)
						cancel()
						return
					}
					held, err := l.TryAcquire(ctx)
					record(err)
					if held {
						defer l.Release(bg)
					}
				case 3:
					tx, err := callerPool.Begin(bg)
					if err != nil {
						cancel()
						continue
					}
					// Stack many on one caller transaction (the callerGuard).
					for j := range 20 {
						l, _ := pglock.NewLock(tx, fmt.Sprintf("%s-%d", key, j), pglock.WithScope(pglock.Transaction))
						_, err := l.TryAcquire(ctx)
						record(err)
						if err != nil {
							break
						}
					}
					go func() { <-release; _ = tx.Rollback(bg) }()
				}
				cancel()
			}
			<-release
		}()
	}
	time.Sleep(time.Until(deadline) + 500*time.Millisecond)
	close(release)
	done := make(chan struct{})
	go func() { holders.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("holders did not finish: deadlock?")
	}
	close(stop)
	wg.Wait()
	t.Logf("granted %d, refused %d, max advisory locks seen %d (limit 150, table 200), other errors %v", ok.Load(), refused.Load(), maxSeen.Load(), others)
	if maxSeen.Load() > 150+10 {
		t.Errorf("the server held %d advisory locks, above the limit of 150 by more than a step", maxSeen.Load())
	}
	if oom.Load() > 0 {
		t.Errorf("%d statements ran out of shared memory", oom.Load())
	}
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}
