package pglock_test

// A randomized model of a multiplexing Locker's server sessions: random
// operations (waits, tries, holds in both modes, Leaders, cancels, sessions
// ended by the server, Close) run against a Locker while the test compares
// what the Locker says it has (Locker.Stats) and what the server shows
// (pg_stat_activity, pg_locks) with the budget the documentation gives
// (doc.go, "Running in production": WithLockConns + WithWaitConns + one per
// running Leader). Helpers are named sm*.
//
// Each round has a seed, logged; PGLOCK_SESSIONS_SEED=<seed> runs that one
// round again (the same choices; the interleaving is the scheduler's).

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// smSeedEnv names the environment variable that runs one round of
// TestSessionsModel with the seed it gives (one the test logged).
const smSeedEnv = "PGLOCK_SESSIONS_SEED"

// smQuiet bounds the wait for a quiescent Locker's Stats to agree with the
// server: a session the server ended is noticed by the Locker only when it
// reads the connection (its watch, or its next use).
const smQuiet = 10 * time.Second

// smHang bounds how long the operations may take to end once told to (or
// once the Locker is closed) before the test calls it a hang.
const smHang = 15 * time.Second

// TestSessionsModel proves, over random seeded rounds of random operations
// on a multiplexing Locker (Locker.Do with waits on keys held by another
// session or by another goroutine, TryDo, NewLock's Acquire, TryAcquire and
// Release in Exclusive and Shared modes, two Leaders that campaign, lead
// and are stopped (once their campaign has a session: see leaderSettled),
// pg_terminate_backend of a random session of the Locker that is in use
// (see smModel.kill), cancelled waits, Close at a random point, with or
// without operations running), with random WithLockConns and WithWaitConns
// (1 to 3 each), that:
//
//  1. at every sample while operations run, the Locker's sessions in
//     pg_stat_activity never exceed WithLockConns + WithWaitConns + its
//     running Leaders, and Stats().Sessions never exceeds Stats().MaxSessions
//     (nor MaxSessions that budget); a session the test has ended with
//     pg_terminate_backend is not counted while its backend exits (see
//     TestSessionsModelLossReplacedBeforeEnded), the samples where only it
//     made the count exceed the budget are logged;
//  2. once no operation is in flight, Stats agrees with the server (within
//     smQuiet, for a session the server ended to be noticed): Sessions is
//     the number of its sessions in pg_stat_activity, LockConns + WaitConns
//     = Sessions, the roles add up to WaitConns, nothing is held, waited for
//     or counted as a Leader's;
//  3. when Close returns, none of its sessions is on the server and none of
//     their advisory locks; Stats counts nothing (MaxSessions is the
//     budget without Leaders); every operation ends (no hang) with an error
//     matching ErrLockerClosed or its own context's, or, for a hold that
//     Close ended, ErrLockLost; and no goroutine of the Locker is left.
func TestSessionsModel(t *testing.T) {
	rounds := 10
	if testing.Short() {
		rounds = 3
	}
	base := rand.Uint64() >> 1
	if v := os.Getenv(smSeedEnv); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", smSeedEnv, v, err)
		}
		base, rounds = s, 1
	}
	env := smNewEnv(t)
	var cov smCoverage
	start := time.Now()
	for r := range rounds {
		seed := base + uint64(r)
		// The last round of a run closes with operations running if no
		// round has yet.
		forceMid := r == rounds-1 && rounds > 1 && cov.midCloses == 0
		ok := t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			smRound(t, env, seed, forceMid, &cov)
		})
		if !ok {
			t.Logf("round %d failed: reproduce with %s=%d go test -race -count 1 -run 'TestSessionsModel$' ./pglock", r, smSeedEnv, seed)
		}
	}
	t.Logf("%d rounds (seeds %d..%d) in %v: %s", rounds, base, base+uint64(rounds)-1, time.Since(start).Round(time.Millisecond), cov.String())
	if rounds > 1 {
		// The model must have exercised what it checks.
		for _, c := range []struct {
			what string
			n    int64
		}{
			{"waits granted on a waiting connection (HoldingConns > 0 in a sample)", cov.holdingSeen},
			{"waits in the server's queue (WaitingConns > 0 in a sample)", cov.waitingSeen},
			{"sessions ended by pg_terminate_backend", cov.kills},
			{"waits cancelled", cov.cancels},
			{"Leader terms", cov.terms},
			{"Closes with operations running", cov.midCloses},
			{"acquires that got their lock", cov.held},
		} {
			if c.n == 0 {
				t.Errorf("the model did not exercise: %s", c.what)
			}
		}
	}
}

// smEnv is what the rounds share: a pool to watch the server from, and a
// pool of another "process" that holds keys (so that the Locker waits in
// the server's queue, on waiting connections).
type smEnv struct {
	url    string
	watch  *pgxpool.Pool
	other  *pgxpool.Pool
	prefix string
	// otherApp names the other pool's sessions (its holds are on pool
	// connections, named otherApp+"/pool").
	otherApp string
}

func smNewEnv(t *testing.T) *smEnv {
	u := pgtest.URL(t)
	e := &smEnv{url: u, prefix: pgtest.UniqueKey(t)}
	e.watch = smPool(t, u, "", 4, nil, nil)
	e.otherApp = fmt.Sprintf("sm-other-%d", os.Getpid())
	e.other = smPool(t, u, e.otherApp, 8, nil, nil)
	return e
}

// smPool is a pool on u whose connections are named app+"/pool" (when app
// is not ""), with maxConns connections, closed when the test ends. The
// pool's configuration names its sessions app: the Locker's own sessions,
// opened from that configuration without the pool's BeforeConnect, carry
// app, the pool's own connections do not. The PIDs of the pool's
// connections are recorded in pids (when not nil) by AfterConnect, which
// does not run for the Locker's sessions either. edit, when not nil, edits
// the configuration last.
func smPool(t testing.TB, u, app string, maxConns int32, pids *sync.Map, edit func(*pgxpool.Config)) *pgxpool.Pool {
	t.Helper()
	return pgtest.PoolWith(t, u, maxConns, func(cfg *pgxpool.Config) {
		if app != "" {
			pgtest.NameSessions(cfg, app)
		}
		if pids != nil {
			cfg.AfterConnect = func(_ context.Context, c *pgx.Conn) error {
				pids.Store(c.PgConn().PID(), true)
				return nil
			}
		}
		if edit != nil {
			edit(cfg)
		}
	})
}

// smSession is one of the Locker's sessions as the server shows it.
type smSession struct {
	pid   uint32
	app   string
	state string
	query string
	locks int // advisory locks held or awaited
}

func (s smSession) String() string {
	return fmt.Sprintf("[pid %d %q %s, %d advisory locks: %.70q]", s.pid, s.app, s.state, s.locks, s.query)
}

// smServer reads the Locker's sessions from the server: client backends
// named by one of names (the pool's application_name, the Leaders'
// identity) that are not the pool's own connections (pids).
func smServer(ctx context.Context, watch *pgxpool.Pool, names []string, pids *sync.Map) ([]smSession, error) {
	rows, err := watch.Query(ctx, `
		SELECT a.pid, a.application_name, coalesce(a.state, ''), coalesce(a.query, ''),
		       (SELECT count(*) FROM pg_catalog.pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory')::int
		FROM pg_catalog.pg_stat_activity a
		WHERE a.backend_type = 'client backend' AND a.application_name = ANY($1)`, names)
	if err != nil {
		return nil, err
	}
	all, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (smSession, error) {
		var s smSession
		var pid int32
		err := r.Scan(&pid, &s.app, &s.state, &s.query, &s.locks)
		s.pid = uint32(pid)
		return s, err
	})
	if err != nil {
		return nil, err
	}
	own := all[:0]
	for _, s := range all {
		if _, pool := pids.Load(s.pid); !pool {
			own = append(own, s)
		}
	}
	return own, nil
}

// smLocks sums the advisory locks of ss.
func smLocks(ss []smSession) int {
	n := 0
	for _, s := range ss {
		n += s.locks
	}
	return n
}

// smCoverage counts what the rounds exercised (logged, and checked to be
// nonzero).
type smCoverage struct {
	samples, holdingSeen, waitingSeen, kills, cancels, terms  int64
	killedLeader, killedWaiting, killedHolding, killedOverlap int64
	midCloses, held, busy, lost, notAcquired, unavailable     int64
	maxServer                                                 int64
}

func (c *smCoverage) String() string {
	return fmt.Sprintf("%d samples (at most %d sessions seen), %d with a waiting connection holding, %d with one waiting; %d sessions killed (%d of Leaders, %d waiting, %d holding; %d samples over the budget only with a killed one still exiting), %d waits cancelled, %d Leader terms, %d Closes with operations running; acquires: %d held, %d busy, %d not acquired, %d unavailable, %d holds lost",
		c.samples, c.maxServer, c.holdingSeen, c.waitingSeen, c.kills, c.killedLeader, c.killedWaiting, c.killedHolding, c.killedOverlap, c.cancels, c.terms, c.midCloses, c.held, c.busy, c.notAcquired, c.unavailable, c.lost)
}

// smRound is one round: a new Locker with random options, bursts of random
// operations, each followed by a quiescent check, then Close at a random
// point (in the last burst, with operations running, or after it).
func smRound(t *testing.T, env *smEnv, seed uint64, forceMid bool, cov *smCoverage) {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	lockConns, waitConns := 1+rng.IntN(3), 1+rng.IntN(3)
	app := fmt.Sprintf("sm-%d-%d", os.Getpid(), seed)
	// Two Leaders, each of its own key and identity (so that the server
	// shows which one has a session).
	identities := []string{app + "/l0", app + "/l1"}
	names := append([]string{app}, identities...)
	var pids sync.Map
	pool := smPool(t, env.url, app, 3, &pids, nil)
	// Two keys of operations with deadlines, two of operations without
	// ("pinned": what they wait for or hold ends only by the driver's
	// actions, a loss or Close), and the Leaders' keys.
	var keys []string
	pinned := make(map[string]bool)
	for i := range 4 {
		k := fmt.Sprintf("%s:%d:k%d", env.prefix, seed, i)
		keys = append(keys, k)
		pinned[k] = i >= 2
	}
	leaderKeys := []string{fmt.Sprintf("%s:%d:l0", env.prefix, seed), fmt.Sprintf("%s:%d:l1", env.prefix, seed)}
	var tags []string // every key's of the round, as pg_locks shows them; the pinned keys' and the Leaders' first
	for _, k := range slices.Concat(keys[2:], leaderKeys, keys[:2]) {
		key, err := pglock.KeyOf(k)
		if err != nil {
			t.Fatal(err)
		}
		classid, objid, _ := key.LockTag()
		tags = append(tags, fmt.Sprintf("%d/%d", classid, objid))
	}
	opts := []pglock.Option{pglock.WithLockConns(lockConns), pglock.WithWaitConns(waitConns)}
	if rng.IntN(2) == 0 {
		opts = append(opts, pglock.WithLostCheckInterval(100*time.Millisecond))
	}
	bursts := 2 + rng.IntN(2)
	midClose := forceMid || rng.IntN(2) == 0
	t.Logf("seed %d: WithLockConns(%d), WithWaitConns(%d), %d options, %d bursts, Close %s",
		seed, lockConns, waitConns, len(opts), bursts, map[bool]string{true: "with operations running", false: "when quiescent"}[midClose])

	// Every goroutine started from here on must be gone after Close.
	before := goleak.IgnoreCurrent()
	lk, err := pglock.NewLocker(pool, opts...)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			_ = lk.Close()
		}
	}()
	m := &smModel{
		t: t, env: env, lk: lk, rng: rng, names: names, identities: identities, pids: &pids, keys: keys,
		pinned: pinned, tags: tags[:4], allTags: tags, leaderKeys: leaderKeys, budget: lockConns + waitConns, cov: cov, born: time.Now(),
	}
	defer m.releaseOutsider()
	for i := range m.leaders {
		ld, err := lk.Leader(leaderKeys[i], pglock.LeaderConfig{Identity: identities[i], MinBackoff: 10 * time.Millisecond, MaxBackoff: 40 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		m.leaders[i] = &smLeader{ld: ld, identity: identities[i]}
	}
	for b := range bursts {
		last := b == bursts-1
		m.burst(time.Duration(400+rng.IntN(700))*time.Millisecond, last && midClose)
		if t.Failed() {
			return
		}
		if last && midClose {
			closed = true
			break
		}
		m.quiescent(fmt.Sprintf("after burst %d", b))
		if t.Failed() {
			return
		}
	}
	if !closed {
		closed = true
		m.closeAndCheck(false)
	}
	m.releaseOutsider()
	if err := goleak.Find(before); err != nil {
		t.Errorf("INVARIANT no-goroutine-left: goroutines left after Close: %v", err)
	}
}

// smModel is the state of one round.
type smModel struct {
	t          *testing.T
	env        *smEnv
	lk         *pglock.Locker
	rng        *rand.Rand // the driver's (the test goroutine's) only
	names      []string   // the Locker's sessions' application_name: the pool's, the Leaders' identities
	identities []string
	pids       *sync.Map
	keys       []string
	pinned     map[string]bool // keys whose operations have no deadline
	tags       []string        // the pinned keys and the Leaders' keys in pg_locks (classid/objid)
	allTags    []string        // every key of the round in pg_locks
	leaderKeys []string
	budget     int // WithLockConns + WithWaitConns
	cov        *smCoverage
	born       time.Time // when the Locker was made

	leaders        [2]*smLeader
	runningLeaders atomic.Int64 // Leaders whose Run has started and not returned

	killed  sync.Map // the PIDs of the sessions the driver ended (see kill)
	holds   smSet    // the holds under way: each action ends one
	waits   smSet    // the acquires under way: each action cancels one's context
	outside []*pglock.Lock

	stop    atomic.Bool // workers start no new operation
	closing atomic.Bool // Close has been called

	mu       sync.Mutex
	bad      []string  // unexpected errors, invariant violations seen by goroutines
	afterErr []smEnded // the operations that ended after Close began
}

// smLeader is a Leader of the round and its Run under way.
type smLeader struct {
	ld       *pglock.Leader
	identity string
	cancel   context.CancelFunc
	done     chan struct{}
}

// smSet is a set of actions (close a hold's channel, cancel a wait's
// context) that the driver runs, one at random or all. An action must not
// block: it runs with the set's mutex held.
type smSet struct {
	mu   sync.Mutex
	next int
	open map[int]func()
	all  bool // every action runs at once from now on, as soon as it is added
}

// add adds f; the id it returns removes it.
func (s *smSet) add(f func()) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.all {
		f()
		return 0
	}
	if s.open == nil {
		s.open = make(map[int]func())
	}
	s.next++
	s.open[s.next] = f
	return s.next
}

func (s *smSet) remove(id int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.open, id)
}

// runRandom runs (and removes) one action chosen by rng; it reports whether
// there was one.
func (s *smSet) runRandom(rng *rand.Rand) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.open) == 0 {
		return false
	}
	ids := make([]int, 0, len(s.open))
	for id := range s.open {
		ids = append(ids, id)
	}
	slices.Sort(ids) // map order is not the seed's
	id := ids[rng.IntN(len(ids))]
	s.open[id]()
	delete(s.open, id)
	return true
}

// runAll runs (and removes) every action, and, if all, every one added
// later at once.
func (s *smSet) runAll(all bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, f := range s.open {
		f()
		delete(s.open, id)
	}
	s.all = all
}

func (m *smModel) failf(format string, args ...any) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.bad = append(m.bad, fmt.Sprintf(format, args...))
}

// burst runs random operations on the Locker for about d, with the driver
// acting at random and a sampler checking invariant 1 all along. Unless
// closeMid, it then stops the operations and waits for them; with closeMid
// it closes the Locker while they run, and checks that they end.
func (m *smModel) burst(d time.Duration, closeMid bool) {
	t := m.t
	m.stop.Store(false)
	m.holds.runAll(false)
	m.waits.runAll(false)
	burstCtx, cancelBurst := context.WithCancel(context.Background())
	defer cancelBurst()

	sampleStop := make(chan struct{})
	var sw sync.WaitGroup
	sw.Go(func() { m.sample(sampleStop) })

	var ww sync.WaitGroup
	const workers = 6
	for w := range workers {
		wrng := rand.New(rand.NewPCG(m.rng.Uint64(), uint64(w)))
		ww.Go(func() { m.worker(burstCtx, wrng) })
	}

	// The driver: the test's own actions, at random.
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) && !t.Failed() {
		switch x := m.rng.IntN(100); {
		case x < 35:
			m.holds.runRandom(m.rng)
		case x < 50:
			m.toggleOutsider()
		case x < 60:
			if m.waits.runRandom(m.rng) {
				atomic.AddInt64(&m.cov.cancels, 1)
			}
		case x < 68:
			m.toggleLeader(burstCtx)
		case x < 71:
			m.kill()
		}
		time.Sleep(time.Duration(1+m.rng.IntN(12)) * time.Millisecond) // the model's clock: the pace of its actions
	}

	if closeMid {
		m.closeAndCheck(true)
		close(sampleStop)
		sw.Wait()
		// The operations end on their own: Close ends every hold and wait.
		if !smWait(&ww, smHang) {
			t.Errorf("INVARIANT close-ends-operations: operations still running %v after Close returned:\n%s", smHang, smStacks())
			cancelBurst()
			m.holds.runAll(true)
			smWait(&ww, smHang)
		}
		m.stopLeaders()
		m.checkClosedStats("once every operation had ended")
		m.report()
		m.judgeAfterClose()
		return
	}
	// Stop: no new operation, every hold let go, every wait cancelled,
	// Leaders stopped.
	m.stop.Store(true)
	m.holds.runAll(true)
	m.waits.runAll(true)
	m.stopLeaders()
	if !smWait(&ww, smHang) {
		t.Errorf("operations still running %v after they were told to stop:\n%s", smHang, smStacks())
		cancelBurst()
		smWait(&ww, smHang)
	}
	close(sampleStop)
	sw.Wait()
	m.report()
}

// report turns what goroutines recorded into test errors.
func (m *smModel) report() {
	m.mu.Lock()
	bad := m.bad
	m.bad = nil
	m.mu.Unlock()
	for i, b := range bad {
		if i == 10 {
			m.t.Errorf("... and %d more", len(bad)-10)
			break
		}
		m.t.Error(b)
	}
}

// smWait waits for wg up to d; it reports whether wg was done.
func smWait(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// smStacks returns the stacks of the goroutines that run pglock code.
func smStacks() string {
	buf := make([]byte, 1<<22)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "pglock") && !strings.Contains(g, "smStacks") {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}

// sample checks invariant 1 until stop is closed.
func (m *smModel) sample(stop <-chan struct{}) {
	ctx := context.Background()
	tick := time.NewTicker(3 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		l1 := m.runningLeaders.Load()
		s1 := m.lk.Stats()
		ss, err := smServer(ctx, m.env.watch, m.names, m.pids)
		if err != nil {
			m.failf("sample: read the server: %v", err)
			return
		}
		s2 := m.lk.Stats()
		l2 := m.runningLeaders.Load()
		budget := m.budget + int(max(l1, l2))
		atomic.AddInt64(&m.cov.samples, 1)
		// A session the driver has told the server to end (kill) is not
		// counted while it exits: the Locker may open its replacement
		// before it is gone (the defect TestSessionsModelLossReplacedBeforeEnded
		// shows), which is counted apart.
		if n := len(ss); n > budget {
			ss = slices.DeleteFunc(ss, func(s smSession) bool { _, k := m.killed.Load(s.pid); return k })
			if len(ss) < n && len(ss) <= budget {
				atomic.AddInt64(&m.cov.killedOverlap, 1)
			}
		}
		for {
			cur := atomic.LoadInt64(&m.cov.maxServer)
			if int64(len(ss)) <= cur || atomic.CompareAndSwapInt64(&m.cov.maxServer, cur, int64(len(ss))) {
				break
			}
		}
		if s1.HoldingConns > 0 || s2.HoldingConns > 0 {
			atomic.AddInt64(&m.cov.holdingSeen, 1)
		}
		if s1.WaitingConns > 0 || s2.WaitingConns > 0 {
			atomic.AddInt64(&m.cov.waitingSeen, 1)
		}
		if len(ss) > budget {
			m.failf("INVARIANT session-budget: %d of the Locker's sessions in pg_stat_activity, budget %d (WithLockConns + WithWaitConns = %d, running Leaders %d..%d); Stats before %+v, after %+v; sessions: %v",
				len(ss), budget, m.budget, l1, l2, s1, s2, ss)
		}
		for _, s := range []pglock.LockerStats{s1, s2} {
			if s.Sessions > s.MaxSessions || s.MaxSessions > budget {
				m.failf("INVARIANT stats-budget: Stats %+v: Sessions above MaxSessions, or MaxSessions above the budget %d", s, budget)
			}
			if msg := smRoles(s); msg != "" {
				m.failf("INVARIANT stats-roles: %s", msg)
			}
		}
	}
}

// smRoles says how s's role counts fail to add up ("" when they do).
func smRoles(s pglock.LockerStats) string {
	if s.WaitingConns+s.HoldingConns+s.IdleConns+s.LeaderConns != s.WaitConns || s.LockConns+s.WaitConns != s.Sessions {
		return fmt.Sprintf("Stats %+v: WaitingConns+HoldingConns+IdleConns+LeaderConns != WaitConns, or LockConns+WaitConns != Sessions", s)
	}
	return ""
}

// worker runs random operations until told to stop or the Locker is closed.
func (m *smModel) worker(burstCtx context.Context, rng *rand.Rand) {
	for !m.stop.Load() {
		key := m.keys[rng.IntN(len(m.keys))]
		var opts []pglock.Option
		mode := "exclusive"
		if rng.IntN(3) == 0 {
			opts, mode = append(opts, pglock.WithMode(pglock.Shared)), "shared"
		}
		ctx, cancel := context.WithTimeout(burstCtx, time.Duration(20+rng.IntN(800))*time.Millisecond)
		if m.pinned[key] {
			ctx, cancel = context.WithCancel(burstCtx)
		}
		wid := m.waits.add(cancel)
		hold := func(lost <-chan struct{}) {
			m.waits.remove(wid)
			rel := make(chan struct{})
			hid := m.holds.add(func() { close(rel) })
			select {
			case <-rel:
			case <-lost:
			}
			m.holds.remove(hid)
		}
		fn := func(ctx context.Context) error {
			hold(ctx.Done())
			return nil
		}
		var op string
		var err, rerr error
		got := false
		switch kind := rng.IntN(5); kind {
		case 0:
			op = "Locker.Do"
			ran := false
			err = m.lk.Do(ctx, key, func(ctx context.Context) error { ran = true; return fn(ctx) })
			got = ran
		case 1:
			op = "Locker.TryDo"
			got, err = m.lk.TryDo(ctx, key, fn)
		case 2, 3:
			op = "Lock.Acquire " + mode
			if kind == 3 {
				op = "Lock.TryAcquire " + mode
			}
			var l *pglock.Lock
			l, err = m.lk.NewLock(key, opts...)
			if err != nil {
				break
			}
			if kind == 2 {
				err = l.Acquire(ctx)
				got = err == nil
			} else {
				got, err = l.TryAcquire(ctx)
			}
			if got {
				hold(l.Lost())
				rerr = l.Release(context.Background())
			}
		case 4:
			op = "Lock.Do " + mode
			var l *pglock.Lock
			l, err = m.lk.NewLock(key, opts...)
			if err != nil {
				break
			}
			ran := false
			err = l.Do(ctx, func(ctx context.Context) error { ran = true; return fn(ctx) })
			got = ran
		}
		m.waits.remove(wid)
		ctxErr := ctx.Err()
		cancel()
		m.judge(op, got, err, rerr, ctxErr)
		if errors.Is(err, pglock.ErrLockerClosed) {
			return
		}
	}
}

// judge checks an operation's outcome: while the Locker is open, an error
// must say what happened (not acquired, lost, unavailable, the context);
// once Close has begun, it is judged after Close (judgeAfterClose).
func (m *smModel) judge(op string, got bool, err, rerr error, ctxErr error) {
	switch {
	case got:
		atomic.AddInt64(&m.cov.held, 1)
	case err == nil:
		atomic.AddInt64(&m.cov.busy, 1)
	}
	for _, e := range []error{err, rerr} {
		switch {
		case e == nil:
		case errors.Is(e, pglock.ErrLockLost):
			atomic.AddInt64(&m.cov.lost, 1)
		case errors.Is(e, pglock.ErrUnavailable):
			atomic.AddInt64(&m.cov.unavailable, 1)
		case errors.Is(e, pglock.ErrNotAcquired):
			atomic.AddInt64(&m.cov.notAcquired, 1)
		}
	}
	if m.closing.Load() {
		m.mu.Lock()
		m.afterErr = append(m.afterErr, smEnded{op, err, rerr, ctxErr})
		m.mu.Unlock()
		return
	}
	expected := func(e error) bool {
		return e == nil || errors.Is(e, pglock.ErrNotAcquired) || errors.Is(e, pglock.ErrLockLost) ||
			errors.Is(e, pglock.ErrUnavailable) || errors.Is(e, context.Canceled) || errors.Is(e, context.DeadlineExceeded)
	}
	if !expected(err) || !expected(rerr) {
		m.failf("%s: unexpected error %v (release: %v; context: %v)", op, err, rerr, ctxErr)
	}
	if err != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)) && ctxErr == nil {
		m.failf("%s: a context error %v, but its context has not ended", op, err)
	}
}

// smEnded is an operation that ended after Close began: its error, its
// release's, and its context's.
type smEnded struct {
	op                string
	err, rerr, ctxErr error
}

// wrong says what is wrong with e ("" when nothing is): an acquire ends with
// ErrLockerClosed or its own context's error (or succeeded before Close took
// effect); a hold that Close ended is lost (ErrLockLost, from Do or
// Release).
func (e smEnded) wrong() string {
	ok := func(err error) bool {
		return err == nil || errors.Is(err, pglock.ErrLockerClosed) || errors.Is(err, pglock.ErrLockLost) ||
			(e.ctxErr != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)))
	}
	if ok(e.err) && ok(e.rerr) {
		return ""
	}
	return fmt.Sprintf("%s ended after Close began with %v (release: %v; its context: %v): want ErrLockerClosed, its context's error, or ErrLockLost for a hold",
		e.op, e.err, e.rerr, e.ctxErr)
}

// class names e's outcome for the log.
func (e smEnded) class() string {
	var out []string
	for _, err := range []error{e.err, e.rerr} {
		switch {
		case err == nil:
			out = append(out, "nil")
		case errors.Is(err, pglock.ErrLockerClosed) && errors.Is(err, pglock.ErrLockLost):
			out = append(out, "closed+lost")
		case errors.Is(err, pglock.ErrLockerClosed):
			out = append(out, "closed")
		case errors.Is(err, pglock.ErrLockLost):
			out = append(out, "lost")
		case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
			out = append(out, "context")
		default:
			out = append(out, "other")
		}
	}
	return strings.Join(out, "/")
}

// judgeAfterClose reports the operations that ended after Close began with
// an error that says neither.
func (m *smModel) judgeAfterClose() {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	classes := make(map[string]int)
	for _, e := range m.afterErr {
		classes[e.class()]++
		if w := e.wrong(); w != "" {
			if n < 10 {
				m.t.Errorf("INVARIANT close-errors: %s", w)
			}
			n++
		}
	}
	m.t.Logf("%d operations ended after Close began (error/release error: %v), %d with an unexpected error", len(m.afterErr), classes, n)
	m.afterErr = nil
}

// toggleOutsider takes a random key from another session (without
// waiting), or lets one of those it holds go.
func (m *smModel) toggleOutsider() {
	if len(m.outside) > 0 && m.rng.IntN(2) == 0 {
		i := m.rng.IntN(len(m.outside))
		l := m.outside[i]
		m.outside = slices.Delete(m.outside, i, i+1)
		if err := l.Release(context.Background()); err != nil {
			m.t.Errorf("the other session's Release: %v", err)
		}
		return
	}
	if len(m.outside) >= 4 {
		return
	}
	// The pinned keys half the time: a pinned wait stays in the server's
	// queue until the driver acts, where kill finds it.
	all := slices.Concat(m.keys, m.leaderKeys)
	key := all[m.rng.IntN(len(all))]
	if m.rng.IntN(2) == 0 {
		key = m.keys[2+m.rng.IntN(2)]
	}
	var opts []pglock.Option
	if m.rng.IntN(4) == 0 {
		opts = append(opts, pglock.WithMode(pglock.Shared))
	}
	l, err := pglock.NewLock(m.env.other, key, opts...)
	if err != nil {
		m.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ok, err := l.TryAcquire(ctx)
	if err != nil {
		m.t.Errorf("the other session's TryAcquire: %v", err)
	}
	if ok {
		m.outside = append(m.outside, l)
	}
}

// releaseOutsider lets go of every key the other session holds.
func (m *smModel) releaseOutsider() {
	for _, l := range m.outside {
		if err := l.Release(context.Background()); err != nil {
			m.t.Errorf("the other session's Release: %v", err)
		}
	}
	m.outside = nil
}

// toggleLeader starts a Leader that does not run, or stops one that does
// once it is settled (see leaderSettled).
func (m *smModel) toggleLeader(ctx context.Context) {
	ld := m.leaders[m.rng.IntN(len(m.leaders))]
	if ld.done != nil {
		if m.leaderSettled(ld) {
			m.stopLeader(ld)
		}
		return
	}
	if m.closing.Load() {
		return
	}
	rctx, cancel := context.WithCancel(ctx)
	ld.cancel, ld.done = cancel, make(chan struct{})
	m.runningLeaders.Add(1)
	go func() {
		defer close(ld.done)
		defer m.runningLeaders.Add(-1)
		err := ld.ld.Run(rctx, func(ctx context.Context) error {
			atomic.AddInt64(&m.cov.terms, 1)
			<-ctx.Done()
			return nil
		})
		switch {
		case errors.Is(err, context.Canceled) && rctx.Err() != nil:
		case errors.Is(err, pglock.ErrLockerClosed) && m.closing.Load():
		default:
			m.failf("Leader.Run returned %v (closing %v)", err, m.closing.Load())
		}
	}()
}

// stopLeader stops ld's Run and waits for it to return.
func (m *smModel) stopLeader(ld *smLeader) {
	if ld.done == nil {
		return
	}
	ld.cancel()
	t := time.NewTimer(smHang)
	defer t.Stop()
	select {
	case <-ld.done:
	case <-t.C:
		m.t.Errorf("Leader.Run still running %v after its context was cancelled:\n%s", smHang, smStacks())
		<-ld.done
	}
	ld.cancel, ld.done = nil, nil
}

// stopLeaders stops the Leaders that run: while the Locker is open, each
// once it is settled (see leaderSettled), within smQuiet.
func (m *smModel) stopLeaders() {
	for _, ld := range m.leaders {
		for start := time.Now(); !m.closing.Load() && !m.leaderSettled(ld); {
			if time.Since(start) > smQuiet {
				m.t.Errorf("the Leader %s has run %v with no session of its own (campaigning or leading) on the server", ld.identity, smQuiet)
				break
			}
			time.Sleep(5 * time.Millisecond) // polling a condition
		}
		m.stopLeader(ld)
	}
}

// leaderSettled reports whether ld does not run, or its Run has returned,
// or a session named by its identity is on the server: its campaign's
// connect is done (it campaigns or leads). A Leader stopped while its
// campaign connects leaves a session on the server after Run returns (the
// defect TestSessionsModelStoppedLeaderConnect shows), so the model stops a
// Leader only once it is settled.
func (m *smModel) leaderSettled(ld *smLeader) bool {
	if ld.done == nil {
		return true
	}
	select {
	case <-ld.done:
		return true
	default:
	}
	var n int
	if err := m.env.watch.QueryRow(context.Background(),
		`SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE backend_type = 'client backend' AND application_name = $1`, ld.identity).Scan(&n); err != nil {
		m.t.Fatalf("read the server: %v", err)
	}
	return n > 0
}

// kill ends, on the server, a random session of the Locker's that the
// Locker must notice: a Leader's (campaigning or leading), or one that holds
// or waits for a pinned key. Whatever such a session holds or waits for ends
// only by the driver's actions (or Close), which do not run meanwhile, so
// the session is in use or watched when it ends. An idle session that holds
// nothing goes unnoticed: see TestSessionsModelIdleSessionEnded.
func (m *smModel) kill() {
	ctx := context.Background()
	rows, err := m.env.watch.Query(ctx, `
		SELECT a.pid, a.application_name = ANY($2), coalesce(bool_or(l.granted), false), coalesce(bool_or(NOT l.granted), false)
		FROM pg_catalog.pg_stat_activity a
		LEFT JOIN pg_catalog.pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory' AND (l.classid::text || '/' || l.objid::text) = ANY($3)
		WHERE a.backend_type = 'client backend' AND a.application_name = ANY($1)
		GROUP BY a.pid, a.application_name ORDER BY a.pid`, m.names, m.identities, m.tags)
	if err != nil {
		m.t.Errorf("kill: read the server: %v", err)
		return
	}
	type target struct {
		pid                      int32
		leader, holding, waiting bool
	}
	all, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (target, error) {
		var c target
		err := r.Scan(&c.pid, &c.leader, &c.holding, &c.waiting)
		return c, err
	})
	if err != nil {
		m.t.Errorf("kill: read the server: %v", err)
		return
	}
	var cs []target // the sessions that may be ended
	for _, c := range all {
		if _, pool := m.pids.Load(uint32(c.pid)); !pool && (c.leader || c.holding || c.waiting) {
			cs = append(cs, c)
		}
	}
	// A kind first (a Leader's, one waiting, one holding), among those
	// there are, then a session of that kind: waits are fewer than holds.
	kinds := make(map[int][]target)
	for _, c := range cs {
		k := 2
		switch {
		case c.leader:
			k = 0
		case c.waiting:
			k = 1
		}
		kinds[k] = append(kinds[k], c)
	}
	var avail []int
	for k := range 3 {
		if len(kinds[k]) > 0 {
			avail = append(avail, k)
		}
	}
	if len(avail) == 0 {
		return
	}
	of := kinds[avail[m.rng.IntN(len(avail))]]
	c := of[m.rng.IntN(len(of))]
	// Checked again in the statement that ends it.
	m.killed.Store(uint32(c.pid), true)
	var ok bool
	err = m.env.watch.QueryRow(ctx, `
		SELECT pg_catalog.pg_terminate_backend(a.pid, 5000) FROM pg_catalog.pg_stat_activity a
		WHERE a.pid = $1 AND (a.application_name = ANY($2) OR EXISTS (SELECT FROM pg_catalog.pg_locks l
			WHERE l.pid = a.pid AND l.locktype = 'advisory' AND (l.classid::text || '/' || l.objid::text) = ANY($3)))`,
		c.pid, m.identities, m.tags).Scan(&ok)
	switch {
	case errors.Is(err, pgx.ErrNoRows), err == nil && !ok:
		m.killed.Delete(uint32(c.pid)) // not ended: counted again
		return
	case err != nil:
		m.t.Errorf("pg_terminate_backend(%d): %v", c.pid, err)
		return
	}
	atomic.AddInt64(&m.cov.kills, 1)
	switch {
	case c.leader:
		atomic.AddInt64(&m.cov.killedLeader, 1)
	case c.waiting:
		atomic.AddInt64(&m.cov.killedWaiting, 1)
	default:
		atomic.AddInt64(&m.cov.killedHolding, 1)
	}
}

// quiescent checks invariant 2: no operation is in flight; Stats must come
// to agree with the server within smQuiet.
func (m *smModel) quiescent(when string) {
	ctx := context.Background()
	start := time.Now()
	var s pglock.LockerStats
	var ss []smSession
	var why string
	for {
		var err error
		s = m.lk.Stats()
		ss, err = smServer(ctx, m.env.watch, m.names, m.pids)
		if err != nil {
			m.t.Fatalf("read the server: %v", err)
		}
		why = smRoles(s)
		switch {
		case why != "":
		case s.Sessions != len(ss):
			why = fmt.Sprintf("Stats().Sessions %d, %d sessions in pg_stat_activity", s.Sessions, len(ss))
		case s.WaitingConns+s.HoldingConns+s.LeaderConns != 0 || s.HeldKeys+s.Queued+s.ServerLocks != 0:
			why = "Stats counts waits, holds or Leaders"
		case smLocks(ss) != 0:
			why = fmt.Sprintf("%d advisory locks of the Locker's sessions on the server", smLocks(ss))
		case s.MaxSessions != m.budget:
			why = fmt.Sprintf("MaxSessions %d, want %d", s.MaxSessions, m.budget)
		}
		if why == "" || time.Since(start) > smQuiet {
			break
		}
		time.Sleep(10 * time.Millisecond) // polling a condition
	}
	if why != "" {
		m.t.Errorf("INVARIANT quiescent-stats (%s, %v after the operations ended, the Locker made %v ago): %s; Stats %+v; sessions on the server: %v",
			when, smQuiet, time.Since(m.born).Round(time.Millisecond), why, s, ss)
		return
	}
	if took := time.Since(start); took > 50*time.Millisecond {
		m.t.Logf("%s: Stats agreed with the server after %v: %+v", when, took.Round(time.Millisecond), s)
	}
}

// closeAndCheck closes the Locker and checks invariant 3's server side at
// once: when Close returns, none of its sessions, nor their locks, is on the
// server. With ops, operations may still be running.
func (m *smModel) closeAndCheck(ops bool) {
	t := m.t
	if ops {
		atomic.AddInt64(&m.cov.midCloses, 1)
	}
	m.closing.Store(true)
	start := time.Now()
	if err := m.lk.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	took := time.Since(start)
	ss, err := smServer(context.Background(), m.env.watch, m.names, m.pids)
	if err != nil {
		t.Fatalf("read the server: %v", err)
	}
	s := m.lk.Stats()
	t.Logf("Close (operations running: %v) took %v; just after: %d sessions, Stats %+v", ops, took.Round(time.Millisecond), len(ss), s)
	if len(ss) != 0 {
		t.Errorf("INVARIANT close-ends-sessions: just after Close returned, %d of the Locker's sessions on the server, %d advisory locks of theirs: %v",
			len(ss), smLocks(ss), ss)
	}
	// Whatever their names: no session but the other pool's holds or
	// waits for a key of the round.
	var n int
	if err := m.env.watch.QueryRow(context.Background(), `
		SELECT count(*) FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
		WHERE l.locktype = 'advisory' AND (l.classid::text || '/' || l.objid::text) = ANY($1)
		  AND coalesce(a.application_name, '') <> $2`, m.allTags, m.env.otherApp+"/pool").Scan(&n); err != nil {
		t.Fatalf("read pg_locks: %v", err)
	}
	if n != 0 {
		t.Errorf("INVARIANT close-ends-sessions: just after Close returned, %d advisory locks of the round's keys held or awaited by sessions other than the other pool's", n)
	}
	if took > smHang {
		t.Errorf("Close took %v", took)
	}
	m.checkClosedStats("just after Close returned")
	if !ops {
		m.stopLeaders()
		m.report()
	}
}

// checkClosedStats checks that a closed Locker's Stats count nothing.
func (m *smModel) checkClosedStats(when string) {
	s := m.lk.Stats()
	want := pglock.LockerStats{MaxSessions: m.budget, MaxLocks: s.MaxLocks}
	if s != want {
		m.t.Errorf("INVARIANT closed-stats: %s, Stats %+v, want %+v", when, s, want)
	}
}

// TestSessionsModelIdleSessionEnded shows that a multiplexing Locker's
// Stats keep counting a session that the server has ended while it was idle
// and held nothing, for as long as it is not used again: such a session is
// not watched (a watch runs only while a connection holds locks), so the
// Locker learns of its end only at its next use. Stats().Sessions is then
// above what pg_stat_activity shows, against LockerStats' "Sessions is
// every server session the Locker has open now". Two ways to get there:
// pg_terminate_backend of an idle lock connection and of an idle waiting
// connection, and the Locker's own idle_session_timeout
// (AbandonedSessionTimeout, which the Locker sets on its sessions), which
// ends every session left idle that long, with no one acting at all.
func TestSessionsModelIdleSessionEnded(t *testing.T) {
	env := smNewEnv(t)
	bg := context.Background()
	// smIdle makes a Locker with one lock connection open and idle, and
	// (wait) one idle waiting connection, both holding nothing.
	smIdle := func(t *testing.T, wait bool) (*pglock.Locker, []string, *sync.Map) {
		app := fmt.Sprintf("sm-idle-%d-%s", os.Getpid(), randomSuffix())
		var pids sync.Map
		pool := smPool(t, env.url, app, 2, &pids, nil)
		lk, err := pglock.NewLocker(pool, pglock.WithLockConns(1), pglock.WithWaitConns(1))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = lk.Close() })
		if ok, err := lk.TryDo(bg, pgtest.UniqueKey(t), func(context.Context) error { return nil }); !ok || err != nil {
			t.Fatalf("TryDo: %v %v", ok, err)
		}
		if wait {
			// A key another session holds: the Locker waits for it on a
			// waiting connection, which is kept idle after the release.
			key := pgtest.UniqueKey(t)
			ol, err := pglock.NewLock(env.other, key)
			if err != nil {
				t.Fatal(err)
			}
			if err := ol.Acquire(bg); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- lk.Do(bg, key, func(context.Context) error { return nil }) }()
			for lk.Stats().WaitingConns == 0 {
				time.Sleep(time.Millisecond) // polling a condition
			}
			if err := ol.Release(bg); err != nil {
				t.Fatal(err)
			}
			if err := <-done; err != nil {
				t.Fatalf("Do: %v", err)
			}
		}
		names := []string{app}
		want := 1 + map[bool]int{true: 1}[wait]
		deadline := time.Now().Add(smQuiet)
		for {
			s := lk.Stats()
			ss, err := smServer(bg, env.watch, names, &pids)
			if err != nil {
				t.Fatal(err)
			}
			if s.Sessions == want && len(ss) == want && s.IdleConns == want-1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("setup: Stats %+v, sessions on the server %v, want %d idle", s, ss, want)
			}
			time.Sleep(10 * time.Millisecond) // polling a condition
		}
		return lk, names, &pids
	}
	// smAgrees polls, up to smQuiet, until Stats().Sessions is the number
	// of the Locker's sessions on the server; it fails the test otherwise.
	smAgrees := func(t *testing.T, lk *pglock.Locker, names []string, pids *sync.Map, what string) {
		start := time.Now()
		for {
			s := lk.Stats()
			ss, err := smServer(bg, env.watch, names, pids)
			if err != nil {
				t.Fatal(err)
			}
			if s.Sessions == len(ss) {
				return
			}
			if time.Since(start) > smQuiet {
				t.Fatalf("INVARIANT quiescent-stats: %s, %v later (nothing else running): Stats().Sessions %d (LockConns %d, IdleConns %d), %d sessions in pg_stat_activity",
					what, smQuiet, s.Sessions, s.LockConns, s.IdleConns, len(ss))
			}
			time.Sleep(10 * time.Millisecond) // polling a condition
		}
	}

	t.Run("terminated", func(t *testing.T) {
		lk, names, pids := smIdle(t, true)
		ss, err := smServer(bg, env.watch, names, pids)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range ss {
			var ok bool
			if err := env.watch.QueryRow(bg, "SELECT pg_catalog.pg_terminate_backend($1, 5000)", int32(s.pid)).Scan(&ok); err != nil || !ok {
				t.Fatalf("pg_terminate_backend(%d): %v %v", s.pid, ok, err)
			}
		}
		smAgrees(t, lk, names, pids, fmt.Sprintf("pg_terminate_backend of the Locker's %d idle sessions (a lock connection, a waiting connection), holding nothing", len(ss)))
	})

	t.Run("idle_session_timeout", func(t *testing.T) {
		lk, names, pids := smIdle(t, false)
		// The server ends the idle session after the Locker's own
		// idle_session_timeout.
		start := time.Now()
		for {
			ss, err := smServer(bg, env.watch, names, pids)
			if err != nil {
				t.Fatal(err)
			}
			if len(ss) == 0 {
				break
			}
			if time.Since(start) > pglock.AbandonedSessionTimeout+smQuiet {
				t.Fatalf("the server has not ended the idle session %v after idle_session_timeout (%v)", ss, pglock.AbandonedSessionTimeout)
			}
			time.Sleep(50 * time.Millisecond) // polling a condition
		}
		smAgrees(t, lk, names, pids, fmt.Sprintf("the server ended the Locker's idle lock connection (idle_session_timeout, %v) after %v",
			pglock.AbandonedSessionTimeout, time.Since(start).Round(100*time.Millisecond)))
	})
}

// TestSessionsModelLossReplacedBeforeEnded shows that a multiplexing Locker
// may open the replacement of a session that the server ended (here
// pg_terminate_backend) before the server has finished ending it, so that
// for that moment the server has WithLockConns + WithWaitConns + 1 of the
// Locker's sessions, against doc.go's budget ("a default Locker uses at
// most 6 server sessions") and DESIGN's "the number of server sessions is
// a documented function of the options, never exceeded". The server sends
// its FATAL message before its backend exits (releasing its locks, then
// leaving pg_stat_activity); pgx closes the connection on reading it, and
// the Locker counts the session out at once (lockconn's Conn.lose:
// sessionEndedWith(CleanupDone), which pgx has already closed), gives its
// waiting place back (PutWaitConn) or its lock slot (Group.Slot makes a new
// connection for a dead one), and the next wait or try opens a new session.
// EndSession, which waits for the server, runs only for a close the Locker
// chose. TestSessionsModel hit it with no help (a waiting connection ended
// while it waited, on a loaded 2-core machine under -race):
// "INVARIANT session-budget: 7 of the Locker's sessions in pg_stat_activity,
// budget 6 (WithLockConns + WithWaitConns = 6, running Leaders 0..0)", the
// ended session shown still "active" in its pg_advisory_lock and the new
// one with no query yet. Here the pool's configuration gives the Locker's
// sessions temporary tables (a pgconn AfterConnect, which the Locker's own
// sessions run, as they are made from the pool's configuration), which a
// backend drops as it exits, before it leaves pg_stat_activity: that
// widens the same window to about 100 ms, so that it is seen every time.
func TestSessionsModelLossReplacedBeforeEnded(t *testing.T) {
	env := smNewEnv(t)
	bg := context.Background()
	for _, lockConn := range []bool{false, true} {
		name := map[bool]string{false: "waiting_connection", true: "lock_connection"}[lockConn]
		t.Run(name, func(t *testing.T) {
			app := fmt.Sprintf("sm-loss-%d-%s", os.Getpid(), randomSuffix())
			var pids sync.Map
			pool := smPool(t, env.url, app, 2, &pids, func(cfg *pgxpool.Config) {
				cfg.ConnConfig.AfterConnect = func(ctx context.Context, pc *pgconn.PgConn) error {
					if pc.ParameterStatus("application_name") != app {
						return nil // the pool's own connections
					}
					var q strings.Builder
					for i := range 300 {
						fmt.Fprintf(&q, "CREATE TEMPORARY TABLE sm_slow_exit_%d (); ", i)
					}
					return pc.Exec(ctx, q.String()).Close()
				}
			})
			lk, err := pglock.NewLocker(pool, pglock.WithLockConns(1), pglock.WithWaitConns(1))
			if err != nil {
				t.Fatal(err)
			}
			defer lk.Close()
			const budget = 2
			names := []string{app}
			// smOther holds key in the other session until the test ends.
			smOther := func(key string) *pglock.Lock {
				ol, err := pglock.NewLock(env.other, key)
				if err != nil {
					t.Fatal(err)
				}
				if err := ol.Acquire(bg); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = ol.Release(bg) })
				return ol
			}
			// smVictim waits until one of the Locker's sessions holds
			// (granted) or waits for key, and returns its PID.
			smVictim := func(key string, granted bool) uint32 {
				k, err := pglock.KeyOf(key)
				if err != nil {
					t.Fatal(err)
				}
				deadline := time.Now().Add(smQuiet)
				for {
					for _, h := range pgtest.Granted(t, env.watch, k) {
						if _, pool := pids.Load(uint32(h.PID)); granted && !pool {
							return uint32(h.PID)
						}
					}
					if !granted {
						hs, err := pgtest.Holders(bg, env.watch, k)
						if err != nil {
							t.Fatal(err)
						}
						for _, h := range hs {
							if !h.Granted {
								return uint32(h.PID)
							}
						}
					}
					if time.Now().After(deadline) {
						t.Fatalf("no session of the Locker's holds or waits for %s: Stats %+v", key, lk.Stats())
					}
					time.Sleep(5 * time.Millisecond) // polling a condition
				}
			}
			ctx, cancel := context.WithCancel(bg)
			defer cancel()
			var gw sync.WaitGroup
			defer gw.Wait()
			defer cancel()
			var victim uint32
			if lockConn {
				// The budget full: the lock connection holds a key, and an
				// idle waiting connection is kept. The victim is the lock
				// connection; tries on new keys, all along, replace it.
				w := pgtest.UniqueKey(t)
				ol := smOther(w)
				done := make(chan error, 1)
				go func() { done <- lk.Do(bg, w, func(context.Context) error { return nil }) }()
				smVictim(w, false)
				if err := ol.Release(bg); err != nil {
					t.Fatal(err)
				}
				if err := <-done; err != nil {
					t.Fatal(err)
				}
				h := pgtest.UniqueKey(t)
				l, err := lk.NewLock(h)
				if err != nil {
					t.Fatal(err)
				}
				if ok, err := l.TryAcquire(bg); !ok || err != nil {
					t.Fatalf("TryAcquire: %v %v", ok, err)
				}
				defer l.Release(bg)
				victim = smVictim(h, true)
				gw.Go(func() {
					for i := 0; ctx.Err() == nil; i++ {
						_, _ = lk.TryDo(ctx, fmt.Sprintf("%s-%d", h, i), func(context.Context) error { return nil })
					}
				})
			} else {
				// The budget full: one wait on the waiting connection, the
				// lock connection open, and a second wait, for another key,
				// that waits for a waiting place. The victim is the first
				// wait's session; the second wait takes its place.
				a, b := pgtest.UniqueKey(t), pgtest.UniqueKey(t)
				smOther(a)
				smOther(b)
				gw.Go(func() { _ = lk.Do(ctx, a, func(context.Context) error { return nil }) })
				victim = smVictim(a, false)
				gw.Go(func() { _ = lk.Do(ctx, b, func(context.Context) error { return nil }) })
				for lk.Stats().LockConns == 0 { // the second wait's first try
					time.Sleep(time.Millisecond) // polling a condition
				}
			}
			// Sample the server while the victim ends, until it is gone.
			var over []string
			stop := make(chan struct{})
			var sw sync.WaitGroup
			sw.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					ss, err := smServer(bg, env.watch, names, &pids)
					if err != nil {
						t.Error(err)
						return
					}
					if len(ss) > budget {
						over = append(over, fmt.Sprintf("%d sessions: %v; Stats %+v", len(ss), ss, lk.Stats()))
					}
				}
			})
			if _, err := env.watch.Exec(bg, "SELECT pg_catalog.pg_terminate_backend($1)", int32(victim)); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			for {
				ss, err := smServer(bg, env.watch, names, &pids)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.ContainsFunc(ss, func(s smSession) bool { return s.pid == victim }) {
					break
				}
				if time.Since(start) > smQuiet {
					t.Fatalf("session %d still on the server %v after pg_terminate_backend", victim, smQuiet)
				}
			}
			gone := time.Since(start)
			close(stop)
			sw.Wait()
			if len(over) > 0 {
				t.Errorf("INVARIANT session-budget: while the server ended the %s %d (gone after %v), %d samples showed more of the Locker's sessions than WithLockConns + WithWaitConns = %d; the first: %s",
					strings.ReplaceAll(name, "_", " "), victim, gone.Round(time.Millisecond), len(over), budget, over[0])
			}
		})
	}
}

// TestSessionsModelStoppedLeaderConnect shows that a Leader's campaign
// connection that is still connecting when its Run is stopped outlives Run:
// Run returns at once ("a Run that is only campaigning returns at once"),
// while the connect goes on in the background (lockconn's Conn.dial: a
// connect is the Locker's, not the request's) and its session is ended only
// once it is made. Meanwhile the server has WithLockConns + WithWaitConns +
// 1 of the Locker's sessions with no Leader running, against doc.go's
// budget ("plus one per running Leader"; LockerStats: MaxSessions is
// WithLockConns + WithWaitConns + LeaderConns). TestSessionsModel hit it
// with no help (Leaders started and stopped at random):
// "INVARIANT session-budget: 4 of the Locker's sessions in
// pg_stat_activity, budget 3 (WithLockConns + WithWaitConns = 3, running
// Leaders 0..0)", the extra session with no query yet. Here the pool's
// configuration makes the Locker's connects slow (a pgconn AfterConnect
// with pg_sleep, which the Locker's own sessions run) so that Run is
// stopped while its campaign connects, every time.
func TestSessionsModelStoppedLeaderConnect(t *testing.T) {
	env := smNewEnv(t)
	bg := context.Background()
	app := fmt.Sprintf("sm-ldc-%d-%s", os.Getpid(), randomSuffix())
	var pids sync.Map
	pool := smPool(t, env.url, app, 2, &pids, func(cfg *pgxpool.Config) {
		cfg.ConnConfig.AfterConnect = func(ctx context.Context, pc *pgconn.PgConn) error {
			if pc.ParameterStatus("application_name") != app {
				return nil // the pool's own connections
			}
			return pc.Exec(ctx, "SELECT pg_catalog.pg_sleep(0.5)").Close()
		}
	})
	lk, err := pglock.NewLocker(pool, pglock.WithLockConns(1), pglock.WithWaitConns(1))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	const budget = 2 // WithLockConns + WithWaitConns, no Leader running
	identity := app + "/leader"
	names := []string{app, identity}
	// The budget full: a wait on the waiting connection (for a key the
	// other session holds); its tries opened the lock connection.
	w := pgtest.UniqueKey(t)
	ol, err := pglock.NewLock(env.other, w)
	if err != nil {
		t.Fatal(err)
	}
	if err := ol.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	defer ol.Release(bg)
	wctx, wcancel := context.WithCancel(bg)
	var ww sync.WaitGroup
	defer ww.Wait()
	defer wcancel()
	ww.Go(func() { _ = lk.Do(wctx, w, func(context.Context) error { return nil }) })
	smCount := func() []smSession {
		ss, err := smServer(bg, env.watch, names, &pids)
		if err != nil {
			t.Fatal(err)
		}
		return ss
	}
	deadline := time.Now().Add(smQuiet)
	for s := lk.Stats(); !(s.LockConns == 1 && s.WaitingConns == 1 && len(smCount()) == budget); s = lk.Stats() {
		if time.Now().After(deadline) {
			t.Fatalf("setup: Stats %+v, sessions %v", s, smCount())
		}
		time.Sleep(10 * time.Millisecond) // polling a condition
	}
	// A Leader campaigns: its connection of its own connects (slowly).
	ld, err := lk.Leader(pgtest.UniqueKey(t), pglock.LeaderConfig{Identity: identity})
	if err != nil {
		t.Fatal(err)
	}
	rctx, stop := context.WithCancel(bg)
	ran := make(chan error, 1)
	go func() { ran <- ld.Run(rctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) }()
	for len(smCount()) <= budget {
		if time.Now().After(deadline) {
			t.Fatalf("the Leader's campaign opened no session: %v", smCount())
		}
		time.Sleep(time.Millisecond) // polling a condition
	}
	// Stopped while its campaign connects: Run returns.
	stop()
	if err := <-ran; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v, want context.Canceled", err)
	}
	ss := smCount()
	s := lk.Stats()
	if len(ss) > budget {
		t.Errorf("INVARIANT session-budget: after the Leader's Run returned (no Leader running), %d of the Locker's sessions in pg_stat_activity, budget %d; Stats %+v; sessions: %v",
			len(ss), budget, s, ss)
	}
}
