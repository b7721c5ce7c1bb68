package pglock_test

// Adversarial review of the relay path (issue 21): two Lockers (separate
// pools, as two processes) plus raw sessions on one hot key, with random
// deadlines/cancellations, shared waiters, backend terminations and Close.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

var chaosEpoch = time.Now()

func chaosNow() time.Duration { return time.Since(chaosEpoch) } // monotonic

type chaosHold struct {
	who        string
	shared     bool
	start, end time.Duration
	lost       bool
}

type chaosHist struct {
	mu    sync.Mutex
	holds []chaosHold
}

func (h *chaosHist) add(x chaosHold) {
	h.mu.Lock()
	h.holds = append(h.holds, x)
	h.mu.Unlock()
}

func (h *chaosHist) check(t *testing.T) {
	t.Helper()
	h.mu.Lock()
	hs := append([]chaosHold(nil), h.holds...)
	h.mu.Unlock()
	sort.Slice(hs, func(i, j int) bool { return hs[i].start < hs[j].start })
	bad := 0
	for i := range hs {
		if hs[i].lost {
			continue
		}
		for j := i + 1; j < len(hs) && hs[j].start < hs[i].end; j++ {
			if hs[j].lost || (hs[i].shared && hs[j].shared) {
				continue
			}
			bad++
			if bad <= 10 {
				t.Errorf("INVARIANT exclusion: %s [%v,%v] overlaps %s [%v,%v]",
					hs[i].who, hs[i].start, hs[i].end, hs[j].who, hs[j].start, hs[j].end)
			}
		}
	}
	t.Logf("%d holds in the history, %d overlaps", len(hs), bad)
}

func chaosPool(t *testing.T, app string, n int32) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = n
	cfg.ConnConfig.RuntimeParams["application_name"] = app
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

type chaosOpts struct {
	dur        time.Duration
	goroutines int  // per Locker
	raw        int  // raw sessions
	shared     bool // some goroutines of A take the key Shared
	terminate  bool // terminate backends of A on the key
	closeA     bool // close Locker A mid-way
	pair       bool // an Int32PairKey
	holdMax    time.Duration
	waitTO     bool // some Locks of A have WithWait
	waitA      int  // WithWaitConns of A (0: default)
	waitB      int  // WithWaitConns of B (0: default)
	noPlacesA  bool // WithMaxLocks on A: concurrent tries hit the cap, skip the places check
	optsA      []pglock.Option
	optsB      []pglock.Option
}

type chaosCounts struct {
	mu sync.Mutex
	m  map[string]int
}

func (c *chaosCounts) add(s string) {
	c.mu.Lock()
	if c.m == nil {
		c.m = map[string]int{}
	}
	c.m[s]++
	c.mu.Unlock()
}

func chaosRun(t *testing.T, o chaosOpts) {
	bg := context.Background()
	suffix := randomSuffix()
	appA, appB := "chaosA-"+suffix, "chaosB-"+suffix
	watch := pgtest.Pool(t, 3)
	lkA := muxLocker(t, chaosPool(t, appA, 2), o.optsA...)
	lkB := muxLocker(t, chaosPool(t, appB, 2), o.optsB...)
	_, keys := muxKeys(t, lkA, 1)
	k := keys[0]
	rawArgs := []any{k.Int64()}
	lockSQL, unlockSQL, handSQL := "SELECT pg_advisory_lock($1::bigint)", "SELECT pg_advisory_unlock($1::bigint)", fairHandBackSQL
	if o.pair {
		a, b := int32(rand.Uint32()), int32(rand.Uint32())
		k = pglock.Int32PairKey(a, b)
		rawArgs = []any{a, b}
		lockSQL, unlockSQL = "SELECT pg_advisory_lock($1::int, $2::int)", "SELECT pg_advisory_unlock($1::int, $2::int)"
		handSQL = `SELECT CASE WHEN NOT pg_advisory_unlock($1::int, $2::int) THEN -1
	WHEN pg_try_advisory_lock($1::int, $2::int) THEN 1
	ELSE (SELECT 2 FROM pg_advisory_lock($1::int, $2::int)) END`
	}
	if o.holdMax == 0 {
		o.holdMax = 1500 * time.Microsecond
	}
	if kb, _ := lkB.Key(k); kb != k {
		t.Fatalf("keys differ")
	}

	hist := &chaosHist{}
	var counts chaosCounts
	deadline := time.Now().Add(o.dur)
	var stop atomic.Bool
	var sessErr atomic.Value

	// sampler of sessions
	var swg sync.WaitGroup
	swg.Go(func() {
		for !stop.Load() {
			for name, lk := range map[string]*pglock.Locker{"A": lkA, "B": lkB} {
				s := lk.Stats()
				if s.Sessions > s.MaxSessions {
					sessErr.Store(fmt.Sprintf("%s: %+v", name, s))
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	})

	var wg sync.WaitGroup
	worker := func(name string, lk *pglock.Locker, id int, shared bool) {
		r := rand.New(rand.NewPCG(uint64(id), uint64(time.Now().UnixNano())))
		who := fmt.Sprintf("%s%d", name, id)
		var opts []pglock.Option
		if shared {
			who += "s"
			opts = append(opts, pglock.WithMode(pglock.Shared))
		}
		if o.waitTO && name == "A" && id%2 == 1 {
			who += "w"
			opts = append(opts, pglock.WithWait(3*time.Millisecond))
		}
		for time.Now().Before(deadline) && !stop.Load() {
			l, err := lk.NewLock(k, opts...)
			if err != nil {
				counts.add(name + " Lock: " + err.Error())
				return
			}
			var ctx context.Context
			var cancel context.CancelFunc
			switch r.IntN(4) {
			case 0:
				ctx, cancel = context.WithCancel(bg)
			case 1:
				ctx, cancel = context.WithTimeout(bg, time.Duration(r.IntN(3000))*time.Microsecond)
			case 2:
				ctx, cancel = context.WithTimeout(bg, time.Duration(r.IntN(20000))*time.Microsecond)
			default:
				ctx, cancel = context.WithCancel(bg)
				d := time.Duration(r.IntN(5000)) * time.Microsecond
				time.AfterFunc(d, cancel)
			}
			err = l.Acquire(ctx)
			if err != nil {
				cancel()
				switch {
				case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
					counts.add(name + " acquire ctx")
				case errors.Is(err, pglock.ErrLockerClosed):
					counts.add(name + " acquire closed")
					return
				default:
					counts.add(name + " acquire: " + err.Error())
				}
				if l.Held() {
					t.Errorf("%s: Acquire failed (%v) but Held", who, err)
				}
				continue
			}
			start := chaosNow()
			time.Sleep(time.Duration(r.Int64N(int64(o.holdMax))))
			end := chaosNow()
			lost := false
			select {
			case <-l.Lost():
				lost = true
			default:
			}
			rerr := l.Release(bg)
			if rerr != nil {
				if errors.Is(rerr, pglock.ErrLockLost) {
					select {
					case <-l.Lost():
					default:
						t.Errorf("%s: Release = %v but Lost() not closed", who, rerr)
					}
				}
				lost = true
				counts.add(name + " release: " + rerr.Error())
			}
			cancel()
			hist.add(chaosHold{who: who, shared: shared, start: start, end: end, lost: lost})
			counts.add(name + " held")
		}
	}
	for i := range o.goroutines {
		wg.Go(func() { worker("A", lkA, i, o.shared && i%3 == 2) })
		wg.Go(func() { worker("B", lkB, 100+i, false) })
	}
	// raw sessions, which hand back with the fair SQL
	for i := range o.raw {
		conn, err := pgx.Connect(bg, pgtest.URL(t))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.Close(bg) })
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(1000+i), 7))
			who := fmt.Sprintf("raw%d", i)
			for time.Now().Before(deadline) && !stop.Load() {
				if _, err := conn.Exec(bg, lockSQL, rawArgs...); err != nil {
					t.Errorf("%s lock: %v", who, err)
					return
				}
				for range 1 + r.IntN(3) {
					start := chaosNow()
					time.Sleep(time.Duration(r.IntN(1000)) * time.Microsecond)
					end := chaosNow()
					hist.add(chaosHold{who: who, start: start, end: end})
					if !time.Now().Before(deadline) {
						break
					}
					var x int
					if err := conn.QueryRow(bg, handSQL, rawArgs...).Scan(&x); err != nil {
						t.Errorf("%s handback: %v", who, err)
						return
					}
					if x == -1 {
						t.Errorf("%s: handback found key not held", who)
					}
				}
				if _, err := conn.Exec(bg, unlockSQL, rawArgs...); err != nil {
					t.Errorf("%s unlock: %v", who, err)
					return
				}
				time.Sleep(time.Duration(r.IntN(2000)) * time.Microsecond)
			}
		})
	}
	if o.terminate {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(99, 1))
			for time.Now().Before(deadline) && !stop.Load() {
				time.Sleep(time.Duration(20+r.IntN(60)) * time.Millisecond)
				// a backend of A on the key: waiting first (a relayed wait), else holding
				var pid int32
				err := watch.QueryRow(bg, `
					SELECT l.pid FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
					WHERE l.locktype = 'advisory' AND a.application_name = $1
					  AND l.classid = $2::oid AND l.objid = $3::oid AND l.objsubid = $4::smallint
					ORDER BY l.granted, random() LIMIT 1`, appA, int64(tag(k, 0)), int64(tag(k, 1)), tagSub(k)).Scan(&pid)
				if errors.Is(err, pgx.ErrNoRows) {
					continue
				}
				if err != nil {
					t.Errorf("terminate: %v", err)
					return
				}
				_, _ = watch.Exec(bg, "SELECT pg_terminate_backend($1)", pid)
				counts.add("terminated")
			}
		})
	}
	if o.closeA {
		wg.Go(func() {
			time.Sleep(o.dur / 2)
			if err := lkA.Close(); err != nil {
				counts.add("close A: " + err.Error())
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(o.dur + 30*time.Second):
		stop.Store(true)
		t.Errorf("workers did not finish 30 s past the end")
		<-done
	}
	stop.Store(true)
	swg.Wait()
	if s := sessErr.Load(); s != nil {
		t.Errorf("INVARIANT sessions: Sessions > MaxSessions: %v", s)
	}
	hist.check(t)
	counts.mu.Lock()
	t.Logf("counts: %v", counts.m)
	counts.mu.Unlock()
	pgtest.WaitFree(t, watch, k)
	for name, lk := range map[string]*pglock.Locker{"A": lkA, "B": lkB} {
		if o.closeA && name == "A" {
			continue
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			s := lk.Stats()
			if s.HeldKeys == 0 && s.ServerLocks == 0 && s.Queued == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("%s: Stats at the end = %+v", name, s)
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		n := pglock.DefaultWaitConns
		if name == "A" && o.waitA > 0 {
			n = o.waitA
		}
		if name == "B" && o.waitB > 0 {
			n = o.waitB
		}
		if name == "A" && o.noPlacesA {
			continue
		}
		chaosPlaces(t, lk, map[string]string{"A": appA, "B": appB}[name], watch, n)
		t.Logf("%s: Stats at the end %+v", name, lk.Stats())
	}
}

// chaosPlaces checks that all n waiting places of lk are usable: n goroutines
// wait in the server at once for n keys held elsewhere.
func chaosPlaces(t *testing.T, lk *pglock.Locker, app string, watch *pgxpool.Pool, n int) {
	t.Helper()
	bg := context.Background()
	_, keys := muxKeys(t, lk, n)
	raw := fairOutside(t)
	for _, k := range keys {
		if _, err := raw.Exec(bg, "SELECT pg_advisory_lock($1::bigint)", k.Int64()); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(bg, 20*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for _, k := range keys {
		wg.Go(func() {
			if err := lk.Do(ctx, k, func(context.Context) error { return nil }); err != nil {
				t.Errorf("places: Do = %v", err)
			}
		})
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		w := 0
		for _, k := range keys {
			w += locktest.Waiters(t, watch, k)
		}
		if w == n {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("INVARIANT places: only %d of %d waiting places in use after 5 s (Stats %+v): a place leaked", w, n, lk.Stats())
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	for _, k := range keys {
		if _, err := raw.Exec(bg, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
}

func tag(k pglock.Key, i int) uint32 {
	c, o, _ := k.LockTag()
	if i == 0 {
		return c
	}
	return o
}

func tagSub(k pglock.Key) int16 {
	_, _, s := k.LockTag()
	return int16(s)
}

func TestRelayChaos(t *testing.T) {
	chaosRun(t, chaosOpts{dur: 4 * time.Second, goroutines: 4, raw: 2})
}

func TestRelayChaosWaitConns1(t *testing.T) {
	chaosRun(t, chaosOpts{dur: 4 * time.Second, goroutines: 5, raw: 1,
		optsA: []pglock.Option{pglock.WithWaitConns(1)}, optsB: []pglock.Option{pglock.WithWaitConns(1)}, waitA: 1, waitB: 1})
}

func TestRelayShared(t *testing.T) {
	chaosRun(t, chaosOpts{dur: 4 * time.Second, goroutines: 6, raw: 1, shared: true,
		optsA: []pglock.Option{pglock.WithWaitConns(2)}, waitA: 2})
}

func TestRelayTerminate(t *testing.T) {
	chaosRun(t, chaosOpts{dur: 4 * time.Second, goroutines: 4, raw: 1, terminate: true})
}

func TestRelayClose(t *testing.T) {
	chaosRun(t, chaosOpts{dur: 3 * time.Second, goroutines: 5, raw: 1, closeA: true,
		optsA: []pglock.Option{pglock.WithWaitConns(1)}})
}

func TestRelayPairKey(t *testing.T) {
	chaosRun(t, chaosOpts{dur: 3 * time.Second, goroutines: 4, raw: 2, pair: true})
}

func TestRelayLongHoldsTerminate(t *testing.T) {
	chaosRun(t, chaosOpts{dur: 5 * time.Second, goroutines: 4, raw: 1, terminate: true, holdMax: 120 * time.Millisecond})
}

func TestRelayWaitTimeout(t *testing.T) {
	chaosRun(t, chaosOpts{dur: 3 * time.Second, goroutines: 6, raw: 1, waitTO: true,
		optsA: []pglock.Option{pglock.WithWaitConns(3)}, waitA: 3})
}

func TestRelayCloseLongHolds(t *testing.T) {
	chaosRun(t, chaosOpts{dur: 3 * time.Second, goroutines: 6, raw: 1, closeA: true, holdMax: 40 * time.Millisecond, shared: true})
}

// relayed sets up a relayed wait: goroutine G1 of Locker A waits in the
// server on the waiting connection that G0 held the key on, behind a raw
// session granted the key by G0's unlock. It returns the raw session, the
// pid of G1's waiting connection, G1's result channel and cancel.
func relaySetup(t *testing.T, lk *pglock.Locker, app string, watch *pgxpool.Pool, k pglock.Key) (*pgx.Conn, int32, chan error, context.CancelFunc) {
	t.Helper()
	bg := context.Background()
	raw := fairOutside(t)
	if _, err := raw.Exec(bg, "SELECT pg_advisory_lock($1::bigint)", k.Int64()); err != nil {
		t.Fatal(err)
	}
	if ran, err := lk.TryDo(bg, k, func(context.Context) error { return nil }); err != nil || ran {
		t.Fatalf("TryDo = %v %v", ran, err)
	}
	g0, _ := lk.NewLock(k)
	g0done := make(chan error, 1)
	go func() { g0done <- g0.Acquire(bg) }()
	chaosWaitFor(t, "G0 waits in the server", func() bool { return locktest.Waiters(t, watch, k) == 1 })
	if _, err := raw.Exec(bg, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()); err != nil {
		t.Fatal(err)
	}
	if err := <-g0done; err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(bg)
	g1done := make(chan error, 1)
	go func() {
		l, _ := lk.NewLock(k)
		err := l.Acquire(ctx)
		if err == nil {
			_ = l.Release(bg)
		}
		g1done <- err
	}()
	chaosWaitFor(t, "G1 queued in the process", func() bool { return lk.Stats().Queued == 1 })
	rawDone := make(chan error, 1)
	go func() {
		_, err := raw.Exec(bg, "SELECT pg_advisory_lock($1::bigint)", k.Int64())
		rawDone <- err
	}()
	chaosWaitFor(t, "raw waits in the server", func() bool { return locktest.Waiters(t, watch, k) == 1 })
	if err := g0.Release(bg); err != nil {
		t.Fatal(err)
	}
	if err := <-rawDone; err != nil {
		t.Fatal(err)
	}
	var pid int32
	chaosWaitFor(t, "G1's relayed wait in the server", func() bool {
		err := watch.QueryRow(bg, `SELECT l.pid FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
			WHERE l.locktype='advisory' AND NOT l.granted AND a.application_name = $1 AND l.objid = $2::oid AND l.classid = $3::oid`,
			app, int64(tag(k, 1)), int64(tag(k, 0))).Scan(&pid)
		return err == nil
	})
	return raw, pid, g1done, cancel
}

func chaosWaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func relayCase(t *testing.T, what string) {
	bg := context.Background()
	app := "chaosR-" + randomSuffix()
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, chaosPool(t, app, 2))
	_, keys := muxKeys(t, lk, 1)
	k := keys[0]
	raw, pid, g1done, cancel := relaySetup(t, lk, app, watch, k)
	defer cancel()
	switch what {
	case "terminate":
		pgtest.Terminate(t, watch, pid)
	case "close":
		go func() { _ = lk.Close() }()
	case "cancel":
		cancel()
	case "cancel+unlock":
		go cancel()
		if _, err := raw.Exec(bg, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()); err != nil {
			t.Fatal(err)
		}
	}
	var err error
	select {
	case err = <-g1done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: G1 still waiting 10 s later", what)
	}
	t.Logf("%s: G1 Acquire = %v", what, err)
	if what != "cancel+unlock" && err == nil {
		t.Errorf("%s: G1 acquired while the raw session held the key", what)
	}
	if what != "cancel+unlock" {
		// raw still holds: nothing of A may wait or hold (Acquire returns
		// after its wait's cleanup)
		hs, _ := pgtest.Holders(bg, watch, k)
		if what == "close" && len(hs) != 1 {
			// Close ends the waiting session by closing its connection
			// (after a cancel): the server drops its wait when its backend
			// reads that, which a loaded machine delays.
			deadline := time.Now().Add(10 * time.Second)
			for len(hs) != 1 && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
				hs, _ = pgtest.Holders(bg, watch, k)
			}
		}
		if len(hs) != 1 {
			t.Errorf("%s: pg_locks after G1 gave up: %+v (want the raw session's hold only)", what, hs)
		}
		if _, err := raw.Exec(bg, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()); err != nil {
			t.Fatal(err)
		}
	}
	pgtest.WaitFree(t, watch, k)
	if what != "close" {
		chaosWaitFor(t, "Locker idle", func() bool {
			s := lk.Stats()
			return s.HeldKeys == 0 && s.ServerLocks == 0 && s.Queued == 0 && s.Sessions <= s.MaxSessions
		})
		// the Locker still works
		if err := lk.Do(bg, k, func(context.Context) error { return nil }); err != nil {
			t.Errorf("%s: Do afterwards = %v", what, err)
		}
	}
}

func TestRelayedWaitTerminated(t *testing.T) {
	for range 5 {
		relayCase(t, "terminate")
	}
}
func TestRelayedWaitClose(t *testing.T) {
	for range 5 {
		relayCase(t, "close")
	}
}
func TestRelayedWaitCancel(t *testing.T) {
	for range 5 {
		relayCase(t, "cancel")
	}
}
func TestRelayedWaitCancelAtUnlock(t *testing.T) {
	for range 20 {
		relayCase(t, "cancel+unlock")
	}
}

func TestRelayManyGoroutinesMaxLocks(t *testing.T) {
	chaosRun(t, chaosOpts{dur: 4 * time.Second, goroutines: 12, raw: 2, shared: true, waitTO: true,
		optsA: []pglock.Option{pglock.WithWaitConns(2), pglock.WithMaxLocks(1)}, waitA: 2, noPlacesA: true,
		optsB: []pglock.Option{pglock.WithLockConns(1)}})
}

func TestRelayTerminateWaitConns2(t *testing.T) {
	chaosRun(t, chaosOpts{dur: 4 * time.Second, goroutines: 6, raw: 2, terminate: true, shared: true, holdMax: 20 * time.Millisecond,
		optsA: []pglock.Option{pglock.WithWaitConns(2)}, waitA: 2})
}

// A waiting connection whose session the server ended while it sat idle
// (pg_terminate_backend of every session of the Locker, as an admin or a
// restart would) does not fail the next wait: the wait's statement is
// answered at once with the end of the session, and the wait runs again on
// a new connection, and is granted when the key is let go. Before, that
// wait failed with ErrUnavailable (seen in a loaded CI run of
// TestReview24PickUnderLoad: "Locker 1 after the kills").
func TestIdleWaitingConnKilled(t *testing.T) {
	bg := context.Background()
	app := "idlewait-" + randomSuffix()
	watch := pgtest.Pool(t, 2)
	lk := muxLocker(t, chaosPool(t, app, 2))
	k := pgtest.UniqueKey(t)
	key, err := lk.Key(k)
	if err != nil {
		t.Fatal(err)
	}
	holdElsewhere := func() func() {
		c, err := watch.Acquire(bg)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(bg, "SELECT pg_advisory_lock($1::bigint)", key.Int64()); err != nil {
			t.Fatal(err)
		}
		var once sync.Once
		return func() {
			once.Do(func() {
				_, _ = c.Exec(bg, "SELECT pg_advisory_unlock($1::bigint)", key.Int64())
				c.Release()
			})
		}
	}
	// waitOnce: a Do of k that must wait for another session's hold.
	waitOnce := func() error {
		release := holdElsewhere()
		defer release()
		done := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(bg, 10*time.Second)
			defer cancel()
			done <- lk.Do(ctx, k, func(context.Context) error { return nil })
		}()
		for locktest.Waiters(t, watch, key) != 1 {
			select {
			case err := <-done:
				return fmt.Errorf("ended before the key was let go: %w", err)
			case <-time.After(2 * time.Millisecond):
			}
		}
		release()
		return <-done
	}
	if err := waitOnce(); err != nil { // leaves an idle waiting connection
		t.Fatal(err)
	}
	if s := lk.Stats(); s.IdleConns == 0 {
		t.Fatalf("no idle waiting connection after a wait: %+v", s)
	}
	if _, err := watch.Exec(bg, "SELECT pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE application_name = $1", app); err != nil {
		t.Fatal(err)
	}
	chaosWaitFor(t, "the Locker's sessions to end", func() bool {
		var n int
		err := watch.QueryRow(bg, "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1", app).Scan(&n)
		return err == nil && n == 0
	})
	if err := waitOnce(); err != nil {
		t.Fatalf("the first wait after the Locker's idle sessions were ended: %v", err)
	}
}
