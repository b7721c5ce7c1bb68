package pglock_test

// Adversarial review of 306e31f: Locker.Close waits until every session the
// Locker started is ended on the server (mux.sessionStarted, sessionEnded,
// sessionEndedWith, waitSessions), connects under way too. Each
// TestReview28* test names the defect it shows (DEFECT, skipped with r26Skip
// so that the suite stays green: PGLOCK_REVIEW26_UNSKIP=1 runs it), or,
// marked HELD, what it tried that held up.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
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

// r28Locker is a multiplexing Locker on a pool of its own, whose Locker
// sessions are named app and whose pool connections app+"/pool" (see
// r27PoolNamed); pids records the pool's connections too.
func r28Locker(t *testing.T, u, app string, maxConns int32, opts ...pglock.Option) (*pgxpool.Pool, *sync.Map, *pglock.Locker) {
	t.Helper()
	var pids sync.Map
	pool := r27Pool(t, u, app, maxConns, &pids, r27PoolNamed(app))
	lk, err := pglock.NewLocker(pool, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return pool, &pids, lk
}

// r28Terminate ends the sessions pids on the server (pg_terminate_backend
// returns once the signal is sent, not when the backend is gone).
func r28Terminate(t testing.TB, watch *pgxpool.Pool, pids []int32) {
	t.Helper()
	if len(pids) == 0 {
		return
	}
	if _, err := watch.Exec(context.Background(), `SELECT pg_catalog.pg_terminate_backend(p) FROM unnest($1::int4[]) AS p`, pids); err != nil {
		t.Fatal(err)
	}
}

// r28Waiting returns the PIDs of the sessions named app that wait for an
// advisory lock.
func r28Waiting(t testing.TB, watch *pgxpool.Pool, app string) []int32 {
	t.Helper()
	rows, err := watch.Query(context.Background(), `
		SELECT DISTINCT l.pid FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a USING (pid)
		WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = $1`, app)
	if err != nil {
		t.Fatal(err)
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		t.Fatal(err)
	}
	return pids
}

// r28Holding returns the PIDs of the sessions named app that hold an
// advisory lock.
func r28Holding(t testing.TB, watch *pgxpool.Pool, app string) []int32 {
	t.Helper()
	rows, err := watch.Query(context.Background(), `
		SELECT DISTINCT l.pid FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a USING (pid)
		WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1`, app)
	if err != nil {
		t.Fatal(err)
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		t.Fatal(err)
	}
	return pids
}

// r28Until polls cond every 2 ms until it holds or d passes.
func r28Until(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(2 * time.Millisecond)
	}
	return true
}

// r28After is what the server shows of a Locker just after its Close
// returned, and how long what was left took to go.
func r28After(t testing.TB, watch *pgxpool.Pool, app string, pids *sync.Map) (left []int32, locks int, what string, goneAfter time.Duration) {
	t.Helper()
	left = r27LockerSessions(t, watch, app, pids)
	locks = r27AdvisoryOf(t, watch, app)
	if len(left) == 0 && locks == 0 {
		return nil, 0, "", 0
	}
	what = r27Describe(t, watch, left)
	start := time.Now()
	r28Until(3*time.Second, func() bool {
		return len(r27LockerSessions(t, watch, app, pids)) == 0 && r27AdvisoryOf(t, watch, app) == 0
	})
	return left, locks, what, time.Since(start)
}

// FIXED (Close runs its work once, sync.Once: a later Close waits for it;
// 0 of 40 rounds in 2 runs after). Was DEFECT: "Close is safe to call more than once" and "when Close returns,
// the server has ended those sessions" do not hold together. A second Close
// called while the first is still ending the sessions (another goroutine's
// shutdown path, a signal handler and a deferred Close) returns nil at once
// (Locker.Close: lk.closed.Swap(true)), before the first has ended anything:
// the Locker's sessions are on the server and often its keys held.
// Measured: 87 of 120 rounds in 6 runs (13 to 17 of 20 each; in the others the
// first Close had ended everything before the check; the second Close
// returned at once in every round). Fix: a later Close waits for the first
// to finish (a channel closed at the end of the first Close), as
// sync.Once.Do does for its concurrent callers.
func TestReview28ConcurrentCloseReturnsEarly(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	const rounds = 20
	var bad []string
	for r := range rounds {
		app := "r28-twice-" + randomSuffix()
		pool, pids, lk := r28Locker(t, pgtest.URL(t), app, 4, pglock.WithLockConns(2), pglock.WithWaitConns(2))
		held := r27HoldMany(t, lk, watch, 4, 2)
		first := make(chan time.Duration, 2)
		start := time.Now()
		for range 2 {
			go func() {
				if err := lk.Close(); err != nil {
					t.Error(err)
				}
				first <- time.Since(start)
			}()
		}
		took := <-first
		left := r27LockerSessions(t, watch, app, pids)
		busy := r27Busy(t, watch, held)
		other := <-first
		if len(left) > 0 || len(busy) > 0 {
			bad = append(bad, fmt.Sprintf("round %d: one Close returned after %v (the other after %v) with %d of the Locker's sessions on the server and %d of its %d keys held",
				r, took, other, len(left), len(busy), len(held)))
		}
		pool.Close()
	}
	for _, b := range bad {
		t.Log(b)
	}
	if len(bad) > 0 {
		t.Errorf("%d of %d pairs of concurrent Closes: the first to return left sessions and keys on the server", len(bad), rounds)
	}
}

// r28Kind names the ways a session of the Locker is terminated in
// TestReview28TerminatedThenClose.
var r28Kinds = []string{"waiting", "holding on a waiting connection", "holding on a lock connection"}

// HELD (a suspected window not hit): a session of the Locker that the
// server ends (pg_terminate_backend) just before Close: a wait in flight
// (pgx reads the FATAL message and closes the connection, CleanupDone
// closed at once, without reading to the server's end), or a holder whose
// watch sees the loss and closes it with a plain Close (lose's loss
// branch). Both are counted out before the server has ended the backend,
// so Close could return while it is still exiting; but the backend exits
// (locks and activity entry gone) before the client has read its FATAL
// message and gone through the loss: 0 of 252 Closes (7 runs of 12 rounds
// of each of the 3 kinds) found a terminated session, or a lock of it,
// after Close.
func TestReview28TerminatedThenClose(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	holders := pgtest.Pool(t, 2)
	const rounds = 12
	bad := map[string]int{}
	var lines []string
	for r := range rounds {
		for kind, what := range r28Kinds {
			app := "r28-term-" + randomSuffix()
			pool, pids, lk := r28Locker(t, pgtest.URL(t), app, 4, pglock.WithLockConns(1), pglock.WithWaitConns(2))
			keys := r26Keys(t, 2)
			var release []func()
			if kind < 2 {
				// Held elsewhere: the Locker waits on its waiting connections.
				for _, k := range keys {
					ol, err := pglock.NewLock(holders, k)
					if err != nil {
						t.Fatal(err)
					}
					if err := ol.Acquire(bg); err != nil {
						t.Fatal(err)
					}
					release = append(release, func() { _ = ol.Release(bg) })
				}
			}
			ctx, cancel := context.WithTimeout(bg, 10*time.Second)
			var wg sync.WaitGroup
			for _, k := range keys {
				wg.Go(func() {
					_ = lk.Do(ctx, k, func(ctx context.Context) error { <-ctx.Done(); return nil })
				})
			}
			var victims []int32
			switch kind {
			case 0:
				if !r28Until(5*time.Second, func() bool { victims = r28Waiting(t, watch, app); return len(victims) == len(keys) }) {
					t.Fatalf("the Locker's waits did not start: %v", victims)
				}
			default:
				if kind == 1 {
					if !r28Until(5*time.Second, func() bool { return len(r28Waiting(t, watch, app)) == len(keys) }) {
						t.Fatal("the Locker's waits did not start")
					}
					for _, f := range release {
						f()
					}
					release = nil
				}
				if !r28Until(5*time.Second, func() bool { return lk.Stats().HeldKeys == len(keys) }) {
					t.Fatalf("the keys were not held: %+v", lk.Stats())
				}
				victims = r28Holding(t, watch, app)
				time.Sleep(10 * time.Millisecond) // the watch reads
			}
			r28Terminate(t, watch, victims)
			// Let the client see the FATAL message (it comes before the
			// backend's exit), then Close.
			time.Sleep(time.Duration(rand.IntN(1500)) * time.Microsecond)
			start := time.Now()
			if err := lk.Close(); err != nil {
				t.Fatal(err)
			}
			took := time.Since(start)
			left, locks, desc, gone := r28After(t, watch, app, pids)
			cancel()
			wg.Wait()
			for _, f := range release {
				f()
			}
			if len(left) > 0 || locks > 0 {
				bad[what]++
				lines = append(lines, fmt.Sprintf("round %d, %s (terminated %v): Close took %v; just after it %d sessions (%v), %d advisory locks of the Locker, gone %v later:%s",
					r, what, victims, took, len(left), left, locks, gone, desc))
			}
			if took > time.Second {
				t.Errorf("round %d, %s: Close took %v", r, what, took)
			}
			pool.Close()
		}
	}
	for _, l := range lines {
		t.Log(l)
	}
	for _, what := range r28Kinds {
		if bad[what] > 0 {
			t.Errorf("%s: %d of %d Closes just after a terminate returned with a terminated session of the Locker still on the server", what, bad[what], rounds)
		}
	}
}

// r28Op is one random call of the storm on lk.
func r28Op(ctx context.Context, t *testing.T, lk *pglock.Locker, sem *pglock.Semaphore, keys []string, g, i int) {
	bg := context.Background()
	k := keys[rand.IntN(len(keys))]
	cctx, cancel := context.WithTimeout(ctx, time.Duration(rand.IntN(40000))*time.Microsecond)
	defer cancel()
	work := func(ctx context.Context) error {
		if rand.IntN(3) == 0 {
			time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
		}
		return nil
	}
	switch (g + i) % 6 {
	case 0:
		_ = lk.Do(cctx, k, work)
	case 1:
		_, _ = lk.TryDo(cctx, k, work)
	case 2:
		_ = sem.Do(cctx, work)
	case 3:
		k2 := keys[rand.IntN(len(keys))]
		if k2 == k {
			_, _ = lk.TryDoAll(cctx, []any{k}, work)
		} else {
			_ = lk.DoAll(cctx, []any{k, k2}, work)
		}
	case 4:
		l, err := lk.NewLock(k)
		if err != nil {
			return
		}
		if l.Acquire(cctx) == nil {
			_ = work(cctx)
			_ = l.Release(bg)
		}
	case 5:
		_ = lk.Do(cctx, k, func(ctx context.Context) error { <-ctx.Done(); return nil })
	}
}

// HELD: the count of sessions under a storm of every kind of call (Do,
// TryDo, Semaphore, key sets, Locks, a Leader campaigning and resigning),
// with random cancels, a contender from another process (so that waits,
// relays and hand-offs run on waiting connections) and a killer that
// terminates random sessions of the Locker every few milliseconds; then
// Close at a random moment. Checked after each Close: its duration (a
// missing decrement makes it wait its whole bound, one of 1 s + the release
// timeout + 1 s; a double decrement makes it return early or, below zero,
// wait its bound too), the Locker's sessions and advisory locks on the
// server, and that every call returns. A session left just after Close
// that the killer terminated (still exiting) is logged, not counted (see
// TestReview28TerminatedThenClose). 0 of 32 rounds in 4 runs; the longest
// Close 85-290 ms (cancel requests resent for waits the server had not
// started yet).
func TestReview28StormWithKillsThenClose(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 3)
	keys := r26Keys(t, 6)
	stop := make(chan struct{})
	var cwg sync.WaitGroup
	r27Contender(t, keys[:3], stop, &cwg)
	defer func() { close(stop); cwg.Wait() }()
	const rounds = 8
	var bad []string
	var worst time.Duration
	for r := range rounds {
		app := "r28-storm-" + randomSuffix()
		pool, pids, lk := r28Locker(t, pgtest.URL(t), app, 6, pglock.WithLockConns(2), pglock.WithWaitConns(2))
		sem, err := lk.Semaphore(keys[5], 2)
		if err != nil {
			t.Fatal(err)
		}
		ld, err := lk.Leader(keys[4], pglock.LeaderConfig{Identity: app, MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancelAll := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for g := range 10 {
			wg.Go(func() {
				for i := 0; ctx.Err() == nil; i++ {
					r28Op(ctx, t, lk, sem, keys, g, i)
				}
			})
		}
		wg.Go(func() {
			for ctx.Err() == nil {
				rctx, c := context.WithTimeout(ctx, time.Duration(5+rand.IntN(60))*time.Millisecond)
				_ = ld.Run(rctx, func(ctx context.Context) error { <-ctx.Done(); return nil })
				c()
			}
		})
		var killed sync.Map
		kctx, stopKill := context.WithCancel(ctx)
		var kwg sync.WaitGroup
		kwg.Go(func() {
			for kctx.Err() == nil {
				time.Sleep(time.Duration(3+rand.IntN(25)) * time.Millisecond)
				own := r27LockerSessions(t, watch, app, pids)
				if len(own) == 0 || kctx.Err() != nil {
					continue
				}
				pid := own[rand.IntN(len(own))]
				killed.Store(pid, true)
				_, _ = watch.Exec(context.Background(), "SELECT pg_catalog.pg_terminate_backend($1)", pid)
			}
		})
		time.Sleep(time.Duration(250+rand.IntN(400)) * time.Millisecond)
		stopKill()
		kwg.Wait()
		start := time.Now()
		closed := make(chan error, 1)
		go func() { closed <- lk.Close() }()
		select {
		case err := <-closed:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: Close did not return within 10 s", r)
		}
		took := time.Since(start)
		worst = max(worst, took)
		left, locks, what, gone := r28After(t, watch, app, pids)
		st := lk.Stats()
		cancelAll()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: calls still running 5 s after Close", r)
		}
		var own []int32
		for _, pid := range left {
			if _, k := killed.Load(pid); !k {
				own = append(own, pid)
			}
		}
		if len(left) > len(own) {
			t.Logf("round %d: just after Close, %d sessions the killer had terminated were still exiting (gone %v later)", r, len(left)-len(own), gone)
		}
		if took > time.Second || len(own) > 0 || (locks > 0 && len(own) == len(left)) {
			bad = append(bad, fmt.Sprintf("round %d: Close took %v; just after it %d sessions not terminated by the test (%v), %d advisory locks; gone %v later; Stats %+v:%s",
				r, took, len(own), own, locks, gone, st, what))
		}
		pool.Close()
	}
	t.Logf("the longest Close took %v", worst)
	for _, b := range bad {
		t.Error(b)
	}
}

// r28DelayProxy forwards connections from 127.0.0.1 to upstream, holding
// every chunk from the server back for delay (a slow, not silent, network:
// the client's bytes reach the server at once). Closed when the test ends.
type r28DelayProxy struct {
	ln       net.Listener
	network  string
	upstream string
	delay    atomic.Int64
	mu       sync.Mutex
	conns    []net.Conn
	wg       sync.WaitGroup
}

func r28NewDelayProxy(t *testing.T, network, upstream string, delay time.Duration) *r28DelayProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &r28DelayProxy{ln: ln, network: network, upstream: upstream}
	p.delay.Store(int64(delay))
	p.wg.Go(p.accept)
	t.Cleanup(p.close)
	return p
}

func (p *r28DelayProxy) close() {
	_ = p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *r28DelayProxy) track(c net.Conn) {
	p.mu.Lock()
	p.conns = append(p.conns, c)
	p.mu.Unlock()
}

func (p *r28DelayProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial(p.network, p.upstream)
		if err != nil {
			_ = c.Close()
			continue
		}
		p.track(c)
		p.track(u)
		// Client to server: at once. A close goes through at once too.
		p.wg.Go(func() {
			_, _ = io.Copy(u, c)
			_ = u.Close()
		})
		// Server to client: each chunk after the delay, in order.
		type chunk struct {
			at time.Time
			b  []byte
		}
		ch := make(chan chunk, 1024)
		p.wg.Go(func() {
			defer close(ch)
			for {
				buf := make([]byte, 32<<10)
				n, err := u.Read(buf)
				if n > 0 {
					ch <- chunk{time.Now().Add(time.Duration(p.delay.Load())), buf[:n]}
				}
				if err != nil {
					return
				}
			}
		})
		p.wg.Go(func() {
			defer c.Close()
			for ck := range ch {
				time.Sleep(time.Until(ck.at))
				if _, err := c.Write(ck.b); err != nil {
					_ = u.Close()
					for range ch {
					}
					return
				}
			}
		})
	}
}

// r28ProxiedURL returns the pool configuration edit that sends the pool's
// connections (and so the Locker's) through p.
func r28Through(p *r28DelayProxy) func(*pgxpool.Config) {
	return func(cfg *pgxpool.Config) {
		addr := p.ln.Addr().(*net.TCPAddr)
		cfg.ConnConfig.Host, cfg.ConnConfig.Port = addr.IP.String(), uint16(addr.Port)
		cfg.ConnConfig.Fallbacks = nil
		cfg.ConnConfig.TLSConfig = nil
	}
}

// FIXED (mux.connect's error paths end the session before the connect
// returns: endConnected waits for pgx's own close to read to the end, or
// runs EndSession, up to lockconn.MaxSessionEnd; Close's second phase waits
// that long: 0 of 12 rounds in 2 runs after, Close 1.0-1.4 s). Was
// DEFECT (on a slow network): a connect that takes longer than a second
// because the network is slow, not silent (the server's answers arrive
// 400 ms late, the client's bytes at once; a proxy of the test's on
// 127.0.0.1), is cut off by Close after maxSessionEnd, in the middle of
// mux.connect's statements after pgx's connect (the session is on the
// server, idle after its set_config or one of the Prepares): pgx closes
// the connection asynchronously (asyncClose: cancel request, Terminate,
// then reading to EOF), connect's error path calls a plain Close, which
// returns at once, the dial goroutine counts the session out, and Close
// returns while the server's backend is still there (gone 0.3-10 ms
// later here; on a real slow network, one trip of Terminate later).
// Measured: 6 of 6 rounds in each of 8 runs (48 of 48). This is
// the very case 306e31f meant to close ("a connect cut mid-way leaves a
// session the server ends later, on its own"), moved past a second. Close's
// own duration stays bounded (HELD: 1.00 s, checked too). Fix: in
// mux.connect, on every error after pgx.ConnectConfig succeeded, wait for
// conn.PgConn().CleanupDone() (bounded by what is left of Close's wait)
// after the Close, or end the connection with endSession; then the dial
// goroutine counts it out only once the server has ended it.
func TestReview28CloseDuringSlowConnect(t *testing.T) {
	t.Parallel()
	bad := r28SlowConnect(t, 400*time.Millisecond, 6, 1500*time.Millisecond)
	for _, b := range bad {
		t.Log(b)
	}
	if len(bad) > 0 {
		t.Errorf("%d of %d Closes during a slow connect returned with the connect's session still on the server", len(bad), 6)
	}
}

// HELD: the same on a network slow enough that a connect takes about half
// a second (60 ms each way of every answer, about ten round trips): Close
// during the connect waits for it (it is not cut: under a second), ends its
// session with endSession, and returns with nothing of the Locker's on the
// server. 0 of 8 rounds, every run.
func TestReview28CloseDuringModeratelySlowConnect(t *testing.T) {
	t.Parallel()
	for _, b := range r28SlowConnect(t, 60*time.Millisecond, 8, 500*time.Millisecond) {
		t.Error(b)
	}
}

// r28SlowConnect closes a Locker whose first connect runs through a proxy
// that holds every answer of the server back for delay, at a random moment
// up to sleepMax after the connect's session is on the server, rounds
// times; it returns what was left on the server just after each Close.
func r28SlowConnect(t *testing.T, delay time.Duration, rounds int, sleepMax time.Duration) []string {
	u := pgtest.URL(t)
	cc, err := pgx.ParseConfig(u)
	if err != nil {
		t.Fatal(err)
	}
	network, addr := pgconn.NetworkAddress(cc.Host, cc.Port)
	proxy := r28NewDelayProxy(t, network, addr, delay)
	watch := pgtest.Pool(t, 2)
	var bad []string
	for r := range rounds {
		app := "r28-slow-" + randomSuffix()
		var pids sync.Map
		pool := r27Pool(t, u, app, 4, &pids, func(c *pgxpool.Config) {
			r27PoolNamed(app)(c)
			r28Through(proxy)(c)
		})
		lk, err := pglock.NewLocker(pool, pglock.WithLockConns(1), pglock.WithWaitConns(1))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		done := make(chan error, 1)
		go func() { done <- lk.Do(ctx, r26Keys(t, 1)[0], func(context.Context) error { return nil }) }()
		// Close once the Locker's connect is on the server (its session
		// started), at a random point of its round trips.
		if !r28Until(5*time.Second, func() bool { return len(r27LockerSessions(t, watch, app, &pids)) > 0 }) {
			t.Fatalf("round %d: the Locker's connect did not reach the server", r)
		}
		time.Sleep(time.Duration(rand.Int64N(int64(sleepMax))))
		start := time.Now()
		if err := lk.Close(); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		left, locks, what, gone := r28After(t, watch, app, &pids)
		cancel()
		<-done
		if took > 3*time.Second {
			t.Errorf("round %d: Close took %v on a slow network (bound: about two seconds)", r, took)
		}
		if len(left) > 0 || locks > 0 {
			bad = append(bad, fmt.Sprintf("round %d: Close took %v; just after it %d sessions of the Locker (%v), %d advisory locks, gone %v later:%s", r, took, len(left), left, locks, gone, what))
		} else {
			t.Logf("round %d: Close took %v, nothing left", r, took)
		}
		pool.Close()
	}
	return bad
}

// r28LockerWork returns the functions of goroutines running the Locker's
// own work (its init, self-test, connects, session ends): none should be
// running once Close has returned.
func r28LockerWork() []string {
	buf := make([]byte, 1<<22)
	n := runtime.Stack(buf, true)
	var out []string
	for _, g := range strings.Split(string(buf[:n]), "\n\n") {
		for _, f := range []string{"pglock.(*mux).initOnce", "pglock.(*mux).selfTest", "pglock.(*mux).secondTry",
			"lockconn.(*Conn).dial", "lockconn.(*Group).sessionEndedWith", "lockconn.EndSession", "lockconn.(*Conn).lose"} {
			if strings.Contains(g, f) {
				out = append(out, f)
				break
			}
		}
	}
	return out
}

// r28PoolSessions counts the sessions on the server named app+"/pool".
func r28PoolSessions(t testing.TB, watch *pgxpool.Pool, app string) int {
	t.Helper()
	var n int
	if err := watch.QueryRow(context.Background(), `SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1`, app+"/pool").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// HELD: Close during the init of a cold Locker (its first lock connection
// connecting, reading the lock table, the self-test, whose second try runs
// on a pool connection that the Locker opens for it and ends itself) at
// random moments, with waits started: Close takes under a second, nothing
// of the Locker's is on the server after it, no extra session of its pool
// (the self-test's) either, and within goleak's settle retries no goroutine
// is left: 0 extra sessions in 210 rounds (7 runs). Logged, not failed:
// in 4 of 210 rounds the init's goroutine
// (initOnce) or a dial goroutine was still finishing just after Close
// returned. FIXED since: a loaded CI run (two CPU-bound processes beside
// it) saw that unfinished init still ending the self-test's pool
// connection after Close (1 of 30 rounds: "1 sessions of the pool on the
// server, 0 in the pool"); Close now waits for a run of initOnce under way
// (mux.waitInit), and the self-test's connection is ended as a failed
// connect's is (endConnected: also when pgx closed it itself). Not
// parallel: the goroutine checks see every goroutine of the process.
func TestReview28CloseDuringInit(t *testing.T) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	holders := pgtest.Pool(t, 1)
	keys := r26Keys(t, 3)
	ol, err := pglock.NewLock(holders, keys[2])
	if err != nil {
		t.Fatal(err)
	}
	if err := ol.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	const rounds = 30
	var bad, busy []string
	extra := 0
	before := goleak.IgnoreCurrent()
	for r := range rounds {
		app := "r28-init-" + randomSuffix()
		pool, pids, lk := r28Locker(t, pgtest.URL(t), app, 2, pglock.WithLockConns(2), pglock.WithWaitConns(1))
		var wg sync.WaitGroup
		for _, k := range keys {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(bg, 5*time.Second)
				defer cancel()
				_ = lk.Do(ctx, k, func(context.Context) error { return nil })
			})
		}
		time.Sleep(time.Duration(rand.IntN(15000)) * time.Microsecond)
		start := time.Now()
		if err := lk.Close(); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		work := r28LockerWork()
		onServer, inPool := r28PoolSessions(t, watch, app), int(pool.Stat().TotalConns())
		left, locks, what, gone := r28After(t, watch, app, pids)
		wg.Wait()
		if len(work) > 0 {
			t.Logf("round %d: just after Close, the Locker's goroutines still finishing: %v", r, work)
		}
		if onServer > inPool {
			extra++
			busy = append(busy, fmt.Sprintf("round %d: just after Close, %d sessions of the pool on the server, %d in the pool (the self-test's?)", r, onServer, inPool))
		}
		if took > time.Second || len(left) > 0 || locks > 0 {
			bad = append(bad, fmt.Sprintf("round %d: Close took %v; just after it %d sessions, %d locks, gone %v later:%s", r, took, len(left), locks, gone, what))
		}
		pool.Close()
	}
	_ = ol.Release(bg) // its watch is a goroutine of the test's
	for _, b := range bad {
		t.Error(b)
	}
	if err := goleak.Find(before); err != nil {
		t.Errorf("goroutines left after the Lockers' Closes: %v", err)
	}
	for _, b := range busy {
		t.Log(b)
	}
	if len(busy) > 0 {
		t.Errorf("%d of %d Closes during init returned with a session of the self-test's on the server", extra, rounds)
	}
}

// HELD: Close racing a Leader's Run as its campaign starts (the campaign
// connection connecting, naming itself, queueing behind another process's
// leader) or as it ends (Run's context cancelled at a random moment around
// Close): no session of the Leader's identity or the Locker's is on the
// server when Close returns, Close takes under a second, Run returns.
// 0 of 30 rounds in each of 4 runs.
func TestReview28CloseRacingCampaignStart(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	key := r27HeldElsewhere(t)
	const rounds = 30
	var bad []string
	for r := range rounds {
		app := "r28-camp-" + randomSuffix()
		pool, pids, lk := r28Locker(t, pgtest.URL(t), app, 3)
		ld, err := lk.Leader(key, pglock.LeaderConfig{Identity: app, MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if r%2 == 1 {
			// A warm Locker: the campaign's connect is the only one.
			if err := lk.Do(bg, key+"-warm", func(context.Context) error { return nil }); err != nil {
				t.Fatal(err)
			}
		}
		ctx, cancel := context.WithCancel(bg)
		ran := make(chan error, 1)
		go func() { ran <- ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) }()
		time.Sleep(time.Duration(rand.IntN(25000)) * time.Microsecond)
		if r%3 == 2 {
			go func() { time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond); cancel() }()
		}
		start := time.Now()
		if err := lk.Close(); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		left, locks, what, gone := r28After(t, watch, app, pids)
		cancel()
		select {
		case <-ran:
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: Run did not return", r)
		}
		if took > time.Second || len(left) > 0 || locks > 0 {
			bad = append(bad, fmt.Sprintf("round %d: Close took %v; just after it %d sessions, %d locks, gone %v later:%s", r, took, len(left), locks, gone, what))
		}
		pool.Close()
	}
	for _, b := range bad {
		t.Error(b)
	}
}

// HELD (a suspected window not hit): Close racing an idle reconnect. A
// lock connection that held nothing for half the abandoned-session bound
// (3 s) is replaced at its next use (lockConn.open): the old session is
// closed with a plain Close (Terminate, not waited for, unlike endSession)
// and counted out at once; a Close that comes meanwhile could return while
// the old session is still on the server. 12 Lockers per run race a Do
// after 3.2 s idle with Close (0-1.5 ms apart): 0 of 48 in 4 runs; Close
// under a second every time. (Still worth mending: endSession there too.)
func TestReview28CloseRacingIdleReconnect(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	const lockers = 12
	type one struct {
		app  string
		pool *pgxpool.Pool
		pids *sync.Map
		lk   *pglock.Locker
		key  string
		old  []int32
	}
	var ls []*one
	for i := range lockers {
		app := "r28-idle-" + randomSuffix()
		pool, pids, lk := r28Locker(t, pgtest.URL(t), app, 2, pglock.WithLockConns(1), pglock.WithWaitConns(1))
		o := &one{app: app, pool: pool, pids: pids, lk: lk, key: fmt.Sprintf("%s-%d", pgtest.UniqueKey(t), i)}
		if err := lk.Do(bg, o.key, func(context.Context) error { return nil }); err != nil {
			t.Fatal(err)
		}
		o.old = r27LockerSessions(t, watch, app, pids)
		ls = append(ls, o)
	}
	time.Sleep(pglock.AbandonedSessionTimeout/2 + 200*time.Millisecond)
	var mu sync.Mutex
	var bad []string
	var wg sync.WaitGroup
	for i, o := range ls {
		wg.Go(func() {
			done := make(chan struct{})
			go func() {
				defer close(done)
				ctx, cancel := context.WithTimeout(bg, 5*time.Second)
				defer cancel()
				_ = o.lk.Do(ctx, o.key, func(context.Context) error { return nil })
			}()
			time.Sleep(time.Duration(rand.IntN(1500)) * time.Microsecond)
			start := time.Now()
			_ = o.lk.Close()
			took := time.Since(start)
			left := r27LockerSessions(t, watch, o.app, o.pids)
			<-done
			if len(left) > 0 || took > time.Second {
				mu.Lock()
				bad = append(bad, fmt.Sprintf("locker %d: Close took %v; just after it %d sessions (%v; the idle one was %v)", i, took, len(left), left, o.old))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	for _, b := range bad {
		t.Error(b)
	}
}

// HELD: a Locker that is not closed keeps working under a long run of Do
// on distinct keys (and some shared ones) with random cancels and backend
// kills: no connect refused, no stuck wait (every call returns within its
// deadline and a bit), every key can be taken afterwards, Stats stay within
// the budget and return to nothing held; and its Close at the end is prompt
// (a count that drifted over the run would make it wait its bound or
// return early). 3 runs: 19-24 thousand calls each, 97% held, none
// refused or stuck, every key free afterwards, Sessions never over
// MaxSessions, Close after the run 5-11 ms with nothing left.
func TestReview28NotClosedLongRun(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	app := "r28-long-" + randomSuffix()
	pool, pids, lk := r28Locker(t, pgtest.URL(t), app, 4, pglock.WithLockConns(2), pglock.WithWaitConns(2))
	defer pool.Close()
	keys := r26Keys(t, 40)
	stop := make(chan struct{})
	var cwg sync.WaitGroup
	r27Contender(t, keys[:4], stop, &cwg)
	ctx, cancel := context.WithTimeout(bg, 7*time.Second)
	defer cancel()
	var calls, oks, refused, slow atomic.Int64
	var errMu sync.Mutex
	errs := map[string]int{}
	var wg sync.WaitGroup
	for g := range 12 {
		wg.Go(func() {
			for i := 0; ctx.Err() == nil; i++ {
				k := keys[(g*7+i)%len(keys)]
				d := time.Duration(1+rand.IntN(80)) * time.Millisecond
				cctx, c := context.WithTimeout(ctx, d)
				start := time.Now()
				err := lk.Do(cctx, k, func(ctx context.Context) error {
					time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond)
					return nil
				})
				c()
				calls.Add(1)
				if time.Since(start) > d+2*time.Second {
					slow.Add(1)
				}
				switch {
				case err == nil:
					oks.Add(1)
				case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled), errors.Is(err, pglock.ErrLockLost):
				default:
					if errors.Is(err, pglock.ErrUnsupportedConn) || errors.Is(err, pglock.ErrTransactionPooler) || errors.Is(err, pglock.ErrLockerClosed) {
						refused.Add(1)
					}
					errMu.Lock()
					errs[fmt.Sprintf("%.120v", err)]++
					errMu.Unlock()
				}
			}
		})
	}
	kwg := sync.WaitGroup{}
	kwg.Go(func() {
		for ctx.Err() == nil {
			time.Sleep(time.Duration(20+rand.IntN(80)) * time.Millisecond)
			own := r27LockerSessions(t, watch, app, pids)
			if len(own) > 0 && ctx.Err() == nil {
				_, _ = watch.Exec(bg, "SELECT pg_catalog.pg_terminate_backend($1)", own[rand.IntN(len(own))])
			}
		}
	})
	worst := pglock.LockerStats{}
	for ctx.Err() == nil {
		st := lk.Stats()
		if st.Sessions > worst.Sessions {
			worst = st
		}
		if st.Sessions > st.MaxSessions || st.ServerLocks < 0 || st.HeldKeys < 0 || st.Queued < 0 {
			t.Errorf("Stats out of bounds: %+v", st)
		}
		time.Sleep(5 * time.Millisecond)
	}
	wg.Wait()
	kwg.Wait()
	close(stop)
	cwg.Wait()
	t.Logf("%d calls, %d held; worst Stats %+v; other errors %v", calls.Load(), oks.Load(), worst, errs)
	if refused.Load() > 0 || slow.Load() > 0 {
		t.Errorf("%d calls refused (connect refused, Locker closed), %d calls took 2 s past their deadline: %v", refused.Load(), slow.Load(), errs)
	}
	if oks.Load() < calls.Load()/10 {
		t.Errorf("only %d of %d calls held their key", oks.Load(), calls.Load())
	}
	// Every key can be taken now, at once.
	for _, k := range keys {
		c, cc := context.WithTimeout(bg, 3*time.Second)
		if err := lk.Do(c, k, func(context.Context) error { return nil }); err != nil {
			t.Errorf("after the run, Do(%s): %v", k, err)
		}
		cc()
	}
	if !r28Until(2*time.Second, func() bool { st := lk.Stats(); return st.HeldKeys == 0 && st.ServerLocks == 0 && st.Queued == 0 }) {
		t.Errorf("after the run, Stats %+v: keys or server locks still counted", lk.Stats())
	}
	start := time.Now()
	if err := lk.Close(); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	left, locks, what, gone := r28After(t, watch, app, pids)
	t.Logf("Close after the run took %v", took)
	if took > time.Second || len(left) > 0 || locks > 0 {
		t.Errorf("Close after the run took %v; just after it %d sessions, %d locks, gone %v later:%s", took, len(left), locks, gone, what)
	}
}

// Close on a silent network (the fault proxy's Blackhole) while the Locker
// is in one of these states; want is the bound Close's doc gives for it.
var r28Silent = []struct {
	name string
	want time.Duration
}{
	{"connecting", 2300 * time.Millisecond},
	{"waiting in the server's queue", 2300 * time.Millisecond},
	{"holding on a waiting connection", 2300 * time.Millisecond},
	{"a try's statement on a lock connection", 2300 * time.Millisecond},
}

// FIXED, with Close's documented bound now about two seconds: a wait the
// Locker's Close cuts sends cancel requests for at most
// lockconn.MaxSessionEnd (its context's cause is ErrLockerClosed), and the
// sessions pgx closed are waited for one second more at most. After: 1.0,
// 2.0, 1.0 and 1.95 s for the four states, in 3 runs. Was
// DEFECT (2 of the 4 states, in every one of 8 runs; the other 2 HELD): Close's doc
// says it waits for the server "on a silent network up to a second" (the
// watch's ping aside), and 306e31f adds that connects under way are "cut
// off after a second". The network goes silent (the fault proxy's
// Blackhole) while the Locker is in one of four states, then Close:
//   - connecting: 1.00 s. HELD.
//   - holding a key on a waiting connection (idle, watched): 1.00 s. HELD.
//   - waiting in the server's queue on a waiting connection: 6.0 s. Close
//     stops the wait with cancel requests (waitStop.fire) for up to the
//     release timeout (5 s) before its socket is cut, and Close's close of
//     that connection queues behind the wait; then pgx's asyncClose, whose
//     cancel request cannot get through, never closes CleanupDone in time,
//     and sessionEndedWith holds Close one more second (maxSessionEnd).
//   - a try's statement on a lock connection: 1.95 s: the statement's
//     bound (twice the check interval, 1 s), then the same extra second in
//     sessionEndedWith (new in 306e31f: before it, nothing waited for the
//     CleanupDone of a connection pgx closed itself).
//
// Fix: once the Locker is closing, bound a wait's cancel by maxSessionEnd
// (fire's bound min(releaseTimeout, maxSessionEnd) when m.closing has
// ended, or a socket deadline set by mux.close on busy waiting
// connections); and count out at once a connection pgx closed after a
// socket timeout (the network is silent: nothing from the server is coming,
// and asyncClose's cancel request blocks up to 15 s), or make the waits of
// Close share one bound rather than add up.
func TestReview28CloseOnSilentNetwork(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	holders := pgtest.Pool(t, 4)
	for i, st := range r28Silent {
		// R28_ONLY=i runs the i-th state alone.
		if os.Getenv("R28_ONLY") != "" && os.Getenv("R28_ONLY") != fmt.Sprint(i) {
			continue
		}
		proxy, pool := faultProxyPool(t, 2)
		lk, err := pglock.NewLocker(pool, pglock.WithLockConns(1), pglock.WithWaitConns(1))
		if err != nil {
			t.Fatal(err)
		}
		key := fmt.Sprintf("%s-%d", pgtest.UniqueKey(t), i)
		k, err := lk.Key(key)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(bg, 30*time.Second)
		done := make(chan error, 1)
		switch i {
		case 0:
			proxy.Blackhole()
			go func() { done <- lk.Do(ctx, key, func(context.Context) error { return nil }) }()
			time.Sleep(50 * time.Millisecond)
		case 3:
			if err := lk.Do(ctx, key+"-warm", func(context.Context) error { return nil }); err != nil {
				t.Fatal(err)
			}
			proxy.Blackhole()
			go func() {
				_, err := lk.TryDo(ctx, key, func(context.Context) error { return nil })
				done <- err
			}()
			time.Sleep(50 * time.Millisecond)
		default:
			ol, err := pglock.NewLock(holders, key)
			if err != nil {
				t.Fatal(err)
			}
			if err := ol.Acquire(bg); err != nil {
				t.Fatal(err)
			}
			go func() { done <- lk.Do(ctx, key, func(ctx context.Context) error { <-ctx.Done(); return nil }) }()
			if !r28Until(5*time.Second, func() bool {
				hs, err := pgtest.Holders(bg, watch, k)
				return err == nil && len(hs) == 2
			}) {
				t.Fatalf("%s: the Locker's wait did not start", st.name)
			}
			if i == 2 {
				_ = ol.Release(bg)
				if !r28Until(5*time.Second, func() bool { return lk.Stats().HeldKeys == 1 }) {
					t.Fatalf("%s: the key was not held", st.name)
				}
				time.Sleep(100 * time.Millisecond)
			} else {
				defer func() { _ = ol.Release(bg) }()
			}
			proxy.Blackhole()
			time.Sleep(50 * time.Millisecond)
		}
		start := time.Now()
		if err := lk.Close(); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		cancel()
		proxy.Restore()
		<-done
		t.Logf("%s: Close on a silent network took %v (documented bound about %v)", st.name, took.Round(time.Millisecond), st.want)
		if took > st.want {
			t.Errorf("%s: Close on a silent network took %v, over its documented bound (about two seconds)", st.name, took.Round(time.Millisecond))
		}
	}
}

// HELD: Close racing the turnover of waiting connections: idle waiting
// connections whose sessions the server ended meanwhile are taken by new
// waits, fail at once and are replaced (replaceWaitConn closes the dead one
// and connects another), and waits cancelled at random give their
// connections back (putWaitConn keeps or closes them), while Close comes at
// a random moment. After each Close: its duration under a second, none of
// the Locker's sessions or advisory locks on the server.
func TestReview28CloseRacingWaitConnTurnover(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	holders := pgtest.Pool(t, 3)
	keys := r26Keys(t, 3)
	for _, k := range keys {
		ol, err := pglock.NewLock(holders, k)
		if err != nil {
			t.Fatal(err)
		}
		if err := ol.Acquire(bg); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = ol.Release(bg) })
	}
	const rounds = 20
	var bad []string
	for r := range rounds {
		app := "r28-turn-" + randomSuffix()
		pool, pids, lk := r28Locker(t, pgtest.URL(t), app, 3, pglock.WithLockConns(1), pglock.WithWaitConns(2))
		// Ready first (its init and lock connection), on a free key: on a
		// loaded machine that alone can take longer than a wait's timeout.
		if err := lk.Do(bg, r26Keys(t, 1)[0], func(context.Context) error { return nil }); err != nil {
			t.Fatal(err)
		}
		// Two waiting connections, idle once their waits are cancelled,
		// after both are in the server's queue (a condition, not a timer).
		var wg sync.WaitGroup
		wctx, wcancel := context.WithCancel(bg)
		for _, k := range keys[:2] {
			wg.Go(func() { _ = lk.Do(wctx, k, func(context.Context) error { return nil }) })
		}
		queued := r28Until(10*time.Second, func() bool {
			var n int
			err := watch.QueryRow(bg, `SELECT count(*) FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a USING (pid)
				WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = $1`, app).Scan(&n)
			return err == nil && n == 2
		})
		wcancel()
		wg.Wait()
		if !queued {
			t.Fatalf("round %d: the two waits did not reach the server's queue: %+v", r, lk.Stats())
		}
		// A wait whose cancel raced its statement closes its connection
		// (in doubt): one idle connection is enough for the round.
		if st := lk.Stats(); st.IdleConns == 0 {
			t.Fatalf("round %d: no idle waiting connection after the waits: %+v", r, st)
		}
		// The server ends every session of the Locker; the Locker does not
		// know yet (nothing watches an idle waiting connection).
		own := r27LockerSessions(t, watch, app, pids)
		r28Terminate(t, watch, own)
		if !r28Until(5*time.Second, func() bool { return !slicesContainsAny(r27LockerSessions(t, watch, app, pids), own) }) {
			t.Fatalf("round %d: the terminated sessions did not go", r)
		}
		// New waits: some take a dead idle connection and replace it,
		// some are cancelled at random.
		ctx, cancel := context.WithCancel(bg)
		for g := range 4 {
			wg.Go(func() {
				d := time.Duration(1+rand.IntN(8000)) * time.Microsecond
				if g%2 == 0 {
					d = 5 * time.Second
				}
				c, cc := context.WithTimeout(ctx, d)
				defer cc()
				_ = lk.Do(c, keys[g%len(keys)], func(context.Context) error { return nil })
			})
		}
		time.Sleep(time.Duration(rand.IntN(8000)) * time.Microsecond)
		start := time.Now()
		if err := lk.Close(); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		left, locks, what, gone := r28After(t, watch, app, pids)
		cancel()
		wg.Wait()
		if took > time.Second || len(left) > 0 || locks > 0 {
			bad = append(bad, fmt.Sprintf("round %d: Close took %v; just after it %d sessions (%v), %d locks, gone %v later:%s", r, took, len(left), left, locks, gone, what))
		}
		pool.Close()
	}
	for _, b := range bad {
		t.Error(b)
	}
}

// slicesContainsAny reports whether a and b share an element.
func slicesContainsAny(a, b []int32) bool {
	for _, x := range a {
		for _, y := range b {
			if x == y {
				return true
			}
		}
	}
	return false
}

// HELD: Close called from inside the work of a hold (a Do on a lock
// connection, a Do that waited and holds on a waiting connection, a
// Semaphore's slot, a Leader's term) returns promptly (no deadlock on its
// own hold), the work's context ends, the calls return, and nothing of the
// Locker's is on the server once Close has returned.
func TestReview28CloseFromInsideWork(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	holders := pgtest.Pool(t, 2)
	for _, kind := range []string{"Do", "Do after a wait", "Semaphore", "Leader"} {
		app := "r28-inside-" + randomSuffix()
		pool, pids, lk := r28Locker(t, pgtest.URL(t), app, 3, pglock.WithLockConns(1), pglock.WithWaitConns(1))
		key := pgtest.UniqueKey(t) + "-" + kind
		var took time.Duration
		var workEnded atomic.Bool
		work := func(ctx context.Context) error {
			start := time.Now()
			_ = lk.Close()
			took = time.Since(start)
			select {
			case <-ctx.Done():
				workEnded.Store(true)
			case <-time.After(3 * time.Second):
			}
			return nil
		}
		ctx, cancel := context.WithTimeout(bg, 10*time.Second)
		done := make(chan error, 1)
		switch kind {
		case "Do":
			go func() { done <- lk.Do(ctx, key, work) }()
		case "Do after a wait":
			ol, err := pglock.NewLock(holders, key)
			if err != nil {
				t.Fatal(err)
			}
			if err := ol.Acquire(bg); err != nil {
				t.Fatal(err)
			}
			go func() { done <- lk.Do(ctx, key, work) }()
			if !r28Until(5*time.Second, func() bool { return len(r28Waiting(t, watch, app)) == 1 }) {
				t.Fatal("the wait did not start")
			}
			_ = ol.Release(bg)
		case "Semaphore":
			sem, err := lk.Semaphore(key, 2)
			if err != nil {
				t.Fatal(err)
			}
			go func() { done <- sem.Do(ctx, work) }()
		case "Leader":
			ld, err := lk.Leader(key, pglock.LeaderConfig{Identity: app})
			if err != nil {
				t.Fatal(err)
			}
			go func() { done <- ld.Run(ctx, work) }()
		}
		var err error
		select {
		case err = <-done:
		case <-time.After(8 * time.Second):
			t.Fatalf("%s: the call that closed its Locker from inside its work did not return in 8 s", kind)
		}
		cancel()
		left, locks, what, gone := r28After(t, watch, app, pids)
		t.Logf("%s: Close from inside the work took %v; the work's context ended: %v; the call returned %v", kind, took, workEnded.Load(), err)
		if took > time.Second || !workEnded.Load() || len(left) > 0 || locks > 0 {
			t.Errorf("%s: Close from inside the work took %v, the work's context ended: %v; after it %d sessions, %d locks (gone %v later):%s",
				kind, took, workEnded.Load(), len(left), locks, gone, what)
		}
		pool.Close()
	}
}

// HELD: Close racing the release of a hold on a waiting connection (the
// unlock, then putWaitConn keeping the connection idle or closing it, or a
// relay to the next waiter of the process): the hold's work returns and
// Close is called within the same couple of milliseconds, in either order.
// After each Close: under a second, none of the Locker's sessions or locks
// on the server.
func TestReview28CloseRacingWaitConnGiveBack(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	holders := pgtest.Pool(t, 2)
	const rounds = 30
	var bad []string
	for r := range rounds {
		app := "r28-give-" + randomSuffix()
		pool, pids, lk := r28Locker(t, pgtest.URL(t), app, 3, pglock.WithLockConns(1), pglock.WithWaitConns(2))
		key := fmt.Sprintf("%s-%d", pgtest.UniqueKey(t), r)
		ol, err := pglock.NewLock(holders, key)
		if err != nil {
			t.Fatal(err)
		}
		if err := ol.Acquire(bg); err != nil {
			t.Fatal(err)
		}
		release := make(chan struct{})
		var wg sync.WaitGroup
		// Two waiters of the process: the second may be relayed the key.
		for range 1 + r%2 {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(bg, 5*time.Second)
				defer cancel()
				_ = lk.Do(ctx, key, func(ctx context.Context) error {
					select {
					case <-release:
					case <-ctx.Done():
					}
					return nil
				})
			})
		}
		if !r28Until(5*time.Second, func() bool { return len(r28Waiting(t, watch, app)) >= 1 }) {
			t.Fatalf("round %d: the wait did not start", r)
		}
		_ = ol.Release(bg)
		if !r28Until(5*time.Second, func() bool { return lk.Stats().HeldKeys == 1 }) {
			t.Fatalf("round %d: the key was not held: %+v", r, lk.Stats())
		}
		go func() {
			time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond)
			close(release)
		}()
		time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond)
		start := time.Now()
		if err := lk.Close(); err != nil {
			t.Fatal(err)
		}
		took := time.Since(start)
		left, locks, what, gone := r28After(t, watch, app, pids)
		wg.Wait()
		if took > time.Second || len(left) > 0 || locks > 0 {
			bad = append(bad, fmt.Sprintf("round %d: Close took %v; just after it %d sessions (%v), %d locks, gone %v later:%s", r, took, len(left), left, locks, gone, what))
		}
		pool.Close()
	}
	for _, b := range bad {
		t.Error(b)
	}
}
