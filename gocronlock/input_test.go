package gocronlock_test

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/pglockkit/kit/gocronlock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

func nop(context.Context) error { return nil }

// TestBadInput: every constructor reports a nil Locker, an empty name, a
// nil function, a Locker that does not fit, an option out of range or given
// to a constructor it does not apply to, as an error that errors.Is matches,
// and returns nothing to use. Lock with an empty key is an error too.
// Nothing panics.
func TestBadInput(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	lk := newLockers(t, 1)[0]
	conn, err := pgtest.Pool(t, 1).Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	onConn, err := pglock.NewLocker(conn)
	if err != nil {
		t.Fatal(err)
	}
	tx, err := pgtest.Pool(t, 1).Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	onTx, err := pglock.NewLocker(tx)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("NewLocker", func(t *testing.T) {
		for _, c := range []struct {
			name   string
			locker *pglock.Locker
			opts   []gocronlock.Option
			want   error
		}{
			{"nil locker", nil, nil, gocronlock.ErrNilLocker},
			{"zero Locker", &pglock.Locker{}, nil, pglock.ErrUnsupportedConn},
			{"a Locker on one connection", onConn, nil, gocronlock.ErrInvalidOption},
			{"a Locker on a transaction", onTx, nil, pglock.ErrInvalidOption},
			{"negative MinHold", lk, []gocronlock.Option{gocronlock.WithMinHold(-time.Second)}, gocronlock.ErrInvalidOption},
			{"WithScope", lk, []gocronlock.Option{gocronlock.WithScope(pglock.Transaction)}, gocronlock.ErrInvalidOption},
			{"WithMaxRun", lk, []gocronlock.Option{gocronlock.WithMaxRun(time.Second)}, gocronlock.ErrInvalidOption},
			{"WithTicks", lk, []gocronlock.Option{gocronlock.WithTicks(gocronlock.NewTicks(nil))}, gocronlock.ErrInvalidOption},
			{"WithLeaderConfig", lk, []gocronlock.Option{gocronlock.WithLeaderConfig(pglock.LeaderConfig{})}, gocronlock.ErrInvalidOption},
			{"nil option", lk, []gocronlock.Option{nil}, gocronlock.ErrInvalidOption},
		} {
			if l, err := gocronlock.NewLocker(c.locker, c.opts...); !errors.Is(err, c.want) || l != nil {
				t.Errorf("%s: NewLocker = (%v, %v), want (nil, %v)", c.name, l, err, c.want)
			}
		}
	})

	t.Run("Lock", func(t *testing.T) {
		gl, err := gocronlock.NewLocker(lk)
		if err != nil {
			t.Fatal(err)
		}
		if l, err := gl.Lock(ctx, ""); !errors.Is(err, gocronlock.ErrEmptyName) || l != nil {
			t.Errorf("Lock(ctx, \"\") = (%v, %v), want ErrEmptyName", l, err)
		}
		//lint:ignore SA1012 a nil context is the bad input under test
		if l, err := gl.Lock(nil, "report"); !errors.Is(err, pglock.ErrNotAcquired) || l != nil {
			t.Errorf("Lock(nil, ...) = (%v, %v), want pglock.ErrNotAcquired", l, err)
		}
		done, cancel := context.WithCancel(ctx)
		cancel()
		if l, err := gl.Lock(done, "report"); !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.Canceled) || errors.Is(err, gocronlock.ErrBusy) {
			t.Errorf("Lock(cancelled ctx, ...) = (%v, %v), want pglock.ErrNotAcquired and context.Canceled", l, err)
		}
		// gocron names a job without WithName after its function; any name
		// is a key.
		l, err := gl.Lock(ctx, pgtest.UniqueKey(t)+"main.main.func1")
		if err != nil {
			t.Fatal(err)
		}
		//lint:ignore SA1012 a nil context must still release
		if err := l.Unlock(nil); err != nil {
			t.Errorf("Unlock(nil) = %v", err)
		}
	})

	t.Run("Func", func(t *testing.T) {
		for _, c := range []struct {
			name   string
			locker *pglock.Locker
			job    string
			fn     func(context.Context) error
			opts   []gocronlock.Option
			want   error
		}{
			{"nil locker", nil, "billing", nop, nil, gocronlock.ErrNilLocker},
			{"empty name", lk, "", nop, nil, gocronlock.ErrEmptyName},
			{"nil function", lk, "billing", nil, nil, gocronlock.ErrNilFunc},
			{"zero Locker", &pglock.Locker{}, "billing", nop, nil, pglock.ErrUnsupportedConn},
			{"a Locker on one connection", onConn, "billing", nop, nil, gocronlock.ErrInvalidOption},
			{"Session scope on a transaction", onTx, "billing", nop, []gocronlock.Option{gocronlock.WithScope(pglock.Session)}, pglock.ErrInvalidOption},
			{"unknown scope", lk, "billing", nop, []gocronlock.Option{gocronlock.WithScope(pglock.Scope(7))}, gocronlock.ErrInvalidOption},
			{"negative MinHold", lk, "billing", nop, []gocronlock.Option{gocronlock.WithMinHold(-1)}, gocronlock.ErrInvalidOption},
			{"negative MaxRun", lk, "billing", nop, []gocronlock.Option{gocronlock.WithMaxRun(-1)}, gocronlock.ErrInvalidOption},
			{"WithLeaderConfig", lk, "billing", nop, []gocronlock.Option{gocronlock.WithLeaderConfig(pglock.LeaderConfig{})}, gocronlock.ErrInvalidOption},
			{"WithTicks(nil)", lk, "billing", nop, []gocronlock.Option{gocronlock.WithScope(pglock.Transaction), gocronlock.WithTicks(nil)}, gocronlock.ErrInvalidOption},
			{"WithTicks in Session scope", lk, "billing", nop, []gocronlock.Option{gocronlock.WithScope(pglock.Session), gocronlock.WithTicks(gocronlock.NewTicks(nil))}, gocronlock.ErrInvalidOption},
			{"WithTicks in the Locker's Session scope", lk, "billing", nop, []gocronlock.Option{gocronlock.WithTicks(gocronlock.NewTicks(nil))}, gocronlock.ErrInvalidOption},
		} {
			if j, err := gocronlock.Func(c.locker, c.job, c.fn, c.opts...); !errors.Is(err, c.want) || j != nil {
				t.Errorf("%s: Func = (%v, %v), want (nil, %v)", c.name, j, err, c.want)
			}
		}
		txLocker, err := pglock.NewLocker(pgtest.Pool(t, 1), pglock.WithScope(pglock.Transaction))
		if err != nil {
			t.Fatal(err)
		}
		defer txLocker.Close()
		if _, err := gocronlock.Func(txLocker, "billing", nop, gocronlock.WithTicks(gocronlock.NewTicks(nil))); err != nil {
			t.Errorf("WithTicks on a Locker in Transaction scope: %v", err)
		}
		j, err := gocronlock.Func(lk, "billing", nop)
		if err != nil {
			t.Fatal(err)
		}
		//lint:ignore SA1012 a nil context is the bad input under test
		if ran, err := j.TryRun(nil); ran || !errors.Is(err, pglock.ErrNotAcquired) {
			t.Errorf("TryRun(nil) = (%v, %v), want pglock.ErrNotAcquired", ran, err)
		}
	})

	t.Run("NewElector", func(t *testing.T) {
		for _, c := range []struct {
			name   string
			ctx    context.Context
			locker *pglock.Locker
			elect  string
			opts   []gocronlock.Option
			want   error
		}{
			{"nil context", nil, lk, "scheduler", nil, gocronlock.ErrInvalidOption},
			{"nil locker", ctx, nil, "scheduler", nil, gocronlock.ErrNilLocker},
			{"empty name", ctx, lk, "", nil, gocronlock.ErrEmptyName},
			{"zero Locker", ctx, &pglock.Locker{}, "scheduler", nil, pglock.ErrUnsupportedConn},
			{"a Locker on a transaction", ctx, onTx, "scheduler", nil, pglock.ErrInvalidOption},
			{"negative backoff", ctx, lk, "scheduler", []gocronlock.Option{gocronlock.WithLeaderConfig(pglock.LeaderConfig{MinBackoff: -1})}, pglock.ErrInvalidOption},
			{"WithMinHold", ctx, lk, "scheduler", []gocronlock.Option{gocronlock.WithMinHold(time.Second)}, gocronlock.ErrInvalidOption},
			{"WithScope", ctx, lk, "scheduler", []gocronlock.Option{gocronlock.WithScope(pglock.Session)}, gocronlock.ErrInvalidOption},
			{"WithTicks", ctx, lk, "scheduler", []gocronlock.Option{gocronlock.WithTicks(gocronlock.NewTicks(nil))}, gocronlock.ErrInvalidOption},
		} {
			if e, err := gocronlock.NewElector(c.ctx, c.locker, c.elect, c.opts...); !errors.Is(err, c.want) || e != nil {
				t.Errorf("%s: NewElector = (%v, %v), want (nil, %v)", c.name, e, err, c.want)
				if e != nil {
					_ = e.Close()
				}
			}
		}
	})

	t.Run("nil receivers", func(t *testing.T) {
		// A typed nil passes gocron's own nil checks.
		var gl *gocronlock.Locker
		if l, err := gl.Lock(ctx, "report"); !errors.Is(err, gocronlock.ErrNilLocker) || l != nil {
			t.Errorf("(*Locker)(nil).Lock = (%v, %v), want ErrNilLocker", l, err)
		}
		var e *gocronlock.Elector
		if err := e.IsLeader(ctx); !errors.Is(err, gocronlock.ErrNotLeader) {
			t.Errorf("(*Elector)(nil).IsLeader = %v, want ErrNotLeader", err)
		}
		var j *gocronlock.Job
		if err := j.Run(ctx); !errors.Is(err, gocronlock.ErrNilFunc) {
			t.Errorf("(*Job)(nil).Run = %v, want ErrNilFunc", err)
		}
		if ran, err := j.TryRunTick(ctx, time.Now()); ran || !errors.Is(err, gocronlock.ErrNilFunc) {
			t.Errorf("(*Job)(nil).TryRunTick = (%v, %v), want ErrNilFunc", ran, err)
		}
		var ticks *gocronlock.Ticks
		ticks.JobSchedulingDelay(nil, time.Now(), time.Now()) // nothing to keep, no panic
		ticks.SchedulerStarted()
	})

	t.Run("typed nil logger", func(t *testing.T) {
		var l *slog.Logger
		gl, err := gocronlock.NewLocker(lk, gocronlock.WithLogger(l))
		if err != nil {
			t.Fatal(err)
		}
		lock, err := gl.Lock(ctx, pgtest.UniqueKey(t))
		if err != nil {
			t.Fatal(err)
		}
		if err := lock.Unlock(ctx); err != nil {
			t.Fatal(err)
		}
	})
}
