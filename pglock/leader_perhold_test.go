package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"net/url"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// perHoldLockers are the Lockers whose Leader holds its key on a
// connection of the caller's pool, one per hold, and a *sql.DB Locker that
// multiplexes: each is made on a pool of its own whose connections carry
// the application_name app, and no more than 2 connections (one for the
// campaign, one for CurrentLeader's reads).
var perHoldLockers = []struct {
	name string
	make func(t *testing.T, app string) *pglock.Locker
}{
	{"pgxpool WithMultiplexing(false)", func(t *testing.T, app string) *pglock.Locker {
		cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
		if err != nil {
			t.Fatal(err)
		}
		cfg.MaxConns = 2
		cfg.ConnConfig.RuntimeParams["application_name"] = app
		pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pool.Close)
		return perHoldLocker(t, pool, pglock.WithMultiplexing(false))
	}},
	{"sql.DB pgx WithMultiplexing(false)", func(t *testing.T, app string) *pglock.Locker {
		return perHoldLocker(t, appSQLDB(t, app), pglock.WithMultiplexing(false))
	}},
	{"sql.DB pgx multiplexing", func(t *testing.T, app string) *pglock.Locker {
		return perHoldLocker(t, appSQLDB(t, app))
	}},
	{"sql.DB another driver", func(t *testing.T, app string) *pglock.Locker {
		u, err := url.Parse(pgtest.URL(t))
		if err != nil {
			t.Fatal(err)
		}
		q := u.Query()
		q.Set("application_name", app)
		u.RawQuery = q.Encode()
		registerHidden.Do(func() { sql.Register("review2-other", hiddenDriver{stdlib.GetDefaultDriver()}) })
		db, err := sql.Open("review2-other", u.String())
		if err != nil {
			t.Fatal(err)
		}
		db.SetMaxOpenConns(2)
		t.Cleanup(func() { db.Close() })
		return perHoldLocker(t, db)
	}},
}

func perHoldLocker(t *testing.T, db any, opts ...pglock.Option) *pglock.Locker {
	t.Helper()
	lk, err := pglock.NewLocker(db, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	return lk
}

// appSQLDB is a *sql.DB on pgx's driver whose connections carry the
// application_name app, with 2 connections at most.
func appSQLDB(t *testing.T, app string) *sql.DB {
	t.Helper()
	cfg, err := pgx.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["application_name"] = app
	db := stdlib.OpenDB(*cfg)
	db.SetMaxOpenConns(2)
	t.Cleanup(func() { db.Close() })
	return db
}

// sessionsNamed returns the pids of the sessions whose application_name is
// app.
func sessionsNamed(t *testing.T, watch *pgxpool.Pool, app string) []int32 {
	t.Helper()
	rows, err := watch.Query(context.Background(), "SELECT pid FROM pg_catalog.pg_stat_activity WHERE application_name = $1 ORDER BY pid", app)
	if err != nil {
		t.Fatal(err)
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		t.Fatal(err)
	}
	return pids
}

// Issue 25. A Leader of a Locker that holds its key on a pool connection
// (WithMultiplexing(false) on a pgxpool.Pool or a *sql.DB, or a *sql.DB
// whose driver is not pgx's) and of a *sql.DB Locker that multiplexes
// carries its identity as the rest do: while it campaigns and leads, its
// session is named with it, so CurrentLeader (of either replica) and
// OnNewLeader name the leader, not the pool's application_name; once a
// campaign or term is over, the pool connection it used is back in the pool
// (the same session, not destroyed, on a Locker that does not multiplex)
// with the pool's application_name, and no session carries the identity.
func TestLeaderIdentityPerHold(t *testing.T) {
	for _, c := range perHoldLockers {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			testLeaderIdentityPerHold(t, c.make)
		})
	}
}

func testLeaderIdentityPerHold(t *testing.T, mk func(t *testing.T, app string) *pglock.Locker) {
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	key := pgtest.UniqueKey(t)
	suffix := strconv.FormatInt(time.Now().UnixNano()%1e9, 36)
	app := "pool-" + suffix

	type replica struct {
		id   string
		ld   *pglock.Leader
		stop context.CancelFunc
		done chan error
		rep  identityReplica
	}
	var wg sync.WaitGroup
	rs := make([]*replica, 2)
	for i := range rs {
		r := &replica{id: "leader-" + strconv.Itoa(i) + "-" + suffix}
		r.rep.id = r.id
		var err error
		r.ld, err = mk(t, app).Leader(key, pglock.LeaderConfig{
			Identity:        r.id,
			MinBackoff:      time.Hour, // a replica campaigns once per Run here
			ObserveInterval: 100 * time.Millisecond,
			OnNewLeader:     r.rep.onNewLeader,
		})
		if err != nil {
			t.Fatal(err)
		}
		rs[i] = r
	}
	a, b := rs[0], rs[1]
	run := func(r *replica) {
		ctx, cancel := context.WithCancel(bg)
		r.stop, r.done = cancel, make(chan error, 1)
		wg.Go(func() { r.done <- r.ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) })
	}
	stop := func(r *replica) {
		t.Helper()
		r.stop()
		if err := <-r.done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run of %s = %v, want context.Canceled", r.id, err)
		}
	}
	defer func() {
		for _, r := range rs {
			if r.stop != nil {
				r.stop()
			}
		}
		wg.Wait()
	}()
	// agree waits until both replicas report want last, and CurrentLeader
	// answers want on both.
	agree := func(want string) {
		t.Helper()
		locktest.WaitFor(t, "both replicas to name "+want, func() bool {
			for _, r := range rs {
				if r.rep.last().id != want {
					return false
				}
				id, ok, err := r.ld.CurrentLeader(bg)
				if err != nil {
					t.Fatalf("CurrentLeader on %s: %v", r.id, err)
				}
				if !ok || id != want {
					return false
				}
			}
			return true
		})
	}
	// restored checks that the session pid, which held or waited for the
	// key for a replica, no longer carries its identity: the pool has it
	// back with its own application_name (or destroyed it), and no session
	// carries id.
	restored := func(pid int32, id string) {
		t.Helper()
		locktest.WaitFor(t, "no session named "+id, func() bool { return len(sessionsNamed(t, watch, id)) == 0 })
		var name string
		err := watch.QueryRow(bg, "SELECT application_name FROM pg_catalog.pg_stat_activity WHERE pid = $1", pid).Scan(&name)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			t.Logf("%s's session %d was closed", id, pid)
		case err != nil:
			t.Fatal(err)
		case name != app:
			t.Errorf("%s's session %d is back in the pool with application_name %q, want the pool's %q", id, pid, name, app)
		default:
			t.Logf("%s's session %d is back in the pool as %q", id, pid, name)
		}
	}
	leaderPID := func() int32 {
		t.Helper()
		g := pgtest.Granted(t, watch, a.ld.Key())
		if len(g) != 1 {
			t.Fatalf("granted %+v, want one session", g)
		}
		return g[0].PID
	}

	run(a)
	locktest.WaitFor(t, a.id+" to lead", a.ld.IsLeader)
	run(b)
	agree(a.id)
	pidA := leaderPID()
	if got := appNameOf(t, watch, pidA); got != a.id {
		t.Errorf("the leader's session %d has application_name %q, want %q", pidA, got, a.id)
	}
	// b campaigns on a session named b.id (in the server's queue, or polling
	// with another driver).
	locktest.WaitFor(t, b.id+"'s campaign to be named", func() bool { return len(sessionsNamed(t, watch, b.id)) == 1 })
	pidB := sessionsNamed(t, watch, b.id)[0]

	// b stops while it campaigns: its connection loses b's name.
	stop(b)
	restored(pidB, b.id)
	run(b)

	// a stops: b leads, and both say so; a's connection loses a's name.
	stop(a)
	restored(pidA, a.id)
	locktest.WaitFor(t, b.id+" to lead", b.ld.IsLeader)
	run(a)
	agree(b.id)
	pidB = leaderPID()
	if got := appNameOf(t, watch, pidB); got != b.id {
		t.Errorf("the leader's session %d has application_name %q, want %q", pidB, got, b.id)
	}
	stop(b)
	restored(pidB, b.id)
	locktest.WaitFor(t, a.id+" to lead again", a.ld.IsLeader)
	stop(a)
	pgtest.WaitFree(t, watch, a.ld.Key())
	for _, id := range []string{a.id, b.id} {
		// A multiplexing Locker's campaign connection is closed as the
		// term ends; its server process exits a moment later.
		locktest.WaitFor(t, "no session named "+id+" after every Run returned", func() bool { return len(sessionsNamed(t, watch, id)) == 0 })
	}
	for _, r := range rs {
		var saw []string
		for _, rep := range r.rep.all() {
			saw = append(saw, rep.id)
		}
		t.Logf("%s saw %v", r.id, saw)
	}
}
