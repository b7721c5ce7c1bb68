package cronlock_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/robfig/cron/v3"

	"github.com/pglockkit/kit/cronlock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

func nop(context.Context) error { return nil }

// TestBadInputIsAConstructionError: every constructor reports a nil Locker,
// an empty name, a nil job and bad options as an error that errors.Is
// matches, and returns nothing to schedule. Nothing panics.
func TestBadInputIsAConstructionError(t *testing.T) {
	t.Parallel()
	lk := newLockers(t, 1)[0]
	txLocker, err := pglock.NewLocker(pgtest.Pool(t, 1), pglock.WithScope(pglock.Transaction))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = txLocker.Close() })
	job := cron.FuncJob(func() {})
	cases := []struct {
		name   string
		locker *pglock.Locker
		job    string
		opts   []cronlock.Option
		want   error
	}{
		{"nil locker", nil, "billing", nil, cronlock.ErrNilLocker},
		{"empty name", lk, "", nil, cronlock.ErrEmptyName},
		{"zero Locker", &pglock.Locker{}, "billing", nil, pglock.ErrUnsupportedConn},
		{"negative MinHold", lk, "billing", []cronlock.Option{cronlock.WithMinHold(-time.Second)}, cronlock.ErrInvalidOption},
		{"negative MaxRun", lk, "billing", []cronlock.Option{cronlock.WithMaxRun(-time.Second)}, cronlock.ErrInvalidOption},
		{"unknown scope", lk, "billing", []cronlock.Option{cronlock.WithScope(pglock.Scope(7))}, cronlock.ErrInvalidOption},
		//lint:ignore SA1012 a nil context is the bad input under test
		{"nil base context", lk, "billing", []cronlock.Option{cronlock.WithBaseContext(nil)}, cronlock.ErrInvalidOption},
		{"nil option", lk, "billing", []cronlock.Option{nil}, cronlock.ErrInvalidOption},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			w, err := cronlock.SkipIfLocked(c.locker, c.job, c.opts...)
			if !errors.Is(err, c.want) || w != nil {
				t.Errorf("SkipIfLocked: (%v, %v), want (nil, %v)", w != nil, err, c.want)
			}
			j, err := cronlock.Wrap(c.locker, c.job, job, c.opts...)
			if !errors.Is(err, c.want) || j != nil {
				t.Errorf("Wrap: (%v, %v), want (nil, %v)", j, err, c.want)
			}
			j, err = cronlock.Func(c.locker, c.job, nop, c.opts...)
			if !errors.Is(err, c.want) || j != nil {
				t.Errorf("Func: (%v, %v), want (nil, %v)", j, err, c.want)
			}
		})
	}
	t.Run("nil job", func(t *testing.T) {
		for _, j := range []cron.Job{nil, cron.FuncJob(nil)} {
			if got, err := cronlock.Wrap(lk, "billing", j); !errors.Is(err, cronlock.ErrNilJob) || got != nil {
				t.Errorf("Wrap(%#v): (%v, %v), want ErrNilJob", j, got, err)
			}
		}
		if got, err := cronlock.Func(lk, "billing", nil); !errors.Is(err, cronlock.ErrNilJob) || got != nil {
			t.Errorf("Func(nil): (%v, %v), want ErrNilJob", got, err)
		}
	})
	t.Run("Session scope on a transaction-scoped Locker is fine", func(t *testing.T) {
		if _, err := cronlock.Func(txLocker, "billing", nop, cronlock.WithScope(pglock.Session)); err != nil {
			t.Error(err)
		}
	})
	t.Run("a Locker on one connection", func(t *testing.T) {
		conn, err := pgtest.Pool(t, 1).Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Release()
		onConn, err := pglock.NewLocker(conn)
		if err != nil {
			t.Fatal(err)
		}
		// Concurrent ticks on one session would stack, not exclude.
		if _, err := cronlock.Func(onConn, "billing", nop); !errors.Is(err, cronlock.ErrInvalidOption) {
			t.Errorf("Func: %v, want ErrInvalidOption", err)
		}
		if _, err := cronlock.SkipIfLocked(onConn, "billing"); !errors.Is(err, cronlock.ErrInvalidOption) {
			t.Errorf("SkipIfLocked: %v, want ErrInvalidOption", err)
		}
	})
	t.Run("Session scope on a caller's transaction", func(t *testing.T) {
		tx, err := pgtest.Pool(t, 1).Begin(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = tx.Rollback(context.Background()) }()
		onTx, err := pglock.NewLocker(tx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cronlock.Func(onTx, "billing", nop, cronlock.WithScope(pglock.Session)); !errors.Is(err, pglock.ErrInvalidOption) {
			t.Errorf("Func: %v, want pglock.ErrInvalidOption (the options do not fit the Locker)", err)
		}
		if _, err := cronlock.SkipIfLocked(onTx, "billing", cronlock.WithScope(pglock.Session)); !errors.Is(err, pglock.ErrInvalidOption) {
			t.Errorf("SkipIfLocked: %v, want pglock.ErrInvalidOption", err)
		}
	})
	t.Run("nil job given to the wrapper logs at each tick", func(t *testing.T) {
		var rec recLog
		w, err := cronlock.SkipIfLocked(lk, "billing", cronlock.WithLogger(&rec))
		if err != nil {
			t.Fatal(err)
		}
		w(nil).Run()
		if rec.Count("ERROR cronlock: job not run", "nil job") != 1 {
			t.Errorf("log:\n%s", rec.String())
		}
	})
}

// TestKeyAndNamespace: the key is the Locker's key for "cron:" + name by
// default, for namespace + name with WithNamespace, and it is the key a
// running job holds in pg_locks.
func TestKeyAndNamespace(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 1)
	lk := newLockers(t, 1, pglock.WithNamespace("app:"))[0]
	want, _ := lk.Key("cron:" + name)
	if want != mustKey(t, "app:cron:"+name) {
		t.Fatalf("the Locker's namespace is not applied as expected")
	}
	var held []int32
	job, err := cronlock.Func(lk, name, func(ctx context.Context) error {
		var err error
		held, err = grantedPIDs(ctx, obs, want)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if job.Key() != want || job.Name() != name {
		t.Errorf("Key() = %v, Name() = %q; want %v, %q", job.Key(), job.Name(), want, name)
	}
	if ran, err := job.RunContext(context.Background()); !ran || err != nil {
		t.Fatalf("RunContext = (%v, %v)", ran, err)
	}
	if len(held) != 1 {
		t.Errorf("pg_locks holders of %v during the run: %v, want one", want, held)
	}
	other, err := cronlock.Func(lk, name, nop, cronlock.WithNamespace("reports/"))
	if err != nil {
		t.Fatal(err)
	}
	if got := other.Key(); got != mustKey(t, "app:reports/"+name) {
		t.Errorf("WithNamespace: key %v", got)
	}
	pgtest.WaitFree(t, obs, want)
}

func mustKey(t *testing.T, v any) pglock.Key {
	t.Helper()
	k, err := pglock.KeyOf(v)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestSkipIfLockedInAChain: the wrapper composes with cron.NewChain; a
// tick while another replica holds the lock is skipped and logged, with the
// reason, to both the cron.Logger and the slog.Logger; a tick while this
// replica's previous run is still going is skipped without asking the
// database; once the lock is free the job runs.
func TestSkipIfLockedInAChain(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 1)
	lks := newLockers(t, 2)
	var rec recLog
	var buf syncBuffer
	skip, err := cronlock.SkipIfLocked(lks[0], name, cronlock.WithLogger(&rec), cronlock.WithSlog(newSlog(&buf)))
	if err != nil {
		t.Fatal(err)
	}
	var runs atomic.Int32
	entered, leave := make(chan struct{}), make(chan struct{})
	job := cron.NewChain(cron.Recover(&rec), skip).Then(cron.FuncJob(func() {
		if runs.Add(1) == 1 {
			close(entered)
			<-leave
		}
	}))

	// Another replica holds the lock.
	other, err := lks[1].NewLock("cron:" + name)
	if err != nil {
		t.Fatal(err)
	}
	if err := other.Acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	job.Run()
	if runs.Load() != 0 {
		t.Fatal("the job ran while another replica held the lock")
	}
	if rec.Count("INFO cronlock: skip", "job="+name, "reason=held elsewhere", "key="+other.Key().String()) != 1 {
		t.Errorf("cron.Logger: want one skip line with job, key and reason; got:\n%s", rec.String())
	}
	if !strings.Contains(buf.String(), `level=INFO msg="cronlock: skip" job=`+name) ||
		!strings.Contains(buf.String(), `reason="held elsewhere"`) {
		t.Errorf("slog: want a skip line; got:\n%s", buf.String())
	}
	if err := other.Release(context.Background()); err != nil {
		t.Fatal(err)
	}

	// Free: the job runs, and a tick during the run is skipped here.
	done := make(chan struct{})
	go func() { defer close(done); job.Run() }()
	<-entered
	job.Run()
	if rec.Count("INFO cronlock: skip", "reason=still running here") != 1 {
		t.Errorf("want one \"still running here\" skip; got:\n%s", rec.String())
	}
	close(leave)
	<-done
	if n := runs.Load(); n != 1 {
		t.Errorf("the job ran %d times, want 1", n)
	}
	if rec.Count("INFO cronlock: ran", "job="+name, "duration=") != 1 {
		t.Errorf("want one \"ran\" line; got:\n%s", rec.String())
	}
	pgtest.WaitFree(t, obs, other.Key())
}

// TestMinHold: a job that returns at once keeps the lock for MinHold after
// its start: another replica skips during the hold, and runs after it.
// Cancelling the run's context cuts the hold short.
func TestMinHold(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 1)
	lks := newLockers(t, 2)
	const hold = 600 * time.Millisecond
	ranA := make(chan struct{})
	a, err := cronlock.Func(lks[0], name, func(context.Context) error { close(ranA); return nil }, cronlock.WithMinHold(hold))
	if err != nil {
		t.Fatal(err)
	}
	b, err := cronlock.Func(lks[1], name, nop)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	type res struct {
		ran bool
		err error
	}
	doneA := make(chan res, 1)
	go func() { r, err := a.RunContext(context.Background()); doneA <- res{r, err} }()
	<-ranA
	if ran, err := b.RunContext(context.Background()); ran || err != nil {
		t.Errorf("during A's MinHold, B: (%v, %v), want (false, nil)", ran, err)
	}
	if pids := pgtest.Granted(t, obs, a.Key()); len(pids) != 1 {
		t.Errorf("during A's MinHold, pg_locks holders: %+v, want one", pids)
	}
	r := <-doneA
	if !r.ran || r.err != nil {
		t.Fatalf("A: (%v, %v)", r.ran, r.err)
	}
	if el := time.Since(start); el < hold {
		t.Errorf("A returned after %v, before MinHold %v", el, hold)
	}
	pgtest.WaitFree(t, obs, a.Key())
	if ran, err := b.RunContext(context.Background()); !ran || err != nil {
		t.Errorf("after A's MinHold, B: (%v, %v), want (true, nil)", ran, err)
	}

	// A long hold, cut short by the run's context.
	long, err := cronlock.Func(lks[0], name, nop, cronlock.WithMinHold(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start = time.Now()
	if ran, err := long.RunContext(ctx); !ran || err != nil {
		t.Errorf("long hold: (%v, %v)", ran, err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("a cancelled context ended the MinHold wait after %v", el)
	}
	pgtest.WaitFree(t, obs, a.Key())
}

// TestBaseContext: cancelling the base context cancels a running Func job
// (Run, cron's entry point, uses it) and later ticks are skipped.
func TestBaseContext(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 1)
	lk := newLockers(t, 1)[0]
	base, cancel := context.WithCancelCause(context.Background())
	stopping := errors.New("shutting down")
	var rec recLog
	entered := make(chan struct{})
	var cause error
	job, err := cronlock.Func(lk, name, func(ctx context.Context) error {
		close(entered)
		<-ctx.Done()
		cause = context.Cause(ctx)
		return ctx.Err()
	}, cronlock.WithBaseContext(base), cronlock.WithLogger(&rec), cronlock.WithMinHold(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); job.Run() }()
	<-entered
	cancel(stopping)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return within 5 s of the base context's cancel")
	}
	if !errors.Is(cause, stopping) {
		t.Errorf("job context cause %v, want the base context's", cause)
	}
	job.Run()
	if rec.Count("INFO cronlock: skip", "reason=context done") != 1 {
		t.Errorf("want a \"context done\" skip; log:\n%s", rec.String())
	}
	pgtest.WaitFree(t, obs, job.Key())
}

// TestMaxRun: a Func job's context ends after MaxRun with cause
// ErrMaxRunExceeded, and RunContext's error matches it; a Wrap job cannot be
// cancelled, and its overrun is logged while it runs.
func TestMaxRun(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 1)
	lk := newLockers(t, 1)[0]
	var cause error
	f, err := cronlock.Func(lk, name, func(ctx context.Context) error {
		<-ctx.Done()
		cause = context.Cause(ctx)
		return ctx.Err()
	}, cronlock.WithMaxRun(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	ran, err := f.RunContext(context.Background())
	if !ran || !errors.Is(err, cronlock.ErrMaxRunExceeded) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("RunContext = (%v, %v), want (true, ErrMaxRunExceeded and DeadlineExceeded)", ran, err)
	}
	if !errors.Is(cause, cronlock.ErrMaxRunExceeded) {
		t.Errorf("job context cause %v, want ErrMaxRunExceeded", cause)
	}
	if el := time.Since(start); el < 200*time.Millisecond || el > 5*time.Second {
		t.Errorf("the run took %v with MaxRun 200ms", el)
	}

	var rec recLog
	overran := make(chan bool, 1)
	w, err := cronlock.Wrap(lk, name, cron.FuncJob(func() {
		time.Sleep(600 * time.Millisecond)
		overran <- rec.Count("ERROR cronlock: job overran", "job="+name) == 1
	}), cronlock.WithMaxRun(100*time.Millisecond), cronlock.WithLogger(&rec))
	if err != nil {
		t.Fatal(err)
	}
	w.Run()
	if !<-overran {
		t.Errorf("the overrun was not logged while the job ran; log:\n%s", rec.String())
	}
	pgtest.WaitFree(t, obs, f.Key())
}

// TestTransactionScope: a Func job in Transaction scope runs inside the
// lock's transaction (pglock.TxFromContext), on the backend that holds the
// lock; its writes commit when it returns nil and roll back when it fails or
// panics; the lock is free afterwards. The scope can come from the Locker
// or from WithScope.
func TestTransactionScope(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 2)
	table := pgx.Identifier{"cronlock_test_" + strings.NewReplacer(":", "_", ".", "_", "/", "_").Replace(strings.ToLower(name))}.Sanitize()
	ctx := context.Background()
	if _, err := obs.Exec(ctx, "CREATE TABLE "+table+" (v text)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = obs.Exec(context.Background(), "DROP TABLE "+table) })

	lk := newLockers(t, 1)[0]
	txLk := newLockers(t, 1, pglock.WithScope(pglock.Transaction))[0]
	var rec recLog
	var step atomic.Value
	var key pglock.Key
	fn := func(ctx context.Context) error {
		tx, ok := pglock.TxFromContext(ctx)
		if !ok {
			return errors.New("no transaction in the job's context")
		}
		var pid int32
		if err := tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
			return err
		}
		holders, err := grantedPIDs(ctx, obs, key)
		if err != nil || len(holders) != 1 || holders[0] != pid {
			return errors.New("the lock is not held by the job's transaction")
		}
		v := step.Load().(string)
		if _, err := tx.Exec(ctx, "INSERT INTO "+table+" VALUES ($1)", v); err != nil {
			return err
		}
		switch v {
		case "fails":
			return errors.New("job failed")
		case "panics":
			panic("job panics")
		}
		return nil
	}
	byOption, err := cronlock.Func(lk, name, fn, cronlock.WithScope(pglock.Transaction), cronlock.WithLogger(&rec))
	if err != nil {
		t.Fatal(err)
	}
	byLocker, err := cronlock.Func(txLk, name, fn)
	if err != nil {
		t.Fatal(err)
	}
	// The job's success decides the commit even when the Locker would not
	// roll back on error.
	noRollbackLk := newLockers(t, 1, pglock.WithScope(pglock.Transaction), pglock.WithRollbackOnError(false))[0]
	noRollback, err := cronlock.Func(noRollbackLk, name, fn)
	if err != nil {
		t.Fatal(err)
	}
	key = byOption.Key()
	for _, c := range []struct {
		job  *cronlock.Job
		step string
	}{{byOption, "commits"}, {byLocker, "commits too"}, {byOption, "fails"}, {byOption, "panics"}, {noRollback, "fails"}} {
		step.Store(c.step)
		func() {
			defer func() {
				if v := recover(); (v != nil) != (c.step == "panics") {
					t.Errorf("%s: recovered %v", c.step, v)
				}
			}()
			ran, err := c.job.RunContext(ctx)
			if !ran || (err != nil) != (c.step == "fails") {
				t.Errorf("%s: RunContext = (%v, %v)", c.step, ran, err)
			}
		}()
		if pids := pgtest.Granted(t, obs, byOption.Key()); len(pids) != 0 {
			t.Errorf("%s: lock still held after the run: %+v", c.step, pids)
		}
	}
	rows, err := obs.Query(ctx, "SELECT v FROM "+table+" ORDER BY v")
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, ",") != "commits,commits too" {
		t.Errorf("committed rows %q, want the two successful runs only", got)
	}
}

// TestPanicWithMinHold: a panicking Wrap job re-panics (for cron.Recover)
// only after MinHold, and leaves the lock free; the next run on another
// replica goes ahead.
func TestPanicWithMinHold(t *testing.T) {
	t.Parallel()
	name := pgtest.UniqueKey(t)
	obs := pgtest.Pool(t, 1)
	lks := newLockers(t, 2)
	j, err := cronlock.Wrap(lks[0], name, cron.FuncJob(func() { panic("boom") }), cronlock.WithMinHold(300*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	func() {
		defer func() {
			if v := recover(); v != "boom" {
				t.Errorf("recovered %v, want the job's panic", v)
			}
		}()
		j.Run()
	}()
	if el := time.Since(start); el < 300*time.Millisecond {
		t.Errorf("released after %v, before MinHold", el)
	}
	if pids := pgtest.Granted(t, obs, j.Key()); len(pids) != 0 {
		t.Fatalf("lock still held after the panic: %+v", pids)
	}
	next, err := cronlock.Func(lks[1], name, nop)
	if err != nil {
		t.Fatal(err)
	}
	if ran, err := next.RunContext(context.Background()); !ran || err != nil {
		t.Errorf("the next run: (%v, %v)", ran, err)
	}
}
