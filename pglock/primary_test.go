package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// standbyPair is a throwaway primary and a hot standby streaming from it.
type standbyPair struct {
	primary, standby *pgtest.Server
	// watchP and watchS read pg_locks on each.
	watchP, watchS *pgxpool.Pool
}

func newStandbyPair(t *testing.T) *standbyPair {
	t.Helper()
	p := pgtest.ThrowawayT(t, nil)
	s := p.StandbyT(t)
	return &standbyPair{primary: p, standby: s, watchP: urlPool(t, p.URL, 2), watchS: urlPool(t, s.URL, 2)}
}

// urlPool is a pool of at most n connections to url, closed when t ends.
func urlPool(t *testing.T, u string, n int) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(u)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = int32(n)
	p, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// advisoryOn counts the advisory locks granted on the server of watch, but
// for the exclusion self-test's (class 'pglk'), which a new Locker takes for
// a moment in the background.
func advisoryOn(t *testing.T, watch *pgxpool.Pool) int {
	t.Helper()
	var n int
	if err := watch.QueryRow(context.Background(),
		`SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted
		   AND NOT (objsubid = 2 AND classid = 1885826155)`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// wantNotPrimary checks that err refuses a standby as issue 23 says: it
// matches ErrNotPrimary, ErrUnavailable and ErrNotAcquired, and names the
// cause once.
func wantNotPrimary(t *testing.T, what string, err error) {
	t.Helper()
	switch {
	case !errors.Is(err, pglock.ErrNotPrimary):
		t.Errorf("%s on a standby = %v, want ErrNotPrimary", what, err)
	case !errors.Is(err, pglock.ErrUnavailable):
		t.Errorf("%s on a standby = %v, want it to match ErrUnavailable too", what, err)
	case !errors.Is(err, pglock.ErrNotAcquired):
		t.Errorf("%s on a standby = %v, want it to match ErrNotAcquired too", what, err)
	default:
		namesOnce(t, what, err)
	}
}

// Issue 23, primaries only: on a hot standby every path refuses to lock with
// ErrNotPrimary (a standby grants advisory locks of its own, which exclude
// no one on the primary), leaves no lock and no checked-out connection
// there; a Locker whose pool lists the standby first locks on the primary;
// and once the standby is promoted, the Locker that was refused locks there.
func TestStandbyRefused(t *testing.T) {
	sp := newStandbyPair(t)
	bg := context.Background()
	noop := func(context.Context) error { return nil }
	k := func(name string) pglock.Key {
		key, err := pglock.KeyOf(pgtest.UniqueKey(t) + name)
		if err != nil {
			t.Fatal(err)
		}
		return key
	}

	poolS := urlPool(t, sp.standby.URL, 4)
	sqlS, err := sql.Open("pgx", sp.standby.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sqlS.Close() })
	connS, err := pgx.Connect(bg, sp.standby.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = connS.Close(bg) })

	mux := muxLocker(t, poolS)
	perHold := muxLocker(t, poolS, pglock.WithMultiplexing(false))
	for _, c := range []struct {
		name string
		do   func() error
	}{
		{"Locker.Do", func() error { return mux.Do(bg, k("mux-do"), noop) }},
		{"Locker.TryDo", func() error { _, err := mux.TryDo(bg, k("mux-try"), noop); return err }},
		{"Locker.Do, Transaction scope", func() error {
			l, err := mux.NewLock(k("mux-tx"), pglock.WithScope(pglock.Transaction))
			if err != nil {
				return err
			}
			return l.Do(bg, noop)
		}},
		{"Locker WithMultiplexing(false) Do", func() error { return perHold.Do(bg, k("perhold"), noop) }},
		{"NewLock(pool) Acquire", func() error {
			return acquireReleaseOn(poolS, k("pool"))
		}},
		{"NewLock(pool) TryAcquire, Transaction scope", func() error {
			l, err := pglock.NewLock(poolS, k("pool-tx"), pglock.WithScope(pglock.Transaction))
			if err != nil {
				return err
			}
			if ok, err := l.TryAcquire(bg); !ok || err != nil {
				return err
			}
			return l.Release(bg)
		}},
		{"NewLock(*pgx.Conn) Acquire", func() error {
			return acquireReleaseOn(connS, k("conn"))
		}},
		{"NewLock(pgx.Tx) Acquire", func() error {
			tx, err := connS.Begin(bg)
			if err != nil {
				return err
			}
			defer func() { _ = tx.Rollback(bg) }()
			return acquireReleaseOn(tx, k("tx"), pglock.WithScope(pglock.Transaction))
		}},
		{"NewLock(*sql.DB) Acquire", func() error {
			return acquireReleaseOn(sqlS, k("sqldb"))
		}},
		{"NewLock(*sql.DB) Do, Transaction scope", func() error {
			l, err := pglock.NewLock(sqlS, k("sqldb-tx"), pglock.WithScope(pglock.Transaction))
			if err != nil {
				return err
			}
			return l.Do(bg, noop)
		}},
	} {
		wantNotPrimary(t, c.name, c.do())
		if n := advisoryOn(t, sp.watchS); n != 0 {
			t.Errorf("%s: the standby holds %d advisory locks, want 0", c.name, n)
		}
	}
	if n := poolS.Stat().AcquiredConns(); n != 0 {
		t.Errorf("%d pool connections still checked out", n)
	}
	if n := sqlS.Stats().InUse; n != 0 {
		t.Errorf("%d *sql.DB connections still in use", n)
	}

	// A host list whose first host is the standby: the Locker's own
	// connections go to the primary.
	t.Run("host list", func(t *testing.T) {
		us, up := mustURL(t, sp.standby.URL), mustURL(t, sp.primary.URL)
		list := *up
		list.Host = us.Host + "," + up.Host
		lk := muxLocker(t, urlPool(t, list.String(), 2))
		key := k("list")
		err := lk.Do(bg, key, func(context.Context) error {
			if n := advisoryOn(t, sp.watchP); n != 1 {
				t.Errorf("inside Do, the primary holds %d advisory locks, want 1", n)
			}
			return nil
		})
		if err != nil {
			t.Errorf("Do on a pool whose host list starts with a standby = %v, want nil (the primary)", err)
		}
		if n := advisoryOn(t, sp.watchS); n != 0 {
			t.Errorf("the standby holds %d advisory locks, want 0", n)
		}
	})

	// A Leader campaigning on the standby is not elected; once the standby
	// is promoted, it is, and the Locker refused a moment ago locks there.
	t.Run("promotion", func(t *testing.T) {
		ld, err := mux.Leader(k("leader"), pglock.LeaderConfig{MinBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(bg)
		defer cancel()
		elected := make(chan struct{})
		runErr := make(chan error, 1)
		go func() {
			runErr <- ld.Run(ctx, func(ctx context.Context) error {
				close(elected)
				<-ctx.Done()
				return nil
			})
		}()
		key := k("after")
		wantNotPrimary(t, "Locker.Do before the promotion", mux.Do(bg, key, noop))
		select {
		case <-elected:
			t.Fatal("a Leader campaigning on a standby was elected")
		default:
		}
		pctx, pcancel := context.WithTimeout(bg, time.Minute)
		defer pcancel()
		if err := sp.standby.Promote(pctx); err != nil {
			t.Fatal(err)
		}
		if err := mux.Do(bg, key, func(context.Context) error {
			if n := advisoryOn(t, sp.watchS); n < 1 {
				t.Errorf("inside Do after the promotion, the promoted server holds %d advisory locks", n)
			}
			return nil
		}); err != nil {
			t.Errorf("Locker.Do after the promotion = %v, want nil", err)
		}
		select {
		case <-elected:
		case <-time.After(30 * time.Second):
			t.Fatal("the Leader was not elected within 30 s of the promotion")
		}
		cancel()
		if err := <-runErr; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("Run = %v", err)
		}
		locktest.WaitFor(t, "the promoted server's advisory locks to go", func() bool { return advisoryOn(t, sp.watchS) == 0 })
	})
}

// acquireReleaseOn makes a Lock on conn and acquires it and, when that
// succeeds (a failure of the tests here), releases it: a hold left behind
// would keep a pool from closing.
func acquireReleaseOn(conn any, key pglock.Key, opts ...pglock.Option) error {
	l, err := pglock.NewLock(conn, key, opts...)
	if err != nil {
		return err
	}
	if err := l.Acquire(context.Background()); err != nil {
		return err
	}
	return l.Release(context.Background())
}

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// Issue 23, fencing tokens across a failover: a standby that missed the
// last tokens of the primary (replication cut, as asynchronous replication
// loses the last commits) and is then promoted grants tokens above every
// token the old primary granted. Seen failing with tokens drawn from the
// sequence alone (the promoted server's sequence was behind).
func TestTokensSurvivePromotion(t *testing.T) {
	sp := newStandbyPair(t)
	bg := context.Background()
	if _, err := pglock.Migrate(bg, sp.watchP); err != nil {
		t.Fatal(err)
	}
	lkP := muxLocker(t, urlPool(t, sp.primary.URL, 2), pglock.WithToken())
	grant := func(lk *pglock.Locker, n int, name string) (last int64) {
		t.Helper()
		for i := range n {
			if err := lk.Do(bg, fmt.Sprintf("%s-%d", name, i%3), func(ctx context.Context) error {
				tok, _ := pglock.TokenFromContext(ctx)
				if tok <= last {
					t.Errorf("token %d after %d", tok, last)
				}
				last = tok
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		}
		return last
	}
	grant(lkP, 3, "fenced")
	ctx, cancel := context.WithTimeout(bg, time.Minute)
	defer cancel()
	if err := sp.standby.WaitReplayed(ctx, sp.primary); err != nil {
		t.Fatal(err)
	}
	// Cut replication: the standby stops receiving the primary's WAL.
	if _, err := sp.watchS.Exec(bg, "ALTER SYSTEM SET primary_conninfo = ''"); err != nil {
		t.Fatal(err)
	}
	if _, err := sp.watchS.Exec(bg, "SELECT pg_reload_conf()"); err != nil {
		t.Fatal(err)
	}
	locktest.WaitFor(t, "the standby's WAL receiver to stop", func() bool {
		var n int
		if err := sp.watchS.QueryRow(bg, "SELECT count(*) FROM pg_stat_wal_receiver").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n == 0
	})
	// More grants than the sequence logs ahead (32) on the old primary.
	lastP := grant(lkP, 100, "fenced")
	if err := sp.standby.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	lkS := muxLocker(t, urlPool(t, sp.standby.URL, 2), pglock.WithToken())
	firstS := grant(lkS, 1, "fenced")
	t.Logf("last token of the old primary %d, first of the promoted standby %d", lastP, firstS)
	if firstS <= lastP {
		t.Errorf("INVARIANT tokens-increase: the promoted standby granted token %d, not above the old primary's last, %d", firstS, lastP)
	}
	// A stale holder of the old primary is fenced off on the new one: every
	// key of the grants above now has a newer token there.
	poolS := urlPool(t, sp.standby.URL, 2)
	for i := range 3 {
		key, _ := lkS.Key(fmt.Sprintf("fenced-%d", i))
		if _, err := lkS.TryDo(bg, fmt.Sprintf("fenced-%d", i), func(context.Context) error { return nil }); err != nil {
			t.Fatal(err)
		}
		tx, err := poolS.Begin(bg)
		if err != nil {
			t.Fatal(err)
		}
		if err := pglock.CheckFence(bg, tx, key, lastP); !errors.Is(err, pglock.ErrFenced) {
			t.Errorf("CheckFence on the new primary with the old primary's last token %d = %v, want ErrFenced", lastP, err)
		}
		_ = tx.Rollback(bg)
	}
}

// A key's tokens increase even when the sequence goes back (an engine that
// caches sequence values per connection, a server restored from an older
// backup): the key's row has the last word. Seen failing with the sequence
// alone (the token after setval was below the key's last).
func TestTokensIncreaseWhenTheSequenceGoesBack(t *testing.T) {
	srv := pgtest.ThrowawayT(t, nil)
	bg := context.Background()
	pool := urlPool(t, srv.URL, 4)
	if _, err := pglock.Migrate(bg, pool); err != nil {
		t.Fatal(err)
	}
	lk := muxLocker(t, pool, pglock.WithToken())
	token := func() int64 {
		t.Helper()
		var tok int64
		if err := lk.Do(bg, "rewound", func(ctx context.Context) error {
			tok, _ = pglock.TokenFromContext(ctx)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return tok
	}
	var last int64
	for range 5 {
		last = token()
	}
	if _, err := pool.Exec(bg, "SELECT setval('pglock.fence_token', 1, false)"); err != nil {
		t.Fatal(err)
	}
	if next := token(); next <= last {
		t.Errorf("INVARIANT tokens-increase: token %d after the sequence went back, the key's last was %d", next, last)
	}
}

// Issue 23, a demoted primary: PostgreSQL cannot turn a primary into a
// standby in place, so a demotion (the old primary restarted to follow the
// promoted standby) ends every session of the old primary. Holds there are
// lost at once (Lost fires, Release says ErrLockLost); the same Locker,
// whose host list names both servers with target_session_attrs=primary,
// locks on the new primary afterwards; and the demoted server, reached
// alone, refuses every lock with ErrNotPrimary.
func TestDemotedPrimaryLosesItsHolds(t *testing.T) {
	sp := newStandbyPair(t)
	bg := context.Background()
	key := func(name string) pglock.Key {
		k, err := pglock.KeyOf(pgtest.UniqueKey(t) + name)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	up, us := mustURL(t, sp.primary.URL), mustURL(t, sp.standby.URL)
	list := *up
	list.Host = up.Host + "," + us.Host
	q := list.Query()
	q.Set("target_session_attrs", "primary")
	list.RawQuery = q.Encode()
	pool := urlPool(t, list.String(), 4)

	mux := muxLocker(t, pool)
	held, err := mux.NewLock(key("mux"))
	if err != nil {
		t.Fatal(err)
	}
	perHold, err := pglock.NewLock(pool, key("pool"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range []*pglock.Lock{held, perHold} {
		if err := l.Acquire(bg); err != nil {
			t.Fatal(err)
		}
	}
	if n := advisoryOn(t, sp.watchP); n != 2 {
		t.Fatalf("the primary holds %d advisory locks, want 2", n)
	}

	// The switchover: the old primary stops (its standby receives its last
	// WAL), the standby is promoted, the old primary follows it.
	ctx, cancel := context.WithTimeout(bg, 2*time.Minute)
	defer cancel()
	if err := sp.primary.StopServer(ctx); err != nil {
		t.Fatal(err)
	}
	for name, l := range map[string]*pglock.Lock{"Locker's lock": held, "NewLock(pool)": perHold} {
		select {
		case <-l.Lost():
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: Lost() did not fire within 30 s of its server's shutdown", name)
		}
		if err := l.Release(bg); !errors.Is(err, pglock.ErrLockLost) {
			t.Errorf("%s: Release after the demotion = %v, want ErrLockLost", name, err)
		}
	}
	if err := sp.standby.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	if err := sp.primary.Follow(ctx, sp.standby); err != nil {
		t.Fatal(err)
	}
	demoted := urlPool(t, sp.primary.URL, 2)
	var inRecovery bool
	if err := demoted.QueryRow(bg, "SELECT pg_is_in_recovery()").Scan(&inRecovery); err != nil || !inRecovery {
		t.Fatalf("the old primary: pg_is_in_recovery() = %v, %v; want true (a standby)", inRecovery, err)
	}

	// The same Locker and pool lock on the new primary; the first host of
	// the list, now a standby, is passed over.
	newPrimary := urlPool(t, sp.standby.URL, 2)
	for name, do := range map[string]func() error{
		"the Locker's lock again": func() error {
			if err := held.Acquire(bg); err != nil {
				return err
			}
			if n := advisoryOn(t, newPrimary); n != 1 {
				t.Errorf("the new primary holds %d advisory locks, want 1", n)
			}
			return held.Release(bg)
		},
		"NewLock(pool) again": func() error {
			if err := perHold.Acquire(bg); err != nil {
				return err
			}
			if n := advisoryOn(t, newPrimary); n != 1 {
				t.Errorf("the new primary holds %d advisory locks, want 1", n)
			}
			return perHold.Release(bg)
		},
	} {
		if err := do(); err != nil {
			t.Errorf("%s after the switchover = %v, want nil", name, err)
		}
	}
	if n := advisoryOn(t, demoted); n != 0 {
		t.Errorf("the demoted server holds %d advisory locks, want 0", n)
	}

	// Reached alone, the demoted server refuses.
	wantNotPrimary(t, "NewLock on the demoted server", acquireReleaseOn(demoted, key("demoted")))
	wantNotPrimary(t, "a Locker on the demoted server", muxLocker(t, demoted).Do(bg, key("demoted-mux"),
		func(context.Context) error { return nil }))
	locktest.WaitFor(t, "the new primary's advisory locks to go", func() bool { return advisoryOn(t, newPrimary) == 0 })
}

// YugabyteDB caches sequence values per connection (100 by default) and
// has no timelines: its branch of the token statement takes the sequence
// alone, and the key's row keeps each key's tokens increasing although the
// connections draw from the sequence out of order. Run here on PostgreSQL,
// with the sequence cached the same way, and the PostgreSQL statement too.
func TestTokensIncreaseWithACachedSequence(t *testing.T) {
	srv := pgtest.ThrowawayT(t, nil)
	bg := context.Background()
	pool := urlPool(t, srv.URL, 8)
	if _, err := pglock.Migrate(bg, pool); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(bg, "ALTER SEQUENCE pglock.fence_token CACHE 100"); err != nil {
		t.Fatal(err)
	}
	conns := make([]*pgx.Conn, 3)
	for i := range conns {
		c, err := pgx.Connect(bg, srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close(bg) })
		conns[i] = c
	}
	// The cache puts the sequence out of order across connections.
	var a, b, c int64
	for _, s := range []struct {
		conn *pgx.Conn
		v    *int64
	}{{conns[0], &a}, {conns[1], &b}, {conns[0], &c}} {
		if err := s.conn.QueryRow(bg, "SELECT nextval('pglock.fence_token')").Scan(s.v); err != nil {
			t.Fatal(err)
		}
	}
	if !(b > c && c > a) {
		t.Fatalf("nextval on connections 1, 2, 1 = %d, %d, %d: the sequence is not cached per connection", a, b, c)
	}

	last := map[int64]int64{}
	for i := range 60 {
		key := int64(i % 2)
		var tok int64
		if err := conns[i%3].QueryRow(bg, pglock.TokenSQLOnYugabyte, int16(1), key).Scan(&tok); err != nil {
			t.Fatal(err)
		}
		if tok >= 1<<48 {
			t.Errorf("token %d on YugabyteDB's branch carries a timeline offset", tok)
		}
		if tok <= last[key] {
			t.Errorf("INVARIANT tokens-increase: key %d: token %d after %d (connection %d)", key, tok, last[key], i%3)
		}
		last[key] = tok
	}

	// PostgreSQL's statement, from two Lockers (four lock connections).
	lks := []*pglock.Locker{muxLocker(t, urlPool(t, srv.URL, 2), pglock.WithToken()),
		muxLocker(t, urlPool(t, srv.URL, 2), pglock.WithToken())}
	var lastTok int64
	for i := range 40 {
		if err := lks[i%2].Do(bg, fmt.Sprintf("cached-%d", i%3), func(ctx context.Context) error {
			tok, _ := pglock.TokenFromContext(ctx)
			if i%3 == 0 {
				if tok <= lastTok {
					t.Errorf("INVARIANT tokens-increase: Locker %d: token %d after %d", i%2, tok, lastTok)
				}
				lastTok = tok
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
}
