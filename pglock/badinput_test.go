package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Issue 20, items 6 and 7: bad input is an error, never a panic, and a
// connect that times out is ErrUnavailable whatever the caller's context.

// badCall runs f and fails the test, naming the call, if it panics.
func badCall(t *testing.T, name string, f func()) {
	t.Helper()
	defer func() {
		if v := recover(); v != nil {
			t.Errorf("%s panicked: %v", name, v)
		}
	}()
	f()
}

// badErr checks that err matches every one of want and says what.
func badErr(t *testing.T, name string, err error, says string, want ...error) {
	t.Helper()
	if err == nil {
		t.Errorf("%s = nil, want an error", name)
		return
	}
	for _, w := range want {
		if !errors.Is(err, w) {
			t.Errorf("%s = %v; does not match %v", name, err, w)
		}
	}
	if !strings.Contains(err.Error(), says) {
		t.Errorf("%s = %q; does not say %q", name, err, says)
	}
}

func badFn(context.Context) error { return nil }

// badAcquires checks that every way to acquire l fails with an error that
// says says, and takes nothing.
func badAcquires(t *testing.T, l *pglock.Lock, says string) {
	t.Helper()
	ctx := context.Background()
	badCall(t, "Acquire", func() {
		badErr(t, "Acquire", l.Acquire(ctx), says, pglock.ErrNotAcquired, pglock.ErrUnsupportedConn)
	})
	badCall(t, "TryAcquire", func() {
		ok, err := l.TryAcquire(ctx)
		badErr(t, "TryAcquire", err, says, pglock.ErrNotAcquired, pglock.ErrUnsupportedConn)
		if ok {
			t.Errorf("TryAcquire on a %s took it", says)
		}
	})
	badCall(t, "Do", func() {
		badErr(t, "Do", l.Do(ctx, badFn), says, pglock.ErrNotAcquired, pglock.ErrUnsupportedConn)
	})
	badCall(t, "TryDo", func() {
		ran, err := l.TryDo(ctx, badFn)
		badErr(t, "TryDo", err, says, pglock.ErrNotAcquired, pglock.ErrUnsupportedConn)
		if ran {
			t.Errorf("TryDo on a %s ran", says)
		}
	})
}

// Every method of a nil *Lock returns an error or a zero value, never
// panics: `l, err := lk.NewLock(k); defer l.Release(ctx)` is safe when NewLock
// failed.
func TestBadInputNilLock(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	var l *pglock.Lock
	const says = "nil *pglock.Lock"
	badCall(t, "Release", func() { badErr(t, "Release", l.Release(ctx), says, pglock.ErrUnsupportedConn) })
	badCall(t, "Held", func() {
		if l.Held() {
			t.Error("nil Lock is held")
		}
	})
	badAcquires(t, l, says)
	badCall(t, "HandleError", func() {
		work := errors.New("work failed")
		err := l.HandleError(ctx, work)
		badErr(t, "HandleError", err, says, work, pglock.ErrUnsupportedConn)
	})
	badCall(t, "Key", func() {
		if k := l.Key(); k != (pglock.Key{}) {
			t.Errorf("nil Lock's Key = %v", k)
		}
	})
	badCall(t, "Name", func() { _ = l.Name() })
	badCall(t, "Token", func() {
		if tok := l.Token(); tok != 0 {
			t.Errorf("nil Lock's Token = %d", tok)
		}
	})
	badCall(t, "Fence", func() {
		badErr(t, "Fence", l.Fence(ctx, nil), says, pglock.ErrFenced, pglock.ErrUnsupportedConn)
	})
	badCall(t, "Lost", func() {
		select {
		case <-l.Lost():
			t.Error("nil Lock's Lost is closed")
		default:
		}
	})
	badCall(t, "Tx", func() {
		if l.Tx() != nil || l.SQLTx() != nil {
			t.Error("nil Lock has a transaction")
		}
	})
	// The idiom of the issue.
	badCall(t, "defer Release after a failed Lock", func() {
		var lk *pglock.Locker
		l, err := lk.NewLock("k")
		defer l.Release(ctx) //nolint:errcheck // the idiom under test
		if err == nil {
			t.Error("nil Locker's Lock = nil error")
		}
	})
}

// A zero Lock (not made by NewLock or Locker.NewLock) is an error, never a panic.
func TestBadInputZeroLock(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const says = "zero pglock.Lock"
	l := &pglock.Lock{}
	badAcquires(t, l, says)
	badCall(t, "Release", func() { badErr(t, "Release", l.Release(ctx), says, pglock.ErrUnsupportedConn) })
	badCall(t, "Held", func() {
		if l.Held() {
			t.Error("zero Lock is held")
		}
	})
	badCall(t, "Lost", func() { _ = l.Lost() })
	badCall(t, "Tx", func() { _, _ = l.Tx(), l.SQLTx() })
}

// Key, Scope and Mode of a nil *Locker: Key is an error, Scope and Mode the
// zero values; so for a zero Locker.
func TestBadInputNilLocker(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		lk   *pglock.Locker
		says string
	}{
		{"nil", nil, "nil *pglock.Locker"},
		{"zero", &pglock.Locker{}, "zero pglock.Locker"},
	} {
		badCall(t, tc.name+" Key", func() {
			k, err := tc.lk.Key("k")
			badErr(t, tc.name+" Locker's Key", err, tc.says, pglock.ErrUnsupportedConn)
			if k != (pglock.Key{}) {
				t.Errorf("%s Locker's Key = %v", tc.name, k)
			}
		})
		badCall(t, tc.name+" Scope", func() {
			if s := tc.lk.Scope(); s != pglock.Session {
				t.Errorf("%s Locker's Scope = %v", tc.name, s)
			}
		})
		badCall(t, tc.name+" Mode", func() {
			if m := tc.lk.Mode(); m != pglock.Exclusive {
				t.Errorf("%s Locker's Mode = %v", tc.name, m)
			}
		})
		badCall(t, tc.name+" Leader", func() {
			ld, err := tc.lk.Leader("k", pglock.LeaderConfig{})
			badErr(t, tc.name+" Locker's Leader", err, tc.says, pglock.ErrUnsupportedConn)
			if ld != nil {
				t.Errorf("%s Locker's Leader = %v", tc.name, ld)
			}
		})
	}
}

// A nil or zero *Leader does not lead, has no terms, and its Run is an
// error.
func TestBadInputNilLeader(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		ld   *pglock.Leader
		says string
	}{
		{"nil", nil, "nil *pglock.Leader"},
		{"zero", &pglock.Leader{}, "zero pglock.Leader"},
	} {
		badCall(t, tc.name+" IsLeader", func() {
			if tc.ld.IsLeader() {
				t.Errorf("%s Leader leads", tc.name)
			}
		})
		badCall(t, tc.name+" Terms", func() {
			if n := tc.ld.Terms(); n != 0 {
				t.Errorf("%s Leader's Terms = %d", tc.name, n)
			}
		})
		badCall(t, tc.name+" Key", func() {
			if k := tc.ld.Key(); k != (pglock.Key{}) {
				t.Errorf("%s Leader's Key = %v", tc.name, k)
			}
		})
		badCall(t, tc.name+" Run", func() {
			ran := false
			err := tc.ld.Run(ctx, func(context.Context) error { ran = true; return nil })
			badErr(t, tc.name+" Leader's Run", err, tc.says, pglock.ErrUnsupportedConn)
			if ran {
				t.Errorf("%s Leader ran its function", tc.name)
			}
		})
	}
}

// Zero-value connections fail at construction with ErrUnsupportedConn,
// named, without a word to the database.
func TestBadInputZeroConns(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		conn any
		says string
	}{
		{&pgxpool.Pool{}, "zero pgxpool.Pool"},
		{&pgxpool.Conn{}, "zero or released pgxpool.Conn"},
		{&pgx.Conn{}, "zero pgx.Conn"},
		{&sql.DB{}, "zero sql.DB"},
		{&sql.Conn{}, "zero sql.Conn"},
		{&sql.Tx{}, "zero sql.Tx"},
	} {
		name := fmt.Sprintf("%T", tc.conn)
		badCall(t, "NewLock("+name+")", func() {
			l, err := pglock.NewLock(tc.conn, "k")
			badErr(t, "NewLock("+name+")", err, tc.says, pglock.ErrUnsupportedConn)
			if l != nil {
				t.Errorf("NewLock(%s) returned a Lock", name)
			}
		})
		badCall(t, "NewLocker("+name+")", func() {
			lk, err := pglock.NewLocker(tc.conn)
			badErr(t, "NewLocker("+name+")", err, tc.says, pglock.ErrUnsupportedConn)
			if lk != nil {
				// (F5: its first Do then panicked inside pgx or database/sql.)
				t.Errorf("NewLocker(%s) returned a Locker", name)
			}
		})
	}
	// A released *pgxpool.Conn is refused too.
	pool := pgtest.Pool(t, 1)
	pc, err := pool.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	pc.Release()
	badCall(t, "NewLock(released *pgxpool.Conn)", func() {
		_, err := pglock.NewLock(pc, "k")
		badErr(t, "NewLock(released *pgxpool.Conn)", err, "released pgxpool.Conn", pglock.ErrUnsupportedConn)
	})
}

// Every option has a range; a value outside it is ErrInvalidOption naming
// the option, the value and the range; the bounds themselves are accepted.
func TestBadInputOptionRanges(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t, 1)
	for _, tc := range []struct {
		opt  pglock.Option
		says []string // the option, the value, the range
	}{
		{pglock.WithLockConns(100000), []string{"WithLockConns", "100000", "64"}},
		{pglock.WithLockConns(65), []string{"WithLockConns", "65", "1..64"}},
		{pglock.WithLockConns(-1), []string{"WithLockConns", "-1", "1..64"}},
		{pglock.WithWaitConns(100000), []string{"WithWaitConns", "100000", "1..64"}},
		{pglock.WithWaitConns(-1), []string{"WithWaitConns", "-1", "1..64"}},
		{pglock.WithLostCheckInterval(time.Nanosecond), []string{"WithLostCheckInterval", "1ns", "10ms..1h0m0s"}},
		{pglock.WithLostCheckInterval(9 * time.Millisecond), []string{"WithLostCheckInterval", "9ms", "10ms"}},
		{pglock.WithLostCheckInterval(2 * time.Hour), []string{"WithLostCheckInterval", "2h0m0s", "10ms..1h0m0s"}},
		{pglock.WithLostCheckInterval(-1), []string{"WithLostCheckInterval", "-1ns", "10ms..1h0m0s"}},
		{pglock.WithReleaseTimeout(time.Nanosecond), []string{"WithReleaseTimeout", "1ns", "10ms..1h0m0s"}},
		{pglock.WithReleaseTimeout(2 * time.Hour), []string{"WithReleaseTimeout", "2h0m0s", "10ms..1h0m0s"}},
		{pglock.WithReleaseTimeout(-1), []string{"WithReleaseTimeout", "-1ns", "10ms..1h0m0s"}},
		{pglock.WithWait(-time.Second), []string{"WithWait", "-1s", "0 or more"}},
		{pglock.WithMaxLocks(-1), []string{"WithMaxLocks", "-1", "0 or more"}},
	} {
		_, err := pglock.NewLocker(pool, tc.opt)
		if !errors.Is(err, pglock.ErrInvalidOption) {
			t.Errorf("%v: NewLocker = %v, want ErrInvalidOption", tc.says, err)
			continue
		}
		for _, s := range tc.says {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("NewLocker: %q does not say %q", err, s)
			}
		}
	}
	for _, opt := range []pglock.Option{
		pglock.WithLockConns(64), pglock.WithWaitConns(64), pglock.WithLockConns(0), pglock.WithWaitConns(0),
		pglock.WithLostCheckInterval(10 * time.Millisecond), pglock.WithLostCheckInterval(time.Hour),
		pglock.WithLostCheckInterval(0), pglock.WithReleaseTimeout(10 * time.Millisecond),
		pglock.WithReleaseTimeout(time.Hour), pglock.WithReleaseTimeout(0),
		pglock.WithWait(0), pglock.WithMaxLocks(0),
	} {
		lk, err := pglock.NewLocker(pool, opt)
		if err != nil {
			t.Errorf("NewLocker with a bound = %v", err)
			continue
		}
		_ = lk.Close()
	}
}

// A Leader's backoffs have a range too: a pause under 10 ms would hammer a
// database that is down, and one past a day overflows as it doubles.
func TestBadInputLeaderBackoffRange(t *testing.T) {
	t.Parallel()
	lk, err := pglock.NewLocker(pgtest.Pool(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	for _, tc := range []struct {
		cfg  pglock.LeaderConfig
		says []string
	}{
		{pglock.LeaderConfig{MinBackoff: time.Nanosecond}, []string{"MinBackoff", "1ns", "10ms"}},
		{pglock.LeaderConfig{MinBackoff: -1}, []string{"MinBackoff", "-1ns", "10ms"}},
		{pglock.LeaderConfig{MaxBackoff: time.Nanosecond}, []string{"MaxBackoff", "1ns", "10ms"}},
		{pglock.LeaderConfig{MaxBackoff: 1<<63 - 1}, []string{"MaxBackoff", "2562047h", "24h0m0s"}},
		{pglock.LeaderConfig{MinBackoff: 25 * time.Hour}, []string{"MinBackoff", "25h0m0s", "24h0m0s"}},
		{pglock.LeaderConfig{MinBackoff: time.Second, MaxBackoff: 20 * time.Millisecond}, []string{"MaxBackoff", "20ms", "MinBackoff 1s"}},
	} {
		ld, err := lk.Leader("k", tc.cfg)
		if !errors.Is(err, pglock.ErrInvalidOption) || ld != nil {
			t.Errorf("%+v: Leader = %v, %v; want ErrInvalidOption", tc.cfg, ld, err)
			continue
		}
		for _, s := range tc.says {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("Leader(%+v): %q does not say %q", tc.cfg, err, s)
			}
		}
	}
	for _, cfg := range []pglock.LeaderConfig{
		{MinBackoff: 10 * time.Millisecond, MaxBackoff: 10 * time.Millisecond},
		{MinBackoff: 24 * time.Hour}, {MaxBackoff: 24 * time.Hour}, {},
	} {
		if _, err := lk.Leader("k", cfg); err != nil {
			t.Errorf("Leader(%+v) = %v", cfg, err)
		}
	}
}

// Item 7: on every path that takes a connection from the caller's pool, a
// connect cut by the pool's ConnectTimeout (the caller's context alive) is
// ErrNotAcquired and ErrUnavailable, not context.DeadlineExceeded.
func TestBadInputConnectTimeoutUnavailable(t *testing.T) {
	t.Parallel()
	const connectTimeout = 300 * time.Millisecond
	pgxPool := func(t *testing.T) any {
		cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
		if err != nil {
			t.Fatal(err)
		}
		p := faultProxy(t, cfg.ConnConfig)
		cfg.ConnConfig.ConnectTimeout = connectTimeout
		cfg.MaxConns = 2
		pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pool.Close)
		p.Blackhole()
		return pool
	}
	sqlDB := func(t *testing.T) any {
		cfg, err := pgx.ParseConfig(pgtest.URL(t))
		if err != nil {
			t.Fatal(err)
		}
		p := faultProxy(t, cfg)
		cfg.ConnectTimeout = connectTimeout
		db := stdlib.OpenDB(*cfg)
		db.SetMaxOpenConns(2)
		t.Cleanup(func() { db.Close() })
		p.Blackhole()
		return db
	}
	for _, tc := range []struct {
		name string
		conn func(*testing.T) any
		lock func(t *testing.T, conn any, key string) (*pglock.Lock, error)
	}{
		{"New on a pool", pgxPool, func(t *testing.T, conn any, key string) (*pglock.Lock, error) {
			return pglock.NewLock(conn, key)
		}},
		{"Locker without multiplexing", pgxPool, func(t *testing.T, conn any, key string) (*pglock.Lock, error) {
			lk, err := pglock.NewLocker(conn, pglock.WithMultiplexing(false))
			if err != nil {
				return nil, err
			}
			t.Cleanup(func() { lk.Close() })
			return lk.NewLock(key)
		}},
		{"Transaction scope on a pool", pgxPool, func(t *testing.T, conn any, key string) (*pglock.Lock, error) {
			lk, err := pglock.NewLocker(conn)
			if err != nil {
				return nil, err
			}
			t.Cleanup(func() { lk.Close() })
			return lk.NewLock(key, pglock.WithScope(pglock.Transaction))
		}},
		{"New on a sql.DB", sqlDB, func(t *testing.T, conn any, key string) (*pglock.Lock, error) {
			return pglock.NewLock(conn, key)
		}},
		{"Transaction scope on a sql.DB", sqlDB, func(t *testing.T, conn any, key string) (*pglock.Lock, error) {
			return pglock.NewLock(conn, key, pglock.WithScope(pglock.Transaction))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			l, err := tc.lock(t, tc.conn(t), pgtest.UniqueKey(t))
			if err != nil {
				t.Fatal(err)
			}
			// The caller's context is generous: only the pool's connect
			// timeout can end this.
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			for _, call := range []struct {
				name string
				f    func() error
			}{
				{"Acquire", func() error { return l.Acquire(ctx) }},
				{"TryAcquire", func() error { _, err := l.TryAcquire(ctx); return err }},
				{"Do", func() error { return l.Do(ctx, badFn) }},
			} {
				start := time.Now()
				err := call.f()
				took := time.Since(start)
				if !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, pglock.ErrUnavailable) ||
					errors.Is(err, context.DeadlineExceeded) {
					t.Errorf("%s = %v in %v; want ErrNotAcquired and ErrUnavailable, not context.DeadlineExceeded",
						call.name, err, took.Round(time.Millisecond))
				}
				var ce *pgconn.ConnectError
				if !errors.As(err, &ce) {
					t.Errorf("%s = %v; errors.As finds no *pgconn.ConnectError", call.name, err)
				}
				if took > 10*time.Second {
					t.Errorf("%s took %v: not the pool's connect timeout", call.name, took)
				}
				if ctx.Err() != nil {
					t.Fatalf("the caller's context ended: %v", ctx.Err())
				}
			}
		})
	}
}
