package pglock_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Issue 25. A Leader's health: healthy while it does not lead and while it
// leads and the server shows its session holding the key; unhealthy (503,
// ErrLeaderInDoubt) within the loss bound when its network goes silent
// (its Locker behind a fault proxy), while it still believes it leads;
// healthy again once it has stepped down, and after another replica is
// elected (whose health is sound too).
func TestLeaderHealthInDoubt(t *testing.T) {
	const interval = 300 * time.Millisecond
	bg := context.Background()
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	watch := pgtest.Pool(t, 2)
	proxy, cutPool := faultProxyPool(t, 4)
	defer proxy.Restore()
	key := pgtest.UniqueKey(t)

	type replica struct {
		ld      *pglock.Leader
		h       http.Handler
		elected chan time.Time
		deposed chan time.Time
	}
	mk := func(pool *pgxpool.Pool, id string) *replica {
		lk, err := pglock.NewLocker(pool, pglock.WithLostCheckInterval(interval), pglock.WithReleaseTimeout(time.Second))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = lk.Close() })
		r := &replica{elected: make(chan time.Time, 4), deposed: make(chan time.Time, 4)}
		r.ld, err = lk.Leader(key, pglock.LeaderConfig{
			Identity:   id,
			MinBackoff: time.Hour, // a deposed replica does not campaign again during the test
			OnElected:  func(context.Context) { r.elected <- time.Now() },
			OnDeposed:  func(error) { r.deposed <- time.Now() },
		})
		if err != nil {
			t.Fatal(err)
		}
		r.h = pglock.HealthHandler(r.ld.CheckHealth)
		return r
	}
	a := mk(cutPool, "health-a")
	b := mk(pgtest.Pool(t, 4), "health-b")
	if code, body := probeHealth(a.h); code != http.StatusOK {
		t.Fatalf("a Leader that does not run: %d %q", code, body)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Go(func() { _ = a.ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) })
	select {
	case <-a.elected:
	case <-time.After(10 * time.Second):
		t.Fatal("the first replica was not elected")
	}
	if code, body := probeHealth(a.h); code != http.StatusOK {
		t.Fatalf("the leader, sound: %d %q", code, body)
	}
	wg.Go(func() { _ = b.ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) })
	locktest.WaitFor(t, "the second replica to wait in the server", func() bool { return locktest.Waiters(t, watch, a.ld.Key()) == 1 })
	if code, body := probeHealth(b.h); code != http.StatusOK {
		t.Fatalf("a campaigning replica: %d %q", code, body)
	}

	cut := time.Now()
	proxy.Blackhole()
	at, body := waitStatus(t, a.h, http.StatusServiceUnavailable, 5*time.Second)
	t.Logf("the cut-off leader unhealthy %v after the cut: %q", at.Sub(cut).Round(time.Millisecond), body)
	if d := at.Sub(cut); d > 2*interval+300*time.Millisecond {
		t.Errorf("unhealthy %v after the cut, want within the loss bound (2 x %v)", d, interval)
	}
	if !strings.Contains(body, pglock.ErrLeaderInDoubt.Error()) || !strings.Contains(body, "health-a") {
		t.Errorf("unhealthy body %q does not say the lock of health-a is in doubt", body)
	}
	var deposedAt time.Time
	select {
	case deposedAt = <-a.deposed:
	case <-time.After(5 * time.Second):
		t.Fatal("the cut-off leader was not deposed")
	}
	t.Logf("deposed %v after the cut", deposedAt.Sub(cut).Round(time.Millisecond))
	healthyAt, _ := waitStatus(t, a.h, http.StatusOK, 5*time.Second)
	t.Logf("healthy again (not leading) %v after the cut", healthyAt.Sub(cut).Round(time.Millisecond))
	if err := a.ld.CheckHealth(bg); err != nil {
		t.Errorf("CheckHealth of the deposed leader = %v", err)
	}

	proxy.Restore()
	select {
	case <-b.elected:
	case <-time.After(pglock.AbandonedSessionTimeout + 5*time.Second):
		t.Fatal("the second replica was not elected")
	}
	for name, r := range map[string]*replica{"the new leader": b, "the old one": a} {
		if code, body := probeHealth(r.h); code != http.StatusOK {
			t.Errorf("%s after the election: %d %q", name, code, body)
		}
	}
	cancel()
	wg.Wait()
	pgtest.WaitFree(t, watch, a.ld.Key())
}

// Issue 25. While a Leader believes it leads but the server shows another
// session holding its key (a split brain: here the Leader is made to believe
// its session is another), CheckHealth says so, naming both sessions; nil
// and zero Leaders fail cleanly.
func TestLeaderHealthServerDisagrees(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	lk, err := pglock.NewLocker(pgtest.Pool(t, 2), pglock.WithLostCheckInterval(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	key := pgtest.UniqueKey(t)
	ld, err := lk.Leader(key, pglock.LeaderConfig{Identity: "disagree"})
	if err != nil {
		t.Fatal(err)
	}
	elected := make(chan struct{})
	release := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- ld.Run(bg, func(ctx context.Context) error { close(elected); <-release; return nil })
	}()
	<-elected
	if err := ld.CheckHealth(bg); err != nil {
		t.Fatalf("CheckHealth of a sound leader = %v", err)
	}
	pid := pgtest.Granted(t, watch, ld.Key())[0].PID
	if !pglock.SetTermPID(ld, int64(pid)+1) {
		t.Fatal("the Leader does not lead")
	}
	time.Sleep(100 * time.Millisecond) // the sound result is no longer fresh
	err = ld.CheckHealth(bg)
	if !errors.Is(err, pglock.ErrLeaderInDoubt) || !strings.Contains(err.Error(), "disagree") {
		t.Errorf("CheckHealth while the server shows another session holding the key = %v, want ErrLeaderInDoubt", err)
	}
	t.Logf("CheckHealth: %v", err)
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("Run = %v", err)
	}
	if err := ld.CheckHealth(bg); err != nil {
		t.Errorf("CheckHealth after Run = %v", err)
	}
	pgtest.WaitFree(t, watch, ld.Key())

	var nilLeader *pglock.Leader
	if err := nilLeader.CheckHealth(bg); !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Errorf("CheckHealth on a nil Leader = %v, want ErrUnsupportedConn", err)
	}
	if err := new(pglock.Leader).CheckHealth(bg); !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Errorf("CheckHealth on a zero Leader = %v, want ErrUnsupportedConn", err)
	}
}
