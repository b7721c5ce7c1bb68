package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// identityReplica is one replica of an election: a Locker on a pool of its
// own, a Leader, and what its OnNewLeader reported.
type identityReplica struct {
	id   string
	ld   *pglock.Leader
	stop context.CancelFunc
	done chan error

	mu      sync.Mutex
	reports []identityReport
}

type identityReport struct {
	id string
	at time.Time
}

func (r *identityReplica) onNewLeader(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reports = append(r.reports, identityReport{id, time.Now()})
}

// last returns the last identity reported, and when.
func (r *identityReplica) last() identityReport {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.reports) == 0 {
		return identityReport{}
	}
	return r.reports[len(r.reports)-1]
}

func (r *identityReplica) all() []identityReport {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.reports)
}

// goroutinesIn counts the goroutines whose stack has fn in it.
func goroutinesIn(fn string) int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		if strings.Contains(g, fn) {
			n++
		}
	}
	return n
}

// appNameOf reads the application_name of the session pid.
func appNameOf(t *testing.T, watch *pgxpool.Pool, pid int32) string {
	t.Helper()
	var app string
	if err := watch.QueryRow(context.Background(), "SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid).Scan(&app); err != nil {
		t.Fatalf("application_name of %d: %v", pid, err)
	}
	return app
}

// Issue 25. Three replicas (three Lockers on pools of their own) elect a
// leader; each says, with OnNewLeader, which one leads, and so does
// CurrentLeader on every replica and on a fourth that does not run: all
// read it from the server, where the leader's session carries its identity
// as application_name. When the leader is stopped, and when its session is
// killed, every replica reports the new leader within 1 s, with the default
// ObserveInterval; no replica ever reports an identity that is not a
// replica's; the watchers end with Run; nothing is left in pg_locks.
func TestLeaderIdentityConverges(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	key := pgtest.UniqueKey(t)
	suffix := strconv.FormatInt(time.Now().UnixNano()%1e9, 36)
	observers := goroutinesIn("pglock.(*Leader).observe")

	const n = 3
	rs := make([]*identityReplica, n)
	ids := make([]string, n)
	for i := range n {
		lk, err := pglock.NewLocker(pgtest.Pool(t, 2))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = lk.Close() })
		r := &identityReplica{id: fmt.Sprintf("replica-%d-%s", i, suffix)}
		r.ld, err = lk.Leader(key, pglock.LeaderConfig{
			Identity:    r.id,
			MinBackoff:  50 * time.Millisecond,
			MaxBackoff:  100 * time.Millisecond,
			OnNewLeader: r.onNewLeader,
		})
		if err != nil {
			t.Fatal(err)
		}
		if got := r.ld.Identity(); got != r.id {
			t.Fatalf("Identity() = %q, want %q", got, r.id)
		}
		rs[i], ids[i] = r, r.id
	}
	// The fourth: a Locker and Leader of its own that never runs, and asks.
	fourthLk, err := pglock.NewLocker(pgtest.Pool(t, 2))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fourthLk.Close() })
	fourth, err := fourthLk.Leader(key, pglock.LeaderConfig{Identity: "fourth-" + suffix})
	if err != nil {
		t.Fatal(err)
	}
	askers := []*pglock.Leader{rs[0].ld, rs[1].ld, rs[2].ld, fourth}

	var wg sync.WaitGroup
	run := func(r *identityReplica) {
		ctx, cancel := context.WithCancel(bg)
		r.stop, r.done = cancel, make(chan error, 1)
		wg.Go(func() {
			r.done <- r.ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil })
		})
	}
	defer func() {
		for _, r := range rs {
			if r.stop != nil {
				r.stop()
			}
		}
		wg.Wait()
	}()
	leader := func(except *identityReplica) *identityReplica {
		t.Helper()
		var found *identityReplica
		locktest.WaitFor(t, "a leader", func() bool {
			for _, r := range rs {
				if r != except && r.ld.IsLeader() {
					found = r
					return true
				}
			}
			return false
		})
		return found
	}
	// converge waits until every replica in reporting has reported want
	// last, and CurrentLeader answers want on every asker, and fails the
	// test for each that took more than bound after since.
	converge := func(want string, since time.Time, bound time.Duration, reporting ...*identityReplica) {
		t.Helper()
		seen := make(map[string]time.Time) // by replica (reports) and asker ("ask:" + identity)
		deadline := time.Now().Add(10 * time.Second)
		for len(seen) < len(reporting)+len(askers) {
			if time.Now().After(deadline) {
				t.Fatalf("no convergence on %s within 10 s: seen %v", want, seen)
			}
			for _, r := range reporting {
				if last := r.last(); last.id == want {
					seen[r.id] = last.at
				}
			}
			for _, a := range askers {
				if _, ok := seen["ask:"+a.Identity()]; ok {
					continue
				}
				id, ok, err := a.CurrentLeader(bg)
				if err != nil {
					t.Fatalf("CurrentLeader on %s: %v", a.Identity(), err)
				}
				if ok && id == want {
					seen["ask:"+a.Identity()] = time.Now()
				}
			}
			time.Sleep(5 * time.Millisecond)
		}
		var slowest time.Duration
		for who, at := range seen {
			slowest = max(slowest, at.Sub(since))
			if d := at.Sub(since); d > bound {
				t.Errorf("%s: %s seen as the leader %v after the change, want within %v", who, want, d.Round(time.Millisecond), bound)
			}
		}
		t.Logf("every replica saw %s as the leader within %v", want, slowest.Round(time.Millisecond))
	}

	for _, r := range rs {
		run(r)
	}
	first := leader(nil)
	converge(first.id, time.Now(), 5*time.Second, rs...)
	locktest.WaitFor(t, "the two others to wait in the server", func() bool {
		return locktest.Waiters(t, watch, first.ld.Key()) == n-1
	})
	// From the server's side: the leader's session, and the waiting ones,
	// carry their identities.
	hs, err := pgtest.Holders(bg, watch, first.ld.Key())
	if err != nil {
		t.Fatal(err)
	}
	var waiting []string
	for _, h := range hs {
		app := appNameOf(t, watch, h.PID)
		if h.Granted && app != first.id {
			t.Errorf("the leader's session %d has application_name %q, want %q", h.PID, app, first.id)
		}
		if !h.Granted {
			waiting = append(waiting, app)
		}
	}
	slices.Sort(waiting)
	others := slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return id == first.id })
	if !slices.Equal(waiting, others) {
		t.Errorf("the waiting sessions carry %q, want %q", waiting, others)
	}

	// Stop the leader: another is elected, and every replica that runs
	// (and every one that asks) says so within 1 s.
	stopped := time.Now()
	first.stop()
	if err := <-first.done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run of the stopped leader = %v", err)
	}
	second := leader(first)
	converge(second.id, stopped, time.Second, slices.DeleteFunc(slices.Clone(rs), func(r *identityReplica) bool { return r == first })...)
	t.Logf("after the stop: %s leads", second.id)

	// The stopped one campaigns again; then the leader's session is killed.
	run(first)
	locktest.WaitFor(t, "the two others to wait in the server", func() bool {
		return locktest.Waiters(t, watch, second.ld.Key()) == n-1
	})
	granted := pgtest.Granted(t, watch, second.ld.Key())
	if len(granted) != 1 {
		t.Fatalf("granted %+v, want one session", granted)
	}
	killed := time.Now()
	pgtest.Terminate(t, watch, granted[0].PID)
	third := leader(second)
	converge(third.id, killed, time.Second, rs...)
	t.Logf("after the kill: %s leads", third.id)

	for _, r := range rs {
		r.stop()
	}
	wg.Wait()
	for _, r := range rs {
		for _, rep := range r.all() {
			if !slices.Contains(ids, rep.id) {
				t.Errorf("%s reported leader %q, which is no replica's identity", r.id, rep.id)
			}
		}
		var saw []string
		for _, rep := range r.all() {
			saw = append(saw, rep.id)
		}
		t.Logf("%s saw %v", r.id, saw)
	}
	if got := goroutinesIn("pglock.(*Leader).observe"); got != observers {
		t.Errorf("%d OnNewLeader watchers run after every Run returned, want %d", got, observers)
	}
	pgtest.WaitFree(t, watch, first.ld.Key())
	if id, ok, err := fourth.CurrentLeader(bg); err != nil || ok {
		t.Errorf("CurrentLeader with nobody leading = %q, %v, %v; want not ok", id, ok, err)
	}
}

// Issue 25. The identity's default is the host name and process id; a bad
// identity, a bad ObserveInterval, or OnNewLeader on a Locker on one
// connection is an error at construction; CurrentLeader names whatever
// session holds the key (a plain Lock shows its pool's application_name, a
// Leader without multiplexing its identity); nil Leaders fail cleanly.
func TestLeaderIdentityConfig(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	lk, err := pglock.NewLocker(pgtest.Pool(t, 2))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	key := pgtest.UniqueKey(t)
	ld, err := lk.Leader(key, pglock.LeaderConfig{})
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	if want := host + ":" + strconv.Itoa(os.Getpid()); ld.Identity() != want && len(want) <= 63 {
		t.Errorf("default Identity() = %q, want %q", ld.Identity(), want)
	}
	for _, c := range []struct {
		name string
		cfg  pglock.LeaderConfig
	}{
		{"64 bytes", pglock.LeaderConfig{Identity: strings.Repeat("x", 64)}},
		{"non-ASCII", pglock.LeaderConfig{Identity: "répliqué"}},
		{"a newline", pglock.LeaderConfig{Identity: "a\nb"}},
		{"a tab", pglock.LeaderConfig{Identity: "a\tb"}},
		{"a short interval", pglock.LeaderConfig{ObserveInterval: 99 * time.Millisecond}},
		{"a negative interval", pglock.LeaderConfig{ObserveInterval: -time.Second}},
		{"a long interval", pglock.LeaderConfig{ObserveInterval: 2 * time.Hour}},
	} {
		if _, err := lk.Leader(key, c.cfg); !errors.Is(err, pglock.ErrInvalidOption) {
			t.Errorf("Leader with %s = %v, want ErrInvalidOption", c.name, err)
		}
	}
	if _, err := lk.Leader(key, pglock.LeaderConfig{Identity: strings.Repeat("x", 63), ObserveInterval: time.Hour}); err != nil {
		t.Errorf("Leader with 63 bytes of identity and a 1 h interval = %v", err)
	}

	// A Locker that does not multiplex: its Leader's key lives on a pool
	// connection, named with the Leader's identity while it holds it (see
	// TestLeaderIdentityPerHold).
	app := "per-hold-" + strconv.FormatInt(time.Now().UnixNano()%1e9, 36)
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 2
	cfg.ConnConfig.RuntimeParams["application_name"] = app
	pool, err := pgxpool.NewWithConfig(bg, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	perHold, err := pglock.NewLocker(pool, pglock.WithMultiplexing(false))
	if err != nil {
		t.Fatal(err)
	}
	defer perHold.Close()
	if _, err := perHold.Leader(key, pglock.LeaderConfig{OnNewLeader: func(string) {}}); err != nil {
		t.Errorf("OnNewLeader on a Locker without multiplexing = %v", err)
	}
	phl, err := perHold.Leader(key+"-per-hold", pglock.LeaderConfig{Identity: "per-hold-leader"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(bg)
	elected := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- phl.Run(ctx, func(ctx context.Context) error { close(elected); <-ctx.Done(); return nil })
	}()
	<-elected
	if id, ok, err := phl.CurrentLeader(bg); err != nil || !ok || id != "per-hold-leader" {
		t.Errorf("CurrentLeader of a Leader without multiplexing = %q, %v, %v; want its identity", id, ok, err)
	}
	cancel()
	<-done

	// A Locker on one connection: no pool to ask on.
	conn, err := pgx.Connect(bg, pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(bg)
	single, err := pglock.NewLocker(conn)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := single.Leader(key, pglock.LeaderConfig{OnNewLeader: func(string) {}}); !errors.Is(err, pglock.ErrInvalidOption) {
		t.Errorf("OnNewLeader on a Locker on one connection = %v, want ErrInvalidOption", err)
	}
	sl, err := single.Leader(key, pglock.LeaderConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := sl.CurrentLeader(bg); !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Errorf("CurrentLeader on a Locker on one connection = %v, want ErrUnsupportedConn", err)
	}

	// Whatever holds the key is named: here a plain Lock of a pool whose
	// application_name is app.
	l, err := pglock.NewLock(pool, ld.Key())
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	if id, ok, err := ld.CurrentLeader(bg); err != nil || !ok || id != app {
		t.Errorf("CurrentLeader with a Lock holding the key = %q, %v, %v; want %q", id, ok, err, app)
	}
	if err := l.Release(bg); err != nil {
		t.Fatal(err)
	}

	var nilLeader *pglock.Leader
	if nilLeader.Identity() != "" {
		t.Error("a nil Leader has an identity")
	}
	if _, _, err := nilLeader.CurrentLeader(bg); !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Errorf("CurrentLeader on a nil Leader = %v, want ErrUnsupportedConn", err)
	}
	if _, _, err := new(pglock.Leader).CurrentLeader(bg); !errors.Is(err, pglock.ErrUnsupportedConn) {
		t.Errorf("CurrentLeader on a zero Leader = %v, want ErrUnsupportedConn", err)
	}
}
