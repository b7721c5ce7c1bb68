package pglock_test

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

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// term is one leader's term as its function recorded it in the database,
// with the server's clock.
type term struct {
	id            int
	started, last time.Time
}

// leaderTable makes a table of terms for one test and returns its name.
func leaderTable(t *testing.T, db *pgxpool.Pool) string {
	t.Helper()
	name := fmt.Sprintf("leader_terms_%d", rand.Uint64()>>1)
	ctx := context.Background()
	if _, err := db.Exec(ctx, "CREATE TABLE "+name+" (term bigserial PRIMARY KEY, id int NOT NULL, started timestamptz NOT NULL, last timestamptz NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = db.Exec(context.Background(), "DROP TABLE "+name) })
	return name
}

// heartbeat is a leader's function: it records a term for id and updates its
// last beat every few milliseconds while ld leads, until ctx ends, then
// returns stop(): nil ends Run, an error steps down to campaign again.
func heartbeat(db *pgxpool.Pool, table string, id int, ld *pglock.Leader, stop func() error) func(context.Context) error {
	return func(ctx context.Context) error {
		bg := context.Background()
		var tid int64
		if err := db.QueryRow(bg, "INSERT INTO "+table+" (id, started, last) VALUES ($1, clock_timestamp(), clock_timestamp()) RETURNING term", id).Scan(&tid); err != nil {
			return err
		}
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		for ld.IsLeader() {
			if _, err := db.Exec(bg, "UPDATE "+table+" SET last = clock_timestamp() WHERE term = $1", tid); err != nil {
				return err
			}
			select {
			case <-ctx.Done():
				return stop()
			case <-t.C:
			}
		}
		return stop()
	}
}

func readTerms(t *testing.T, db *pgxpool.Pool, table string) []term {
	t.Helper()
	rows, err := db.Query(context.Background(), "SELECT id, started, last FROM "+table+" ORDER BY started")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var terms []term
	for rows.Next() {
		var tm term
		if err := rows.Scan(&tm.id, &tm.started, &tm.last); err != nil {
			t.Fatal(err)
		}
		terms = append(terms, tm)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return terms
}

// checkNoOverlap fails the test when a term started before the one before it
// had its last beat.
func checkNoOverlap(t *testing.T, terms []term) {
	t.Helper()
	sort.Slice(terms, func(i, j int) bool { return terms[i].started.Before(terms[j].started) })
	for i := 1; i < len(terms); i++ {
		if prev := terms[i-1]; terms[i].started.Before(prev.last) {
			t.Errorf("term %d of leader %d started %v before the last beat of term %d of leader %d",
				i, terms[i].id, prev.last.Sub(terms[i].started), i-1, prev.id)
		}
	}
}

// Three Leaders on three pools (three replicas) campaign for one key for
// 5 s; each leader steps down after 50 to 250 ms (its function fails) and
// campaigns again. At every instant at most one believes it leads (sampled
// every 200 µs in the process, and checked in the database: no term starts
// before the previous term's last heartbeat); terms alternate among them;
// nothing is left in pg_locks.
func TestLeaderOneAtATime(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 4)
	table := leaderTable(t, watch)
	key := pgtest.UniqueKey(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	const n = 3
	leaders := make([]*pglock.Leader, n)
	var wg sync.WaitGroup
	for i := range n {
		pool := pgtest.Pool(t, 4)
		lk, err := pglock.NewLocker(pool, pglock.WithLostCheckInterval(100*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		defer lk.Close()
		ld, err := lk.Leader(key, pglock.LeaderConfig{MinBackoff: 20 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		leaders[i] = ld
		fail := errors.New("step down")
		wg.Go(func() {
			err := ld.Run(ctx, func(tctx context.Context) error {
				tctx, stop := context.WithTimeout(tctx, time.Duration(50+rand.IntN(200))*time.Millisecond)
				defer stop()
				return heartbeat(pool, table, i, ld, func() error { return fail })(tctx)
			})
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("leader %d: Run = %v, want the context's deadline", i, err)
			}
		})
	}
	var most atomic.Int32
	wg.Go(func() {
		for ctx.Err() == nil {
			c := int32(0)
			for _, ld := range leaders {
				if ld.IsLeader() {
					c++
				}
			}
			if c > most.Load() {
				most.Store(c)
			}
			time.Sleep(200 * time.Microsecond)
		}
	})
	wg.Wait()
	if m := most.Load(); m > 1 {
		t.Errorf("%d Leaders believed they led at one instant", m)
	}
	terms := readTerms(t, watch, table)
	checkNoOverlap(t, terms)
	per := make(map[int]int)
	for _, tm := range terms {
		per[tm.id]++
	}
	t.Logf("%d terms in 5 s; per leader %v; Terms() %d %d %d", len(terms), per, leaders[0].Terms(), leaders[1].Terms(), leaders[2].Terms())
	if len(per) != n || len(terms) < 10 {
		t.Errorf("terms per leader %v: want every leader elected, 10 terms at least", per)
	}
	for _, ld := range leaders {
		if ld.IsLeader() {
			t.Error("a Leader believes it leads after Run returned")
		}
	}
	pgtest.WaitFree(t, watch, leaders[0].Key())
}

// Killing the leader's backend elects another at once (the others wait in
// the server's queue), and the old leader's function sees ErrLockLost, its
// OnDeposed too, and it campaigns again; stopping the leader (cancelling its
// Run) hands over at once as well; a Leader whose function returns nil ends
// its Run; nothing is left in pg_locks.
func TestLeaderKillAndStop(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 4)
	table := leaderTable(t, watch)
	key := pgtest.UniqueKey(t)
	bg := context.Background()

	type replica struct {
		ld      *pglock.Leader
		cancel  context.CancelFunc
		elected chan time.Time
		deposed chan error
		done    chan error
	}
	const n = 3
	rs := make([]*replica, n)
	var wg sync.WaitGroup
	for i := range n {
		pool := pgtest.Pool(t, 4)
		lk, err := pglock.NewLocker(pool, pglock.WithLostCheckInterval(100*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		defer lk.Close()
		r := &replica{elected: make(chan time.Time, 16), deposed: make(chan error, 16), done: make(chan error, 1)}
		r.ld, err = lk.Leader(key, pglock.LeaderConfig{
			MinBackoff: 50 * time.Millisecond,
			OnElected:  func(context.Context) { r.elected <- time.Now() },
			OnDeposed:  func(why error) { r.deposed <- why },
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(bg)
		r.cancel = cancel
		rs[i] = r
		wg.Go(func() {
			r.done <- r.ld.Run(ctx, heartbeat(pool, table, i, r.ld, func() error { return nil }))
		})
	}
	// Every Run ends before the test does, a failed one included: the
	// cancels first, then the wait (deferred in that order, a t.Fatal hung
	// in wg.Wait with the Runs still campaigning).
	defer func() {
		for _, r := range rs {
			r.cancel()
		}
		wg.Wait()
	}()

	leader := func() *replica {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			var found *replica
			for _, r := range rs {
				if r.ld.IsLeader() {
					if found != nil {
						t.Fatal("two Leaders believe they lead")
					}
					found = r
				}
			}
			if found != nil {
				return found
			}
			time.Sleep(time.Millisecond)
		}
		t.Fatal("no leader within 5 s")
		return nil
	}
	// nextElected waits for a replica other than prev to be elected.
	nextElected := func(t *testing.T, prev *replica, after string) (*replica, time.Time) {
		t.Helper()
		deadline := time.After(3 * time.Second)
		for {
			for _, r := range rs {
				if r == prev {
					continue
				}
				select {
				case at := <-r.elected:
					return r, at
				default:
				}
			}
			select {
			case <-deadline:
				t.Fatalf("no new leader within 3 s of %s", after)
			case <-time.After(time.Millisecond):
			}
		}
	}
	first := leader()
	<-first.elected
	// The two others wait in the server's queue before the kill: on a
	// loaded machine a Locker's start (its connection, the server's table
	// size, its self-test) can take longer than the killed leader's
	// backoff, and the killed leader would win its key again.
	locktest.WaitFor(t, "the two other Leaders to wait in the server", func() bool {
		return locktest.Waiters(t, watch, first.ld.Key()) == n-1
	})

	// Kill the leader's lock connection.
	killed := time.Now()
	pgtest.Terminate(t, watch, pgtest.Granted(t, watch, first.ld.Key())[0].PID)
	select {
	case why := <-first.deposed:
		if !errors.Is(why, pglock.ErrLockLost) {
			t.Errorf("OnDeposed after the kill = %v, want ErrLockLost", why)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the killed leader was not deposed within 3 s")
	}
	next, electedAt := nextElected(t, first, "the kill")
	t.Logf("a new leader was elected %v after the old one's backend was killed", electedAt.Sub(killed).Round(time.Millisecond))
	if d := electedAt.Sub(killed); d > time.Second {
		t.Errorf("new leader %v after the kill, want within 1 s", d)
	}

	// Stop the new leader: its Run returns the context's error and another
	// takes over at once.
	stopped := time.Now()
	next.cancel()
	if err := <-next.done; !errors.Is(err, context.Canceled) {
		t.Errorf("Run after its context was cancelled = %v, want context.Canceled", err)
	}
	_, electedAt = nextElected(t, next, "the stop")
	t.Logf("a new leader was elected %v after the leader was stopped", electedAt.Sub(stopped).Round(time.Millisecond))
	if d := electedAt.Sub(stopped); d > time.Second {
		t.Errorf("new leader %v after the stop, want within 1 s", d)
	}
	for _, r := range rs {
		r.cancel()
	}
	wg.Wait()
	terms := readTerms(t, watch, table)
	if len(terms) >= 2 {
		// The killed term may end a moment after the next began (see Leader):
		// measured, not asserted.
		t.Logf("the killed term's last beat was %v after the next term began", terms[0].last.Sub(terms[1].started))
	}
	checkNoOverlap(t, terms[1:])
	pgtest.WaitFree(t, watch, first.ld.Key())
}

// A function that returns nil ends Run (a one-shot job); Run refuses a
// second concurrent Run, a nil function and a bad configuration.
func TestLeaderRunOnceAndErrors(t *testing.T) {
	t.Parallel()
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	lk, err := pglock.NewLocker(pgtest.Pool(t, 4))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	key := pgtest.UniqueKey(t)
	ld, err := lk.Leader(key, pglock.LeaderConfig{})
	if err != nil {
		t.Fatal(err)
	}
	runs := 0
	entered := make(chan struct{})
	release := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		err := ld.Run(bg, func(ctx context.Context) error {
			runs++
			close(entered)
			<-release
			return nil
		})
		if err != nil {
			t.Errorf("Run whose function returned nil = %v", err)
		}
	})
	<-entered
	if err := ld.Run(bg, func(context.Context) error { return nil }); !errors.Is(err, pglock.ErrLeaderRunning) {
		t.Errorf("a second Run = %v, want ErrLeaderRunning", err)
	}
	if len(pgtest.Granted(t, watch, ld.Key())) != 1 {
		t.Error("the leader's lock is not in pg_locks during its term")
	}
	close(release)
	wg.Wait()
	if runs != 1 || ld.IsLeader() || ld.Terms() != 1 {
		t.Errorf("runs %d, IsLeader %v, Terms %d after a one-shot Run; want 1, false, 1", runs, ld.IsLeader(), ld.Terms())
	}
	pgtest.WaitFree(t, watch, ld.Key())

	if err := ld.Run(bg, nil); !errors.Is(err, pglock.ErrNilFunc) {
		t.Errorf("Run(nil) = %v, want ErrNilFunc", err)
	}
	if _, err := lk.Leader(key, pglock.LeaderConfig{MinBackoff: -1}); !errors.Is(err, pglock.ErrInvalidOption) {
		t.Errorf("a negative backoff = %v, want ErrInvalidOption", err)
	}
	if _, err := lk.Leader(key, pglock.LeaderConfig{MinBackoff: time.Second, MaxBackoff: time.Millisecond}); !errors.Is(err, pglock.ErrInvalidOption) {
		t.Errorf("MaxBackoff below MinBackoff = %v, want ErrInvalidOption", err)
	}
	if _, err := lk.Leader(struct{}{}, pglock.LeaderConfig{}); !errors.Is(err, pglock.ErrInvalidKey) {
		t.Errorf("a bad key = %v, want ErrInvalidKey", err)
	}
	// A cancelled context while campaigning returns at once.
	other, _ := lk.Leader(key+"-busy", pglock.LeaderConfig{})
	hold, _ := pglock.NewLock(watch, other.Key())
	if err := hold.Acquire(bg); err != nil {
		t.Fatal(err)
	}
	defer hold.Release(bg)
	ctx, cancel := context.WithTimeout(bg, 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := other.Run(ctx, func(context.Context) error { t.Error("ran without the lock"); return nil }); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Run campaigning on a held key until its deadline = %v", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("Run took %v to return after its context ended", took)
	}
}

// Campaigning Leaders do not use up a Locker's waiting connections: with six
// Leaders (of six elections) campaigning on a Locker allowed two waits, a blocking Acquire of a
// busy key still waits in the server's queue and gets the key when it is
// freed. A Run on a closed Locker ends at once with ErrLockerClosed.
func TestLeaderCampaignsDoNotStarveWaits(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	watch := pgtest.Pool(t, 2)
	lk, err := pglock.NewLocker(pgtest.Pool(t, 4), pglock.WithWaitConns(2))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	others := pgtest.Pool(t, 8) // the other process: one connection per key it leads
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel() // before the Wait: the campaigns end with ctx
	for i := range 6 {
		// Six elections (six keys), each led by another process: every
		// Leader here campaigns, each in the server's queue.
		leaderKey := fmt.Sprintf("%s-%d", pgtest.UniqueKey(t), i)
		other, _ := pglock.NewLock(others, mustKey(t, leaderKey))
		if err := other.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		defer other.Release(context.Background())
		ld, err := lk.Leader(leaderKey, pglock.LeaderConfig{})
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() { _ = ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) })
	}
	time.Sleep(300 * time.Millisecond) // the campaigns are waiting

	busyKey := pgtest.UniqueKey(t) + "-busy"
	holder, _ := pglock.NewLock(watch, mustKey(t, busyKey))
	if err := holder.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(300*time.Millisecond, func() { _ = holder.Release(context.Background()) })
	l, _ := lk.NewLock(busyKey)
	actx, acancel := context.WithTimeout(ctx, 5*time.Second)
	defer acancel()
	start := time.Now()
	if err := l.Acquire(actx); err != nil {
		t.Fatalf("Acquire of a busy key while six Leaders campaign = %v (stats %+v)", err, lk.Stats())
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Acquire took %v, want the key soon after its holder let it go (300 ms)", took)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	cancel()
	wg.Wait()

	closed, err := pglock.NewLocker(pgtest.Pool(t, 2))
	if err != nil {
		t.Fatal(err)
	}
	ld, err := closed.Leader(pgtest.UniqueKey(t), pglock.LeaderConfig{})
	if err != nil {
		t.Fatal(err)
	}
	_ = closed.Close()
	rctx, rcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer rcancel()
	start = time.Now()
	if err := ld.Run(rctx, func(context.Context) error { return nil }); !errors.Is(err, pglock.ErrLockerClosed) {
		t.Errorf("Run on a closed Locker = %v, want ErrLockerClosed", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("Run on a closed Locker took %v to return", took)
	}
}

// A leader cut off by a silent network (its connections blackholed) stops
// believing it leads within twice the check interval; the server frees its
// lock within AbandonedSessionTimeout, and only then is another replica
// elected: at no instant do two believe they lead.
func TestLeaderPartition(t *testing.T) {
	t.Parallel()
	const interval = 200 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	proxy, cutPool := faultProxyPool(t, 4)
	defer proxy.Restore()
	key := pgtest.UniqueKey(t)

	type replica struct {
		ld      *pglock.Leader
		elected chan time.Time
		deposed chan time.Time
	}
	mk := func(pool *pgxpool.Pool) *replica {
		lk, err := pglock.NewLocker(pool, pglock.WithLostCheckInterval(interval), pglock.WithReleaseTimeout(time.Second))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = lk.Close() })
		r := &replica{elected: make(chan time.Time, 4), deposed: make(chan time.Time, 4)}
		r.ld, err = lk.Leader(key, pglock.LeaderConfig{
			MinBackoff: time.Hour, // the cut-off replica does not campaign again during the test
			OnElected:  func(context.Context) { r.elected <- time.Now() },
			OnDeposed:  func(error) { r.deposed <- time.Now() },
		})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	a := mk(cutPool)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Go(func() { _ = a.ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) })
	select {
	case <-a.elected:
	case <-time.After(5 * time.Second):
		t.Fatal("the first replica was not elected")
	}
	b := mk(pgtest.Pool(t, 4))
	wg.Go(func() { _ = b.ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) })
	time.Sleep(300 * time.Millisecond) // b campaigns in the server's queue; a's watch runs

	var both atomic.Bool
	sampling := make(chan struct{})
	wg.Go(func() {
		for {
			select {
			case <-sampling:
				return
			default:
			}
			if a.ld.IsLeader() && b.ld.IsLeader() {
				both.Store(true)
			}
			time.Sleep(100 * time.Microsecond)
		}
	})
	cut := time.Now()
	proxy.Blackhole()
	var deposedAt, electedAt time.Time
	select {
	case deposedAt = <-a.deposed:
	case <-time.After(3 * time.Second):
		t.Fatal("the cut-off leader was not deposed within 3 s")
	}
	select {
	case electedAt = <-b.elected:
	case <-time.After(pglock.AbandonedSessionTimeout + 5*time.Second):
		t.Fatal("no new leader within the abandoned-session bound")
	}
	close(sampling)
	t.Logf("cut-off leader deposed %v after the cut; new leader elected %v after it",
		deposedAt.Sub(cut).Round(time.Millisecond), electedAt.Sub(cut).Round(time.Millisecond))
	if d := deposedAt.Sub(cut); d > 2*interval+300*time.Millisecond {
		t.Errorf("deposed %v after the cut, want within 2 x %v", d, interval)
	}
	if !electedAt.After(deposedAt) {
		t.Error("the new leader was elected before the cut-off one stepped down")
	}
	if d := electedAt.Sub(cut); d > pglock.AbandonedSessionTimeout+time.Second {
		t.Errorf("new leader %v after the cut, want within AbandonedSessionTimeout (%v)", d, pglock.AbandonedSessionTimeout)
	}
	if both.Load() {
		t.Error("two replicas believed they led at one instant")
	}
}
