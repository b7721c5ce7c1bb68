package cronlock_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/robfig/cron/v3"

	"github.com/pglockkit/kit/cronlock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// ahead is the schedule of a replica whose clock is offset ahead of the real
// one: it fires each of inner's times offset early (in real time).
type ahead struct {
	inner  cron.Schedule
	offset time.Duration
}

func (s ahead) Next(t time.Time) time.Time { return s.inner.Next(t.Add(s.offset)).Add(-s.offset) }

// Exactly once per tick, whatever the clocks: three replicas whose clocks
// are 0, 0.7 s and 1.9 s ahead (each fires a tick at its own clock's time,
// and names it by that clock) run a 10 ms job every second with WithTicks,
// no MinHold. Every tick from the first to the last runs exactly once,
// recorded in the job's transaction; halfway the replica that runs every
// tick first (1.9 s ahead) exits, and the others do not run its ticks again
// when theirs come, but run the later ones.
func TestTicksExactlyOnceUnderSkew(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	if _, err := pglock.Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	table := fmt.Sprintf("cron_ticks_%d", rand.Uint32())
	if _, err := pool.Exec(ctx, "CREATE TABLE "+table+" (tick timestamptz, replica int)"); err != nil {
		t.Fatal(err)
	}
	defer pool.Exec(context.Background(), "DROP TABLE "+table)
	name := pgtest.UniqueKey(t)
	every, err := cron.NewParser(cron.Second | cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow).Parse("* * * * * *")
	if err != nil {
		t.Fatal(err)
	}
	offsets := []time.Duration{0, 700 * time.Millisecond, 1900 * time.Millisecond}
	crons := make([]*cron.Cron, len(offsets))
	logs := make([]*recLog, len(offsets))
	for i, lk := range newLockers(t, len(offsets)) {
		offset := offsets[i]
		clock := func() time.Time { return time.Now().Add(offset) }
		logs[i] = &recLog{}
		job, err := cronlock.Func(lk, name, func(ctx context.Context) error {
			tx, _ := pglock.TxFromContext(ctx)
			time.Sleep(10 * time.Millisecond)
			// The tick as this replica names it: the schedule's time on its
			// clock, fixed when cron started the run.
			tick, ok := cronlock.TickFromContext(ctx)
			if !ok {
				return errors.New("no tick in the job's context")
			}
			_, err := tx.Exec(ctx, "INSERT INTO "+table+" VALUES ($1, $2)", tick, i)
			return err
		}, cronlock.WithScope(pglock.Transaction), cronlock.WithTicks(every), cronlock.WithClock(clock), cronlock.WithLogger(logs[i]))
		if err != nil {
			t.Fatal(err)
		}
		crons[i] = cron.New(cron.WithSeconds())
		crons[i].Schedule(ahead{every, offset}, job)
	}
	for _, c := range crons {
		c.Start()
	}
	time.Sleep(10 * time.Second)
	<-crons[2].Stop().Done() // the replica that runs every tick first exits
	stoppedAt := time.Now()
	time.Sleep(10500 * time.Millisecond)
	var wg sync.WaitGroup
	for _, c := range crons[:2] {
		wg.Go(func() { <-c.Stop().Done() })
	}
	wg.Wait()

	rows, err := pool.Query(ctx, "SELECT tick, replica FROM "+table+" ORDER BY tick")
	if err != nil {
		t.Fatal(err)
	}
	type run struct {
		Tick    time.Time
		Replica int
	}
	runs, err := pgx.CollectRows(rows, pgx.RowToStructByPos[run])
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) < 18 {
		t.Fatalf("%d ticks ran in about 20 s, want 18 or more: %v", len(runs), runs)
	}
	byReplica := map[int]int{}
	for i, r := range runs {
		byReplica[r.Replica]++
		if i > 0 {
			if d := r.Tick.Sub(runs[i-1].Tick); d != time.Second {
				t.Errorf("tick %s follows %s: a tick ran twice or none ran (%v)", r.Tick.Format(time.TimeOnly), runs[i-1].Tick.Format(time.TimeOnly), d)
			}
		}
	}
	t.Logf("%d ticks, each once, %s .. %s; runs per replica (clock ahead 0, 0.7 s, 1.9 s): %v",
		len(runs), runs[0].Tick.Format(time.TimeOnly), runs[len(runs)-1].Tick.Format(time.TimeOnly), byReplica)
	if byReplica[2] == 0 || byReplica[1] == 0 {
		t.Errorf("runs per replica %v: want the most advanced replica to run the first ticks and the next one to take over after it exited", byReplica)
	}
	for _, r := range runs {
		if r.Replica == 2 && r.Tick.After(stoppedAt.Add(2*time.Second)) {
			t.Errorf("the exited replica ran tick %s", r.Tick)
		}
	}
	if logs[0].Count("tick already ran") == 0 {
		t.Errorf("the replica whose clock is behind never found a tick already run:\n%s", logs[0])
	}
}

// The tick is the schedule's time, not the clock's: a run that starts 300 ms
// after its tick, or at it, claims the same tick; the next second's run
// claims the next. WithTicks needs Transaction scope and a schedule with
// absolute times, and the pglock schema.
func TestTicksNameTheScheduledTime(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	if _, err := pglock.Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	lk := newLockers(t, 1, pglock.WithScope(pglock.Transaction))[0]
	every, _ := cron.ParseStandard("*/5 * * * *") // every five minutes
	base := time.Date(2026, 11, 30, 12, 5, 0, 0, time.UTC)
	var now time.Time
	ran := 0
	job, err := cronlock.Func(lk, pgtest.UniqueKey(t), func(context.Context) error { ran++; return nil },
		cronlock.WithTicks(every), cronlock.WithClock(func() time.Time { return now }))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		at  time.Time
		ran bool
	}{
		{base.Add(300 * time.Millisecond), true},
		{base, false},
		{base.Add(4*time.Minute + 59*time.Second), false},
		{base.Add(5 * time.Minute), true},
		{base.Add(5*time.Minute + 2*time.Second), false},
	} {
		now = c.at
		got, err := job.RunContext(ctx)
		if err != nil || got != c.ran {
			t.Errorf("run at %s = %v, %v; want %v", c.at.Format(time.TimeOnly), got, err, c.ran)
		}
	}
	if ran != 2 {
		t.Errorf("the work ran %d times, want 2", ran)
	}

	session := newLockers(t, 1)[0]
	if _, err := cronlock.Func(session, "x", func(context.Context) error { return nil }, cronlock.WithTicks(every)); !errors.Is(err, cronlock.ErrInvalidOption) {
		t.Errorf("WithTicks in Session scope = %v, want ErrInvalidOption", err)
	}
	if _, err := cronlock.Func(lk, "x", func(context.Context) error { return nil }, cronlock.WithTicks(cron.Every(time.Second))); !errors.Is(err, cronlock.ErrInvalidOption) {
		t.Errorf("WithTicks(@every) = %v, want ErrInvalidOption", err)
	}
	if _, err := cronlock.Func(lk, "x", func(context.Context) error { return nil }, cronlock.WithTicks(nil)); !errors.Is(err, cronlock.ErrInvalidOption) {
		t.Errorf("WithTicks(nil) = %v, want ErrInvalidOption", err)
	}
}

// A tick whose run fails on one replica is run by another that fires it
// meanwhile: with ticks a run waits for a busy lock instead of skipping it,
// finds the failed run's record rolled back, and runs the tick.
func TestTicksFailedRunIsRunElsewhere(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	if _, err := pglock.Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	every, _ := cron.ParseStandard("*/5 * * * *")
	tick := time.Date(2026, 11, 30, 12, 5, 0, 0, time.UTC)
	clock := func() time.Time { return tick.Add(time.Second) }
	name := pgtest.UniqueKey(t)
	started := make(chan struct{})
	lks := newLockers(t, 2, pglock.WithScope(pglock.Transaction))
	failing, err := cronlock.Func(lks[0], name, func(context.Context) error {
		close(started)
		time.Sleep(300 * time.Millisecond)
		return errors.New("the run failed")
	}, cronlock.WithTicks(every), cronlock.WithClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	ranHere := false
	other, err := cronlock.Func(lks[1], name, func(context.Context) error { ranHere = true; return nil },
		cronlock.WithTicks(every), cronlock.WithClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := failing.RunContext(ctx)
		done <- err
	}()
	<-started
	ran, err := other.RunContext(ctx) // fires while the failing run holds the lock
	if ferr := <-done; ferr == nil {
		t.Error("the failing run reported no error")
	}
	if !ran || err != nil || !ranHere {
		t.Errorf("the other replica's run of the failed tick = %v, %v (ran %v); want it run", ran, err, ranHere)
	}
	if ran, err := other.RunContext(ctx); ran || err != nil {
		t.Errorf("a third run of the tick = %v, %v; want skipped (it ran)", ran, err)
	}
}

// WithTicksSpec takes the spec given to AddJob, parsed as the Cron parses
// it: by cron.ParseStandard (cron.New()'s parser) or by the parser given to
// cron.WithParser. A run's tick is the spec's time; a spec that does not
// parse, an @every spec, a nil parser or two parsers are errors at
// construction.
func TestTicksSpec(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 2)
	if _, err := pglock.Migrate(ctx, pool); err != nil {
		t.Fatal(err)
	}
	lk := newLockers(t, 1, pglock.WithScope(pglock.Transaction))[0]
	seconds := cron.NewParser(cron.Second | cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow | cron.Descriptor)
	base := time.Date(2026, 11, 30, 12, 5, 0, 0, time.UTC)
	for _, c := range []struct {
		spec   string
		parser []cron.ScheduleParser
		at     time.Duration // a run's time after base
		tick   time.Duration // its tick's
	}{
		{"*/5 * * * *", nil, 4*time.Minute + 59*time.Second, 0},
		{"*/10 * * * * *", []cron.ScheduleParser{seconds}, 25 * time.Second, 20 * time.Second},
		{"CRON_TZ=UTC 0 12 * * *", nil, 3 * time.Hour, -5 * time.Minute},
	} {
		var got time.Time
		now := base.Add(c.at)
		job, err := cronlock.Func(lk, pgtest.UniqueKey(t), func(ctx context.Context) error {
			got, _ = cronlock.TickFromContext(ctx)
			return nil
		}, cronlock.WithTicksSpec(c.spec, c.parser...), cronlock.WithClock(func() time.Time { return now }))
		if err != nil {
			t.Fatalf("WithTicksSpec(%q): %v", c.spec, err)
		}
		if ran, err := job.RunContext(ctx); !ran || err != nil || !got.Equal(base.Add(c.tick)) {
			t.Errorf("WithTicksSpec(%q): run at %s = %v, %v, tick %s; want the tick at %s",
				c.spec, now.Format(time.TimeOnly), ran, err, got.Format(time.TimeOnly), base.Add(c.tick).Format(time.TimeOnly))
		}
		if ran, err := job.RunContext(ctx); ran || err != nil {
			t.Errorf("WithTicksSpec(%q): the same tick again = %v, %v; want skipped", c.spec, ran, err)
		}
	}

	fn := func(context.Context) error { return nil }
	for _, c := range []struct {
		name string
		opt  cronlock.Option
	}{
		{"bad spec", cronlock.WithTicksSpec("61 * * * *")},
		{"seconds without their parser", cronlock.WithTicksSpec("*/10 * * * * *")},
		{"@every", cronlock.WithTicksSpec("@every 1m")},
		{"nil parser", cronlock.WithTicksSpec("* * * * *", nil)},
		{"two parsers", cronlock.WithTicksSpec("* * * * *", seconds, seconds)},
	} {
		if _, err := cronlock.Func(lk, "x", fn, c.opt); !errors.Is(err, cronlock.ErrInvalidOption) {
			t.Errorf("%s: Func = %v, want ErrInvalidOption", c.name, err)
		}
	}
}
