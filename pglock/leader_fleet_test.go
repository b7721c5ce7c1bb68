package pglock_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/faultproxy"
	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// The leader fleet test's child processes: the server's URL, the address
// of the fault proxy the child connects through, its identity and the key.
const (
	leaderFleetURLEnv   = "PGLOCK_TEST_LEADER_FLEET_URL"
	leaderFleetProxyEnv = "PGLOCK_TEST_LEADER_FLEET_PROXY"
	leaderFleetIDEnv    = "PGLOCK_TEST_LEADER_FLEET_ID"
	leaderFleetKeyEnv   = "PGLOCK_TEST_LEADER_FLEET_KEY"
)

// leaderFleetLostCheck is the lost-check interval of the replicas: the
// leader's health turns unhealthy within twice it when its link is cut.
const leaderFleetLostCheck = 300 * time.Millisecond

// TestLeaderFleetHelper is a replica of the leader fleet test; run directly,
// it skips. It runs a Leader with its own identity on a default Locker (on a
// pool whose connections go through the parent's fault proxy), serves the
// Leader's HealthHandler on a loopback port, and prints one line per event:
// "health ADDR", "leader ID UNIXNANO" (OnNewLeader), "elected UNIXNANO",
// "deposed UNIXNANO WHY". When its stdin closes it stops Run, prints
// "stopped" and exits.
func TestLeaderFleetHelper(t *testing.T) {
	url := os.Getenv(leaderFleetURLEnv)
	if url == "" {
		t.Skip("a replica of the leader fleet test")
	}
	var mu sync.Mutex
	say := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Printf(format+"\n", args...)
	}
	fail := func(err error) {
		say("error %v", err)
		os.Exit(2)
	}
	bg := context.Background()
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		fail(err)
	}
	host, port, err := net.SplitHostPort(os.Getenv(leaderFleetProxyEnv))
	if err != nil {
		fail(err)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		fail(err)
	}
	cfg.ConnConfig.Host, cfg.ConnConfig.Port, cfg.ConnConfig.Fallbacks = host, uint16(p), nil
	pool, err := pgxpool.NewWithConfig(bg, cfg)
	if err != nil {
		fail(err)
	}
	defer pool.Close()
	lk, err := pglock.NewLocker(pool, pglock.WithLostCheckInterval(leaderFleetLostCheck), pglock.WithReleaseTimeout(time.Second))
	if err != nil {
		fail(err)
	}
	defer lk.Close()
	ld, err := lk.Leader(os.Getenv(leaderFleetKeyEnv), pglock.LeaderConfig{
		Identity:    os.Getenv(leaderFleetIDEnv),
		MinBackoff:  time.Hour, // a deposed replica stays out of the election
		OnNewLeader: func(id string) { say("leader %s %d", id, time.Now().UnixNano()) },
		OnElected:   func(context.Context) { say("elected %d", time.Now().UnixNano()) },
		OnDeposed:   func(why error) { say("deposed %d %v", time.Now().UnixNano(), why) },
	})
	if err != nil {
		fail(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail(err)
	}
	srv := &http.Server{Handler: pglock.HealthHandler(ld.CheckHealth), ReadHeaderTimeout: 5 * time.Second}
	var wg sync.WaitGroup
	wg.Go(func() { _ = srv.Serve(ln) })
	say("health %s", ln.Addr())
	ctx, cancel := context.WithCancel(bg)
	wg.Go(func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	})
	err = ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil })
	if !errors.Is(err, context.Canceled) {
		say("error Run: %v", err)
	}
	_ = srv.Shutdown(bg)
	wg.Wait()
	say("stopped")
}

// fleetReplica is a replica process of the leader fleet test, and what it
// printed.
type fleetReplica struct {
	id     string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	proxy  *faultproxy.Proxy
	stderr *lockedBuilder
	exited chan struct{} // closed when its stdout ends
	start  time.Time

	mu     sync.Mutex
	events []fleetEvent
	kick   chan struct{} // a new event
}

// fleetEvent is a line of a replica: its kind ("leader", "elected",
// "deposed", "health", "stopped", "error"), the rest of the line, and the
// time the replica gave (zero when it gave none).
type fleetEvent struct {
	kind, arg string
	at        time.Time
}

// startFleetReplica starts a replica process with identity id, connecting
// to the server at url through a fault proxy of its own.
func startFleetReplica(t *testing.T, url, id, key string) *fleetReplica {
	t.Helper()
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	proxy := faultProxy(t, cfg)
	cmd := exec.Command(os.Args[0], "-test.run=^TestLeaderFleetHelper$", "-test.count=1", "-test.timeout=2m")
	cmd.Env = append(os.Environ(),
		leaderFleetURLEnv+"="+url, leaderFleetProxyEnv+"="+proxy.Addr(), leaderFleetIDEnv+"="+id, leaderFleetKeyEnv+"="+key)
	r := &fleetReplica{id: id, cmd: cmd, proxy: proxy, stderr: &lockedBuilder{}, exited: make(chan struct{}), kick: make(chan struct{}, 1)}
	cmd.Stderr = r.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if r.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	r.start = time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var reader sync.WaitGroup
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		reader.Wait()
		_ = cmd.Wait()
	})
	reader.Go(func() {
		defer close(r.exited)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			r.add(sc.Text())
		}
	})
	return r
}

func (r *fleetReplica) add(line string) {
	kind, arg, _ := strings.Cut(line, " ")
	e := fleetEvent{kind: kind, arg: arg}
	var ns string
	switch kind {
	case "leader":
		e.arg, ns, _ = strings.Cut(arg, " ")
	case "elected":
		ns = arg
	case "deposed":
		ns, e.arg, _ = strings.Cut(arg, " ")
	}
	if n, err := strconv.ParseInt(ns, 10, 64); err == nil {
		e.at = time.Unix(0, n)
	}
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// mark returns how many events the replica has printed so far.
func (r *fleetReplica) mark() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.events)
}

// next waits (up to limit) for the first event of kind printed from the
// mark from on, and returns it; it fails the test when the replica prints
// an error or exits first.
func (r *fleetReplica) next(t *testing.T, from int, kind string, limit time.Duration) fleetEvent {
	t.Helper()
	timer := time.NewTimer(limit)
	defer timer.Stop()
	for {
		r.mu.Lock()
		evs := r.events[min(from, len(r.events)):]
		r.mu.Unlock()
		for _, e := range evs {
			if e.kind == "error" {
				t.Fatalf("%s: error %s: stderr: %s", r.id, e.arg, r.stderr.String())
			}
			if e.kind == kind {
				return e
			}
		}
		select {
		case <-r.kick:
		case <-r.exited:
			select {
			case <-r.kick:
				continue // the last lines
			default:
			}
			t.Fatalf("%s exited before %q: stderr: %s", r.id, kind, r.stderr.String())
		case <-timer.C:
			t.Fatalf("%s did not print %q within %v: %v", r.id, kind, limit, r.since(from))
		}
	}
}

// since returns the events printed from the mark from on.
func (r *fleetReplica) since(from int) []fleetEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events[min(from, len(r.events)):])
}

// health asks the replica's HealthHandler, over its loopback port, and
// returns the status and body.
func (r *fleetReplica) health(t *testing.T, addr string) (int, string) {
	t.Helper()
	// No keep-alive: no connection of the parent's outlives the probe.
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatalf("%s's health: %v", r.id, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, strings.TrimSpace(string(body))
}

// Issue 25, across processes. Three replica processes (the test binary,
// re-run) each run a Leader with an identity of its own on a default
// Locker, and print each new leader their OnNewLeader sees, with the time.
// Every replica names the same leader, the one elected. When the leader's
// process is stopped (its Run ends), and then when it is killed (SIGKILL,
// after a fresh replica took its place), every remaining replica names the
// same new leader, the one elected, within 1 s of the stop or kill, and
// names no other one in between. Then the leader's link to the server is
// cut (a silent fault proxy): its HealthHandler, served by its process on a
// loopback port, answers 503 within the loss bound (twice the lost-check
// interval) and 200 again once it has stepped down; when the link comes
// back the others elect a leader and all name it. Nothing is left in
// pg_locks or pg_stat_activity once they have stopped.
func TestLeaderIdentityAcrossProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts four processes")
	}
	url := pgtest.URL(t)
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	key := locktest.Key(t, muxLocker(t, watch), name)
	suffix := strconv.FormatInt(time.Now().UnixNano()%1e9, 36)
	const bound = time.Second

	var replicas []*fleetReplica
	healthAddr := map[*fleetReplica]string{}
	start := func(i int) *fleetReplica {
		r := startFleetReplica(t, url, fmt.Sprintf("fleet-%d-%s", i, suffix), name)
		healthAddr[r] = r.next(t, 0, "health", time.Minute).arg
		replicas = append(replicas, r)
		return r
	}
	running := func(except ...*fleetReplica) []*fleetReplica {
		return slices.DeleteFunc(slices.Clone(replicas), func(r *fleetReplica) bool { return slices.Contains(except, r) })
	}
	// elected waits for the replica among rs that prints "elected" after
	// its mark, and returns it with the event.
	elected := func(rs []*fleetReplica, marks map[*fleetReplica]int) (*fleetReplica, fleetEvent) {
		t.Helper()
		var who *fleetReplica
		var ev fleetEvent
		locktest.WaitFor(t, "a replica to be elected", func() bool {
			for _, r := range rs {
				for _, e := range r.since(marks[r]) {
					if e.kind == "error" {
						t.Fatalf("%s: error %s", r.id, e.arg)
					}
					if e.kind == "elected" {
						who, ev = r, e
						return true
					}
				}
			}
			return false
		})
		return who, ev
	}
	marks := func() map[*fleetReplica]int {
		m := map[*fleetReplica]int{}
		for _, r := range replicas {
			m[r] = r.mark()
		}
		return m
	}
	// converge checks that every replica in rs names want as its first
	// "leader" line after its mark, and returns how long after since each
	// did (by the replica's clock).
	converge := func(what string, rs []*fleetReplica, m map[*fleetReplica]int, want string, since time.Time, limit time.Duration) time.Duration {
		t.Helper()
		var slowest time.Duration
		var figures []string
		for _, r := range rs {
			e := r.next(t, m[r], "leader", 10*time.Second)
			d := e.at.Sub(since)
			figures = append(figures, fmt.Sprintf("%s %v", r.id, d.Round(time.Millisecond)))
			slowest = max(slowest, d)
			switch {
			case e.arg != want:
				t.Errorf("%s: %s named %s first, want %s (the one elected)", what, r.id, e.arg, want)
			case limit > 0 && d > limit:
				t.Errorf("%s: %s named %s %v after, want within %v", what, r.id, want, d.Round(time.Millisecond), limit)
			}
		}
		t.Logf("%s: every replica named %s; after: %s", what, want, strings.Join(figures, ", "))
		return slowest
	}

	for i := range 3 {
		start(i)
	}
	m0 := map[*fleetReplica]int{}
	first, ev := elected(replicas, m0)
	t.Logf("start: %s elected %v after its process started", first.id, ev.at.Sub(first.start).Round(time.Millisecond))
	converge("start (from the election)", replicas, m0, first.id, ev.at, 0)
	locktest.WaitFor(t, "the two others to wait in the server", func() bool { return locktest.Waiters(t, watch, key) == 2 })

	// Round 1: the leader's process is stopped (its Run ends, it lets go).
	m := marks()
	stopped := time.Now()
	_ = first.stdin.Close()
	second, ev := elected(running(first), m)
	t.Logf("stop: %s elected %v after the stop", second.id, ev.at.Sub(stopped).Round(time.Millisecond))
	converge("stop", running(first), m, second.id, stopped, bound)
	first.next(t, m[first], "stopped", 10*time.Second)
	if err := first.cmd.Wait(); err != nil {
		t.Errorf("%s: %v: %s", first.id, err, first.stderr.String())
	}
	replicas = running(first)

	// A fresh replica joins; then the leader's process is killed.
	joined := start(3)
	converge("join (from its process's start)", []*fleetReplica{joined}, map[*fleetReplica]int{}, second.id, joined.start, 0)
	locktest.WaitFor(t, "the two others to wait in the server", func() bool { return locktest.Waiters(t, watch, key) == 2 })
	m = marks()
	killed := time.Now()
	if err := second.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	third, ev := elected(running(second), m)
	t.Logf("kill: %s elected %v after the SIGKILL", third.id, ev.at.Sub(killed).Round(time.Millisecond))
	converge("kill", running(second), m, third.id, killed, bound)
	replicas = running(second)

	// Round 3: the leader's link is cut: its health turns 503 within the
	// loss bound, and 200 once it has stepped down.
	if code, body := third.health(t, healthAddr[third]); code != http.StatusOK {
		t.Fatalf("the leader's health before the cut: %d %q", code, body)
	}
	m = marks()
	cut := time.Now()
	third.proxy.Blackhole()
	waitHealth := func(status int) (time.Time, string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			code, body := third.health(t, healthAddr[third])
			if code == status {
				return time.Now(), body
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s's health did not answer %d within 10 s; last %d %q", third.id, status, code, body)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	at, body := waitHealth(http.StatusServiceUnavailable)
	t.Logf("cut: %s's health 503 %v after the cut: %q", third.id, at.Sub(cut).Round(time.Millisecond), body)
	if d := at.Sub(cut); d > 2*leaderFleetLostCheck+300*time.Millisecond {
		t.Errorf("%s's health 503 %v after the cut, want within the loss bound (2 x %v)", third.id, d.Round(time.Millisecond), leaderFleetLostCheck)
	}
	if !strings.Contains(body, pglock.ErrLeaderInDoubt.Error()) || !strings.Contains(body, third.id) {
		t.Errorf("the 503's body %q does not say that %s's lock is in doubt", body, third.id)
	}
	dep := third.next(t, m[third], "deposed", 10*time.Second)
	t.Logf("cut: %s deposed %v after the cut (%s)", third.id, dep.at.Sub(cut).Round(time.Millisecond), dep.arg)
	at, _ = waitHealth(http.StatusOK)
	t.Logf("cut: %s's health 200 again %v after the cut", third.id, at.Sub(cut).Round(time.Millisecond))
	restored := time.Now()
	third.proxy.Restore()
	fourth, ev := elected(running(third), m)
	t.Logf("cut: %s elected %v after the link came back", fourth.id, ev.at.Sub(restored).Round(time.Millisecond))
	converge("cut", replicas, m, fourth.id, restored, 0)

	for _, r := range replicas {
		_ = r.stdin.Close()
	}
	for _, r := range replicas {
		r.next(t, 0, "stopped", 10*time.Second)
		if err := r.cmd.Wait(); err != nil {
			t.Errorf("%s: %v: %s", r.id, err, r.stderr.String())
		}
	}
	pgtest.WaitFree(t, watch, key)
	locktest.WaitFor(t, "no session named with a replica's identity", func() bool {
		var n int
		if err := watch.QueryRow(context.Background(), "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name LIKE $1",
			"fleet-%-"+suffix).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n == 0
	})
}
