package pglock_test

// History check (issue 19): several Lockers, each on its own pool as separate
// processes would be, contend for a few keys with every kind of call while
// backends are terminated, a proxied network is cut, contexts are cancelled
// and a Locker is closed and replaced. Every grant is logged with its
// interval on one monotonic clock; afterwards, with every goroutine done, the
// log is checked: no two exclusive holds of a key overlap, no shared hold
// overlaps an exclusive one, and nothing is left in pg_locks. The verdict is
// a function of the log alone.
//
// A hold's interval is a subset of the server's: it starts when Acquire or
// TryAcquire returned (or Do's function started), after the server granted
// the lock, and ends just before Release is called (or the function
// returns), before the server unlocks. A hold whose Lost() closed ends when
// the holder saw it close. A hold that lost its connection was over on the
// server before its client could know, so it may overlap a later holder: the
// check allows that only to holds that were reported lost (Lost() closed, or
// Release or Do returned ErrLockLost), and only within the documented loss
// bound (a silent connection is noticed within twice the lost-check
// interval). A hold that was never reported lost overlapping a conflicting
// hold fails the test.
//
// PGLOCK_HISTORY_OPS=n runs n operations (default 8000, 2000 with -short)
// and lifts the run's time cap (12 s by default, 5 s with -short).

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pglockkit/kit/internal/faultproxy"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

const (
	histKeys        = 4
	histWorkersProc = 4
	// histLossBound is the documented bound within which a holder learns
	// that its connection was lost: at once for a connection the server
	// closes, within twice the lost-check interval for a silent one.
	histLossBound = 2 * pglock.DefaultLostCheckInterval
)

// histHold is one successful grant.
type histHold struct {
	key   int
	mode  pglock.Mode
	proc  int    // which Locker slot
	gen   int    // which Locker of the slot (1 after the replacement)
	op    string // acquire, try, do, trydo, lkdo, lktrydo
	start time.Duration
	end   time.Duration // min(release called / fn returned, Lost() seen)
	// lost: Lost() closed (before the end, or by the time Release returned),
	// Do's context ended with ErrLockLost, or Release or Do returned
	// ErrLockLost.
	lost     bool
	lostSeen bool   // the end is the moment Lost() (or the ErrLockLost cause) was seen
	err      string // what Release or Do returned, for the report
}

func (h histHold) String() string {
	lost := "held"
	switch {
	case h.lostSeen:
		lost = "lost (seen at end)"
	case h.lost:
		lost = "lost (told at release)"
	}
	return fmt.Sprintf("proc %d gen %d %s %s [%v, %v] (%v) %s, returned %q", h.proc, h.gen, h.op, h.mode,
		h.start, h.end, h.end-h.start, lost, h.err)
}

// histFault is one injected fault; at is when it was issued.
type histFault struct {
	kind string // terminate, cut, close
	proc int
	at   time.Duration
}

// histProc is one "process": a pool and its current Locker.
type histProc struct {
	idx   int
	name  string // application_name of its connections
	db    any
	opts  []pglock.Option
	proxy *faultproxy.Proxy // nil unless its network can be cut
	mu    sync.Mutex
	cur   *pglock.Locker
	gen   int
	all   []*pglock.Locker
}

func (p *histProc) locker() (*pglock.Locker, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cur, p.gen
}

// histCounts are the outcomes of the operations, for the log.
type histCounts struct {
	mu sync.Mutex
	m  map[string]int
	// samples of unexpected errors
	odd []string
}

func (c *histCounts) add(what string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m[what]++
}

func (c *histCounts) err(what string, err error) {
	kind := "other"
	switch {
	case errors.Is(err, pglock.ErrLockerClosed):
		kind = "closed"
	case errors.Is(err, pglock.ErrLockLost):
		kind = "lost"
	case errors.Is(err, pglock.ErrNotAcquired) && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)):
		kind = "ctx"
	case errors.Is(err, pglock.ErrUnavailable):
		kind = "unavailable"
	case errors.Is(err, pglock.ErrNotAcquired):
		kind = "notacquired"
	case errors.Is(err, errHistFn):
		kind = "fnerr"
	case errors.Is(err, errHistFnCtx):
		kind = "fnctx"
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m[what+" err "+kind]++
	if (kind == "other" || kind == "notacquired") && len(c.odd) < 8 {
		c.odd = append(c.odd, what+": "+err.Error())
	}
}

var (
	errHistFn    = errors.New("history: fn failed on purpose")
	errHistFnCtx = errors.New("history: fn's context ended")
)

var histOpNames = []string{"acquire", "try", "do", "trydo", "lkdo", "lktrydo"}

func histOps(t *testing.T) (ops int, limit time.Duration) {
	ops, limit = 8000, 12*time.Second
	if testing.Short() {
		ops, limit = 2000, 5*time.Second
	}
	if s := os.Getenv("PGLOCK_HISTORY_OPS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("PGLOCK_HISTORY_OPS=%q: want a positive integer", s)
		}
		ops, limit = n, 10*time.Minute
	}
	return ops, limit
}

func TestHistory(t *testing.T) {
	t.Parallel()
	budget, limit := histOps(t)
	seed := rand.Uint64()
	t.Logf("seed %d, %d operations, time cap %v", seed, budget, limit)
	bg := context.Background()
	base := time.Now()
	now := func() time.Duration { return time.Since(base) } // monotonic
	run := randomSuffix()[:8]
	watch := pgtest.Pool(t, 3)

	names := make([]string, histKeys)
	keys := make([]pglock.Key, histKeys)
	for i := range names {
		names[i] = pgtest.UniqueKey(t)
		k, err := pglock.KeyOf(names[i])
		if err != nil {
			t.Fatal(err)
		}
		keys[i] = k
	}

	// Three processes: a pool with the default connections; a pool behind a
	// fault proxy on one lock connection and one waiting connection; a
	// *sql.DB (pgx's stdlib) on three lock connections and two waiting ones.
	procs := make([]*histProc, 3)
	appName := func(i int) string { return fmt.Sprintf("pglock-hist-%s-%d", run, i) }
	{
		cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
		if err != nil {
			t.Fatal(err)
		}
		cfg.MaxConns = 4
		cfg.ConnConfig.RuntimeParams["application_name"] = appName(0)
		pool, err := pgxpool.NewWithConfig(bg, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pool.Close)
		procs[0] = &histProc{idx: 0, name: appName(0), db: pool}
	}
	{
		cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
		if err != nil {
			t.Fatal(err)
		}
		p := faultProxy(t, cfg.ConnConfig)
		cfg.MaxConns = 4
		cfg.ConnConfig.RuntimeParams["application_name"] = appName(1)
		pool, err := pgxpool.NewWithConfig(bg, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pool.Close)
		procs[1] = &histProc{idx: 1, name: appName(1), db: pool, proxy: p,
			opts: []pglock.Option{pglock.WithLockConns(1), pglock.WithWaitConns(1)}}
	}
	{
		cfg, err := pgx.ParseConfig(pgtest.URL(t))
		if err != nil {
			t.Fatal(err)
		}
		cfg.RuntimeParams["application_name"] = appName(2)
		db := stdlib.OpenDB(*cfg)
		db.SetMaxOpenConns(4)
		t.Cleanup(func() { db.Close() })
		procs[2] = &histProc{idx: 2, name: appName(2), db: db,
			opts: []pglock.Option{pglock.WithLockConns(3), pglock.WithWaitConns(2)}}
	}
	for _, p := range procs {
		lk, err := pglock.NewLocker(p.db, p.opts...)
		if err != nil {
			t.Fatal(err)
		}
		p.cur, p.all = lk, []*pglock.Locker{lk}
	}
	t.Cleanup(func() {
		for _, p := range procs {
			for _, lk := range p.all {
				_ = lk.Close()
			}
		}
	})

	counts := &histCounts{m: map[string]int{}}
	var (
		ops       atomic.Int64 // operations started (and stop attempts)
		opsDone   atomic.Int64 // operations run
		inHold    atomic.Int64
		maxInHold atomic.Int64
		cancels   atomic.Int64
	)
	stopAt := time.Now().Add(limit)
	more := func() bool { return ops.Add(1) <= int64(budget) && time.Now().Before(stopAt) }
	enter := func() {
		n := inHold.Add(1)
		for {
			m := maxInHold.Load()
			if n <= m || maxInHold.CompareAndSwap(m, n) {
				return
			}
		}
	}

	// opCtx gives an operation its context: mostly a generous deadline, some
	// short or already over, some cancelled at a random moment.
	opCtx := func(rng *rand.Rand) (context.Context, context.CancelFunc) {
		switch r := rng.IntN(100); {
		case r < 50:
			return context.WithTimeout(bg, time.Duration(50+rng.IntN(450))*time.Millisecond)
		case r < 70:
			return context.WithTimeout(bg, time.Duration(rng.IntN(5000))*time.Microsecond)
		case r < 75:
			ctx, cancel := context.WithCancel(bg)
			cancel()
			return ctx, cancel
		default:
			ctx, cancel := context.WithTimeout(bg, 2*time.Second)
			timer := time.AfterFunc(time.Duration(rng.IntN(10000))*time.Microsecond, func() {
				cancels.Add(1)
				cancel()
			})
			return ctx, func() { timer.Stop(); cancel() }
		}
	}
	holdTime := func(rng *rand.Rand) time.Duration {
		if rng.IntN(10) == 0 {
			return 0
		}
		return time.Duration(rng.IntN(10000)) * time.Microsecond
	}
	// hold waits d, or until lost closes or ctx ends; it reports whether
	// lost closed (or ctx ended with cause ErrLockLost) and whether ctx ended.
	hold := func(d time.Duration, lost <-chan struct{}, ctx context.Context) (lostSeen, ctxEnded bool) {
		timer := time.NewTimer(d)
		defer timer.Stop()
		select {
		case <-timer.C:
			return false, false
		case <-lost:
			return true, false
		case <-ctx.Done():
			return errors.Is(context.Cause(ctx), pglock.ErrLockLost), true
		}
	}
	closed := func(ch <-chan struct{}) bool {
		select {
		case <-ch:
			return true
		default:
			return false
		}
	}

	worker := func(p *histProc, rng *rand.Rand) []histHold {
		var holds []histHold
		for more() {
			lk, gen := p.locker()
			k := rng.IntN(histKeys)
			mode := pglock.Exclusive
			if rng.IntN(10) < 4 {
				mode = pglock.Shared
			}
			op := histOpNames[rng.IntN(len(histOpNames))]
			if strings.HasPrefix(op, "lk") {
				mode = pglock.Exclusive // the Locker's default mode
			}
			counts.add(op)
			opsDone.Add(1)
			h := histHold{key: k, mode: mode, proc: p.idx, gen: gen, op: op}
			d := holdTime(rng)
			ctx, cancel := opCtx(rng)
			var l *pglock.Lock
			if !strings.HasPrefix(op, "lk") {
				var err error
				if l, err = lk.NewLock(names[k], pglock.WithMode(mode)); err != nil {
					counts.err(op+" lock", err)
					cancel()
					continue
				}
			}
			switch op {
			case "acquire", "try":
				if op == "acquire" {
					if err := l.Acquire(ctx); err != nil {
						counts.err(op, err)
						cancel()
						continue
					}
				} else {
					ok, err := l.TryAcquire(ctx)
					if err != nil {
						counts.err(op, err)
					}
					if !ok {
						if err == nil {
							counts.add(op + " busy")
						}
						cancel()
						continue
					}
				}
				h.start = now()
				enter()
				lost := l.Lost()
				h.lostSeen, _ = hold(d, lost, bg)
				h.end = now()
				inHold.Add(-1)
				rctx := bg
				if rng.IntN(5) == 0 {
					rctx = ctx // maybe ended: Release must still unlock
				}
				err := l.Release(rctx)
				if err != nil {
					counts.err(op+" release", err)
					h.err = err.Error()
				}
				// Close ends the Locker's sessions: a hold it ended is lost.
				h.lost = h.lostSeen || closed(lost) || errors.Is(err, pglock.ErrLockLost) || errors.Is(err, pglock.ErrLockerClosed)
				if l.Held() {
					t.Errorf("%s: Held() after Release (%v)", h, err)
				}
			default:
				ran := false
				var lost <-chan struct{} // nil for the Locker's Do: its context tells
				fn := func(fctx context.Context) error {
					ran = true
					h.start = now()
					enter()
					if l != nil {
						lost = l.Lost()
					}
					var ended bool
					h.lostSeen, ended = hold(d, lost, fctx)
					h.end = now()
					inHold.Add(-1)
					if ended {
						return fmt.Errorf("%w: %w", errHistFnCtx, fctx.Err())
					}
					if rng.IntN(10) == 0 {
						return errHistFn
					}
					return nil
				}
				var err error
				switch op {
				case "do":
					err = l.Do(ctx, fn)
				case "trydo":
					var ok bool
					if ok, err = l.TryDo(ctx, fn); !ok && err == nil {
						counts.add(op + " busy")
					}
				case "lkdo":
					err = lk.Do(ctx, names[k], fn)
				case "lktrydo":
					var ok bool
					if ok, err = lk.TryDo(ctx, names[k], fn); !ok && err == nil {
						counts.add(op + " busy")
					}
				}
				if err != nil {
					counts.err(op, err)
				}
				if !ran {
					cancel()
					continue
				}
				h.lost = h.lostSeen || closed(lost) || errors.Is(err, pglock.ErrLockLost) || errors.Is(err, pglock.ErrLockerClosed)
				if err != nil {
					h.err = err.Error()
				}
			}
			cancel()
			holds = append(holds, h)
		}
		return holds
	}

	// Faults: terminate a backend of a process (one that holds an advisory
	// lock, mostly), cut the proxied process's network, and once, half way,
	// close a Locker and replace it.
	var (
		faults   []histFault
		faultErr []string
		sessions = make([]int, len(procs)) // most server sessions seen per process
	)
	workersDone := make(chan struct{})
	faulter := func(rng *rand.Rand) {
		closeDone := false
		for {
			select {
			case <-workersDone:
				return
			case <-time.After(time.Duration(20+rng.IntN(60)) * time.Millisecond):
			}
			if !closeDone && (ops.Load() >= int64(budget)/2 || time.Now().After(stopAt.Add(-limit/2))) {
				closeDone = true
				p := procs[0]
				faults = append(faults, histFault{kind: "close", proc: 0, at: now()})
				p.mu.Lock()
				old := p.cur
				_ = old.Close()
				lk, err := pglock.NewLocker(p.db, p.opts...)
				if err != nil {
					faultErr = append(faultErr, "replace the closed Locker: "+err.Error())
					p.mu.Unlock()
					continue
				}
				p.cur, p.gen, p.all = lk, p.gen+1, append(p.all, lk)
				p.mu.Unlock()
				continue
			}
			if rng.IntN(4) == 0 {
				faults = append(faults, histFault{kind: "cut", proc: 1, at: now()})
				procs[1].proxy.Cut()
				continue
			}
			p := procs[rng.IntN(len(procs))]
			rows, err := watch.Query(bg, `
				SELECT a.pid, EXISTS (SELECT 1 FROM pg_catalog.pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory')
				FROM pg_catalog.pg_stat_activity a WHERE a.application_name = $1`, p.name)
			if err != nil {
				faultErr = append(faultErr, "list backends: "+err.Error())
				continue
			}
			var pick []int32
			var pid int32
			var locks bool
			n := 0
			_, err = pgx.ForEachRow(rows, []any{&pid, &locks}, func() error {
				n++
				if locks || rng.IntN(4) == 0 {
					pick = append(pick, pid)
				}
				return nil
			})
			if err != nil {
				faultErr = append(faultErr, "list backends: "+err.Error())
				continue
			}
			sessions[p.idx] = max(sessions[p.idx], n)
			if len(pick) == 0 {
				continue
			}
			pid = pick[rng.IntN(len(pick))]
			at := now()
			var ok bool
			if err := watch.QueryRow(bg, "SELECT pg_terminate_backend($1)", pid).Scan(&ok); err != nil {
				faultErr = append(faultErr, "terminate: "+err.Error())
				continue
			}
			if ok {
				faults = append(faults, histFault{kind: "terminate", proc: p.idx, at: at})
			}
		}
	}

	start := time.Now()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var holds []histHold
	for w := range histWorkersProc * len(procs) {
		rng := rand.New(rand.NewPCG(seed, uint64(w)))
		p := procs[w%len(procs)]
		wg.Go(func() {
			hs := worker(p, rng)
			mu.Lock()
			holds = append(holds, hs...)
			mu.Unlock()
		})
	}
	var fwg sync.WaitGroup
	fwg.Go(func() { faulter(rand.New(rand.NewPCG(seed, 1<<32))) })
	wg.Wait()
	close(workersDone)
	fwg.Wait()
	ran := time.Since(start)

	// The check, on the log alone.
	bad, lostOverlaps := 0, 0
	var maxLostOverlap time.Duration
	var unexplained int
	badKinds := map[string]int{}
	for k := range histKeys {
		var hs []histHold
		for _, h := range holds {
			if h.key == k {
				hs = append(hs, h)
			}
		}
		slices.SortFunc(hs, func(a, b histHold) int { return int(a.start - b.start) })
		for i, a := range hs {
			for _, b := range hs[i+1:] {
				if b.start >= a.end {
					break // sorted by start: no later hold overlaps a
				}
				if a.mode == pglock.Shared && b.mode == pglock.Shared {
					continue
				}
				overlap := min(a.end, b.end) - b.start
				if overlap <= 0 {
					continue
				}
				// A hold reported lost may overlap a later holder within the
				// loss bound. Which was granted first on the server is not
				// known (a grant is seen by its client a moment later), so
				// either may be the lost one.
				if (a.lost || b.lost) && overlap <= histLossBound {
					lostOverlaps++
					maxLostOverlap = max(maxLostOverlap, overlap)
					explained := func(l histHold) bool {
						return l.lost && slices.ContainsFunc(faults, func(f histFault) bool {
							return f.proc == l.proc && f.at >= l.start-histLossBound && f.at <= min(a.end, b.end)
						})
					}
					if !explained(a) && !explained(b) {
						unexplained++
					}
					continue
				}
				bad++
				kind := "exclusive/exclusive"
				if a.mode == pglock.Shared || b.mode == pglock.Shared {
					kind = "shared/exclusive"
				}
				badKinds[kind]++
				if bad <= 10 {
					why := "neither hold was reported lost"
					if a.lost || b.lost {
						why = fmt.Sprintf("beyond the loss bound %v", histLossBound)
					}
					var near []string
					for _, f := range faults {
						if f.at >= a.start-200*time.Millisecond && f.at <= b.end {
							near = append(near, fmt.Sprintf("%s proc %d at %v", f.kind, f.proc, f.at))
						}
					}
					t.Errorf("key %d: %s holds overlap by %v (%s):\n\t%s\n\t%s\n\tfaults from 200 ms before: %v",
						k, kind, overlap, why, a, b, near)
				}
			}
		}
	}
	if bad > 0 {
		t.Errorf("%d overlapping pairs of conflicting holds in all: %v", bad, badKinds)
	}

	// Nothing held or waiting is left: in the Lockers, then in the server
	// while the Lockers are still open, then after they close.
	for _, p := range procs {
		for _, lk := range p.all {
			deadline := time.Now().Add(5 * time.Second)
			for {
				s := lk.Stats()
				if s.HeldKeys == 0 && s.Queued == 0 && s.ServerLocks == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Errorf("%s: Locker still holds or waits after every operation returned: %+v", p.name, s)
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}
	var stats []string
	for _, p := range procs {
		s := p.cur.Stats()
		stats = append(stats, fmt.Sprintf("%s lockconns %d waitconns %d", p.name[len(p.name)-1:], s.LockConns, s.WaitConns))
		for _, lk := range p.all {
			if err := lk.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		}
	}
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}

	// The run's size.
	lost, lostSeen, shared := 0, 0, 0
	perOp := map[string]int{}
	for _, h := range holds {
		perOp[h.op]++
		if h.lost {
			lost++
		}
		if h.lostSeen {
			lostSeen++
		}
		if h.mode == pglock.Shared {
			shared++
		}
	}
	perFault := map[string]int{}
	for _, f := range faults {
		perFault[f.kind]++
	}
	t.Logf("%d operations by %d goroutines of %d processes on %d keys in %v (%.0f/s), %d grants (%d shared) by op %v",
		opsDone.Load(), histWorkersProc*len(procs), len(procs), histKeys, ran.Round(time.Millisecond),
		float64(opsDone.Load())/ran.Seconds(), len(holds), shared, perOp)
	t.Logf("faults: %v, %d context cancels fired; %d grants lost (%d seen during the hold)", perFault, cancels.Load(), lost, lostSeen)
	t.Logf("max concurrent holds %d; overlaps of lost holds within the loss bound: %d (max %v, %d without an injected fault on that process just before)",
		maxInHold.Load(), lostOverlaps, maxLostOverlap, unexplained)
	t.Logf("outcomes: %v", counts.m)
	t.Logf("connections at the end: %v; most server sessions seen per process (pool included): %v", stats, sessions)
	for _, s := range counts.odd {
		t.Logf("unexpected error: %s", s)
	}
	for i, s := range faultErr {
		if i < 5 {
			t.Logf("fault injection: %s", s)
		}
	}
	if len(holds) == 0 {
		t.Error("no grant at all: the run checked nothing")
	}
}
