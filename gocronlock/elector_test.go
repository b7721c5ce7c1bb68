package gocronlock_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/go-co-op/gocron/v2"

	"github.com/pglockkit/kit/gocronlock"
	"github.com/pglockkit/kit/internal/pgtest"
)

// electorSet watches the electors of one election, and reports two leaders
// at once as a problem.
type electorSet struct {
	es       []*gocronlock.Elector
	mu       sync.Mutex
	problems []string
}

// leader returns the index of the leading Elector, or -1.
func (s *electorSet) leader() int {
	idx, n := -1, 0
	for i, e := range s.es {
		if e.IsLeader(context.Background()) == nil {
			idx, n = i, n+1
		}
	}
	if n > 1 {
		s.mu.Lock()
		s.problems = append(s.problems, "two electors lead at once")
		s.mu.Unlock()
	}
	return idx
}

// TestElectorOnlyLeaderRuns: three schedulers, each with its own pool,
// *pglock.Locker and Elector in one election (WithDistributedElector), run
// a job every 200 ms. Only the leader's scheduler runs it; the others run
// none (their IsLeader says ErrNotLeader), and pg_locks shows one holder.
// When the leader's Elector is closed, another scheduler takes over within
// a moment, and the old leader runs nothing more.
func TestElectorOnlyLeaderRuns(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 1)
	var rec recLog
	set := &electorSet{}
	ss := make([]gocron.Scheduler, 3)
	var log tickLog
	for i, lk := range newLockers(t, 3) {
		e, err := gocronlock.NewElector(context.Background(), lk, name, gocronlock.WithLogger(&rec))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = e.Close() })
		set.es = append(set.es, e)
		ss[i] = newScheduler(t, gocron.WithDistributedElector(e))
		_, err = ss[i].NewJob(gocron.DurationJob(200*time.Millisecond), gocron.NewTask(func() {
			defer log.enter(time.Now(), i)()
		}), gocron.WithName("elected-job"))
		if err != nil {
			t.Fatal(err)
		}
	}
	key := set.es[0].Key()
	if !waitFor(5*time.Second, func() bool { return set.leader() >= 0 }) {
		t.Fatal("no leader elected within 5 s")
	}
	first := set.leader()
	for i, e := range set.es {
		if err := e.IsLeader(context.Background()); i != first && !errors.Is(err, gocronlock.ErrNotLeader) {
			t.Errorf("elector %d: IsLeader = %v, want ErrNotLeader", i, err)
		}
	}
	if hs := pgtest.Granted(t, obs, key); len(hs) != 1 {
		t.Errorf("pg_locks holders of the election's key %s: %+v, want one", key, hs)
	}
	for _, s := range ss {
		s.Start()
	}
	// Every 200 ms: three runs come within 1.1 s on an idle machine; a
	// loaded one may take longer, which says nothing of the election.
	waitFor(15*time.Second, func() bool { return len(log.runsSince(time.Time{})) >= 3 })
	byFirst := log.runsSince(time.Time{})
	for _, r := range byFirst {
		if r.replica != first {
			t.Errorf("replica %d ran the job while replica %d led", r.replica, first)
		}
	}
	if len(byFirst) < 3 {
		t.Errorf("the leader ran the job %d times in 15 s, want at least 3", len(byFirst))
	}

	if err := set.es[first].Close(); err != nil {
		t.Fatal(err)
	}
	closed := time.Now()
	if err := set.es[first].IsLeader(context.Background()); !errors.Is(err, gocronlock.ErrNotLeader) {
		t.Errorf("IsLeader after Close = %v, want ErrNotLeader", err)
	}
	if !waitFor(3*time.Second, func() bool { return set.leader() >= 0 }) {
		t.Fatal("no other elector took over within 3 s of the leader's Close")
	}
	second := set.leader()
	t.Logf("elector %d led; elector %d took over %v after its Close", first, second, time.Since(closed).Round(time.Millisecond))
	waitFor(15*time.Second, func() bool { return len(log.runsSince(closed)) >= 3 })
	shutdown(t, ss...)
	after := log.runsSince(closed)
	for _, r := range after {
		if r.replica != second {
			t.Errorf("replica %d ran the job after replica %d took over", r.replica, second)
		}
	}
	if len(after) < 3 {
		t.Errorf("the new leader ran the job %d times, want at least 3", len(after))
	}
	for _, p := range append(set.problems, log.problems...) {
		t.Error(p)
	}
	if rec.Count("INFO gocronlock: elected leader", "election="+name) != 2 {
		t.Errorf("want two \"elected leader\" lines; log:\n%s", rec.String())
	}
	for _, e := range set.es {
		_ = e.Close()
	}
	pgtest.WaitFree(t, obs, key)
}

// TestElectorContextEnds: an Elector stops campaigning when the context
// given to NewElector ends: it steps down, and the lock is released; Close
// afterwards returns at once. The election's key is the Locker's key for
// DefaultElectorNamespace + name.
func TestElectorContextEnds(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 1)
	lk := newLockers(t, 1)[0]
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e, err := gocronlock.NewElector(ctx, lk, name)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if want, _ := lk.Key(gocronlock.DefaultElectorNamespace + name); e.Key() != want || e.Name() != name {
		t.Errorf("Key() = %v, Name() = %q; want %v, %q", e.Key(), e.Name(), want, name)
	}
	if !waitFor(5*time.Second, func() bool { return e.IsLeader(ctx) == nil }) {
		t.Fatal("a lone elector was not elected within 5 s")
	}
	if hs := pgtest.Granted(t, obs, e.Key()); len(hs) != 1 {
		t.Errorf("pg_locks holders: %+v, want one", hs)
	}
	cancel()
	if !waitFor(2*time.Second, func() bool { return errors.Is(e.IsLeader(context.Background()), gocronlock.ErrNotLeader) }) {
		t.Error("still the leader 2 s after its context ended")
	}
	pgtest.WaitFree(t, obs, e.Key())
	done := make(chan struct{})
	go func() { _ = e.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Error("Close did not return within 2 s")
	}
}
