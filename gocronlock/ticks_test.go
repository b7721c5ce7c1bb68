package gocronlock_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-co-op/gocron/v2"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jonboulle/clockwork"

	"github.com/pglockkit/kit/gocronlock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// offsetClock is the real clock read off by a fixed offset: the clock of a
// replica whose time is skewed. gocron schedules on it (gocron.WithClock):
// it computes scheduled times from Now and waits with AfterFunc.
type offsetClock struct {
	clockwork.Clock
	off time.Duration
}

func (c offsetClock) Now() time.Time                  { return c.Clock.Now().Add(c.off) }
func (c offsetClock) Since(t time.Time) time.Duration { return c.Now().Sub(t) }
func (c offsetClock) Until(t time.Time) time.Duration { return t.Sub(c.Now()) }

// migrated returns a pool on the test database with the pglock schema.
func migrated(t *testing.T, conns int32) *pgxpool.Pool {
	t.Helper()
	pool := pgtest.Pool(t, conns)
	if _, err := pglock.Migrate(context.Background(), pool); err != nil {
		t.Fatal(err)
	}
	return pool
}

// runTable creates a table of runs (the tick each run was for, the replica
// that ran it) dropped when the test ends, and returns its quoted name.
func runTable(t *testing.T, db *pgxpool.Pool) string {
	t.Helper()
	table := pgx.Identifier{fmt.Sprintf("gocronlock_ticks_%d_%d_%d", os.Getpid(), time.Now().UnixNano(), tableSeq.Add(1))}.Sanitize()
	// No unique key: a tick run twice must show as two rows.
	if _, err := db.Exec(context.Background(), "CREATE TABLE "+table+" (tick timestamptz NOT NULL, replica int NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = db.Exec(context.Background(), "DROP TABLE "+table) })
	return table
}

// recordRun is a job function that inserts its tick and replica into table,
// in the lock's transaction, then works for 10 ms.
func recordRun(table string, replica int) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		tick, ok := gocronlock.TickFromContext(ctx)
		if !ok {
			return errors.New("no tick in the job's context")
		}
		tx, ok := pglock.TxFromContext(ctx)
		if !ok {
			return errors.New("no transaction in the job's context")
		}
		if _, err := tx.Exec(ctx, "INSERT INTO "+table+" (tick, replica) VALUES ($1, $2)", tick, replica); err != nil {
			return err
		}
		time.Sleep(10 * time.Millisecond) // the work
		return nil
	}
}

type tickRow struct {
	tick     time.Time
	replicas []int32
}

// tickRows returns the ticks of table in order, with the replicas that ran
// each.
func tickRows(ctx context.Context, db *pgxpool.Pool, table string) ([]tickRow, error) {
	rows, err := db.Query(ctx, "SELECT tick, array_agg(replica ORDER BY replica) FROM "+table+" GROUP BY tick ORDER BY tick")
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (tickRow, error) {
		var tr tickRow
		err := r.Scan(&tr.tick, &tr.replicas)
		return tr, err
	})
}

// TestTicksSkewedReplicas is the proof of exactly-once ticks. Three gocron
// schedulers, each on its own clock (offsets 0, +0.7 s and +2 s from the
// real clock, through gocron.WithClock), pool, *pglock.Locker and Ticks, run
// a Func job WithTicks that records its tick in a table in the lock's
// transaction and works for 10 ms. The replica 2 s ahead runs each tick
// first; the others fire the same tick up to 2 s later, long after its lock
// was released, and skip it ("tick already ran"). Half way, that replica's
// scheduler is shut down and its Locker closed (its process exits): the
// replica 0.7 s ahead then fires ticks that the departed one ran, skips
// them, and takes over at the first tick nobody ran. Over 20 ticks and
// more, every tick between the first and the last ran exactly once (one row
// each, none missing), pglock's tick records match the rows, and the
// replica that is behind every other ran nothing.
//
// Two schedules, in parallel: a CronJob every second (the case of the
// issue: 20 ticks in 20 s, the skew two ticks wide) and a DurationJob every
// 250 ms aligned on multiples of 250 ms (gocron.WithStartAt), the same logic
// five times faster, the skew eight ticks wide.
func TestTicksSkewedReplicas(t *testing.T) {
	t.Parallel()
	offsets := []time.Duration{0, 700 * time.Millisecond, 2 * time.Second}
	const first, ahead, behind = 2, 1, 0 // replicas by offset: who runs first, who takes over
	cases := []struct {
		name     string
		interval time.Duration
		def      func(clk clockwork.Clock) (gocron.JobDefinition, []gocron.JobOption)
	}{
		{"CronJob every second", time.Second, func(clockwork.Clock) (gocron.JobDefinition, []gocron.JobOption) {
			return gocron.CronJob("* * * * * *", true), nil
		}},
		{"aligned DurationJob every 250ms", 250 * time.Millisecond, func(clk clockwork.Clock) (gocron.JobDefinition, []gocron.JobOption) {
			d := 250 * time.Millisecond
			start := clk.Now().Truncate(d).Add(d)
			return gocron.DurationJob(d), []gocron.JobOption{gocron.WithStartAt(gocron.WithStartDateTime(start))}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			obs := migrated(t, 2)
			table := runTable(t, obs)
			name := pgtest.UniqueKey(t)
			lockers := newLockers(t, len(offsets))
			recs := make([]*recLog, len(offsets))
			ss := make([]gocron.Scheduler, len(offsets))
			var tickJob string
			for i, off := range offsets {
				recs[i] = &recLog{}
				clk := offsetClock{clockwork.NewRealClock(), off}
				ticks := gocronlock.NewTicks(nil)
				job, err := gocronlock.Func(lockers[i], name, recordRun(table, i),
					gocronlock.WithScope(pglock.Transaction), gocronlock.WithTicks(ticks), gocronlock.WithLogger(recs[i]))
				if err != nil {
					t.Fatal(err)
				}
				tickJob = gocronlock.DefaultNamespace + job.Name()
				ss[i] = newScheduler(t, gocron.WithClock(clk), gocron.WithSchedulerMonitor(ticks))
				def, opts := c.def(clk)
				if _, err := ss[i].NewJob(def, gocron.NewTask(job.Run), append(opts, gocron.WithName(job.Name()))...); err != nil {
					t.Fatal(err)
				}
			}
			for _, s := range ss {
				s.Start()
			}
			count := func(query string, args ...any) int {
				var n int
				if err := obs.QueryRow(ctx, query, args...).Scan(&n); err != nil {
					t.Error(err)
				}
				return n
			}
			ranBy := func(replica int) int { return count("SELECT count(*) FROM "+table+" WHERE replica = $1", replica) }
			ticksRun := func() int { return count("SELECT count(DISTINCT tick) FROM " + table) }
			budget := 15*c.interval + 3*time.Second // 10 ticks, and the skew
			if !waitFor(budget, func() bool { return ranBy(first) >= 8 }) {
				t.Fatalf("the replica 2 s ahead ran %d ticks in %v, want 8", ranBy(first), budget)
			}
			// The replica that runs every tick first exits.
			shutdown(t, ss[first])
			if err := lockers[first].Close(); err != nil {
				t.Fatal(err)
			}
			skippedBefore := recs[ahead].Count("INFO gocronlock: skip", "reason=tick already ran")
			want := max(ticksRun()+10, 21)
			if !waitFor(budget, func() bool { return ticksRun() >= want }) {
				t.Fatalf("%d ticks ran, want %d", ticksRun(), want)
			}
			shutdown(t, ss[ahead], ss[behind])

			rows, err := tickRows(ctx, obs, table)
			if err != nil {
				t.Fatal(err)
			}
			var listing strings.Builder
			for _, r := range rows {
				fmt.Fprintf(&listing, "  tick %s: replicas %v\n", r.tick.Format("15:04:05.000"), r.replicas)
			}
			t.Logf("runs:\n%s", listing.String())
			if len(rows) < 20 {
				t.Fatalf("%d ticks ran, want at least 20", len(rows))
			}
			// The timeline: at the start the replicas behind run the ticks
			// before the first runner's schedule begins (it starts 2 s
			// ahead); then the first runner runs every tick until it exits;
			// then the replica next ahead runs them, from the first tick
			// that nobody ran. The replica behind both never runs one then.
			//
			// Who runs a tick is a race that the skew decides, and a loaded
			// machine can stall a replica past it (1.3 s between the first
			// runner and the one 0.7 s ahead). So a tick that another replica
			// ran is out of turn only when the replica whose turn it was did
			// not come to it late: came late, it logged a skip of that tick
			// ("still running here", its previous run not done, or "tick
			// already ran"). A tick run twice is an error without excuse.
			//
			// A missing tick is excused only when every replica that came
			// to it skipped it as "still running here" (its previous run had
			// not ended: the documented skip of an overlapping run), none
			// said it had run, and one came to it at all. At the start only
			// replica 0 fires the first ticks (the others' schedules begin
			// later), and its first run, which connects, can outlast a
			// tick or two on a loaded machine.
			tickTag := func(tick time.Time) string { return "tick=" + tick.Local().Format("2006-01-02 15:04:05.999999999 ") }
			late := func(r tickRow, replica int) bool {
				return recs[replica].Count("INFO gocronlock: skip", tickTag(r.tick)) > 0
			}
			missing := func(tick time.Time) {
				var still, other int
				var lines []string
				for i, rec := range recs {
					for _, l := range strings.Split(rec.String(), "\n") {
						if strings.Contains(l, tickTag(tick)) {
							lines = append(lines, fmt.Sprintf("replica %d: %s", i, l))
							if strings.Contains(l, "reason=still running here") {
								still++
							} else {
								other++
							}
						}
					}
				}
				if still > 0 && other == 0 {
					t.Logf("tick %s ran nowhere: each replica that came to it was still running the previous one", tick.Format("15:04:05.000"))
					return
				}
				t.Errorf("tick %s is missing; the replicas logged:\n%s", tick.Format("15:04:05.000"), strings.Join(lines, "\n"))
			}
			phase := 0 // 0 start-up, 1 the first runner, 2 the takeover
			for i, r := range rows {
				if len(r.replicas) != 1 {
					t.Errorf("tick %s ran %d times (replicas %v), want once", r.tick.Format("15:04:05.000"), len(r.replicas), r.replicas)
				}
				if i > 0 && r.tick.Sub(rows[i-1].tick) != c.interval {
					if r.tick.Sub(rows[i-1].tick)%c.interval != 0 || r.tick.Sub(rows[i-1].tick) < c.interval {
						t.Errorf("ticks %s and %s are %v apart, want %v",
							rows[i-1].tick.Format("15:04:05.000"), r.tick.Format("15:04:05.000"), r.tick.Sub(rows[i-1].tick), c.interval)
					}
					for m := rows[i-1].tick.Add(c.interval); m.Before(r.tick); m = m.Add(c.interval) {
						missing(m)
					}
				}
				if r.tick.Truncate(c.interval) != r.tick {
					t.Errorf("tick %s is not a scheduled time (a multiple of %v)", r.tick.Format("15:04:05.000000"), c.interval)
				}
				who := r.replicas[0]
				switch {
				case phase == 0 && who == first, phase == 1 && who == ahead && !late(r, first):
					phase++
				}
				turn := map[int]int{1: first, 2: ahead}[phase]
				if phase > 0 && int(who) != turn {
					if late(r, turn) {
						t.Logf("tick %s ran on replica %d: replica %d, whose turn it was, came to it late", r.tick.Format("15:04:05.000"), who, turn)
					} else {
						t.Errorf("tick %s ran on replica %d, out of turn (replica %d's)", r.tick.Format("15:04:05.000"), who, turn)
					}
				}
			}
			if phase != 2 {
				t.Errorf("no takeover: the first runner ran ticks: %v; the next one after it: %v", phase >= 1, phase == 2)
			}
			// The replica 0.7 s ahead fired, after the first runner exited,
			// ticks that it had run (0.7 s to 2 s ahead of the real clock):
			// their records outlived it.
			if n := recs[ahead].Count("INFO gocronlock: skip", "reason=tick already ran") - skippedBefore; n < 1 {
				t.Errorf("the replica that took over skipped %d ticks that the exited one had run, want at least 1", n)
			}
			if n := recs[behind].Count("INFO gocronlock: skip", "reason=tick already ran"); n < len(rows)/2 {
				t.Errorf("the replica behind skipped %d ticks as already run, want about %d", n, len(rows))
			}
			for i, rec := range recs {
				if n := rec.Count("ERROR"); n > 0 {
					t.Errorf("replica %d logged errors:\n%s", i, rec.String())
				}
			}
			// pglock's records are the rows: each committed with its run.
			var recorded, rowsSeen int
			err = obs.QueryRow(ctx, `SELECT (SELECT count(*) FROM pglock.tick WHERE job = $1),
				(SELECT count(*) FROM pglock.tick p JOIN `+table+` r ON r.tick = p.tick WHERE p.job = $1)`, tickJob).Scan(&recorded, &rowsSeen)
			if err != nil {
				t.Fatal(err)
			}
			if recorded != len(rows) || rowsSeen != len(rows) {
				t.Errorf("pglock.tick has %d records (%d matching a run) for %d ticks run", recorded, rowsSeen, len(rows))
			}
		})
	}
}

// TestTicksScheduledTime: the tick a run records is the time gocron
// scheduled it for, not the time it started. A BeforeJobRuns listener holds
// each run back (300 ms for a CronJob every second; 1.3 s, past the next
// second, for a OneTimeJob at an instant with nanoseconds): the function's
// tick, and pglock's record, are the scheduled time.
func TestTicksScheduledTime(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	obs := migrated(t, 1)
	lk := newLockers(t, 1)[0]
	cases := []struct {
		name  string
		def   func(at time.Time) gocron.JobDefinition
		late  time.Duration
		check func(at, tick, started time.Time) error
	}{
		{"CronJob every second, 300ms late", func(time.Time) gocron.JobDefinition { return gocron.CronJob("* * * * * *", true) }, 300 * time.Millisecond,
			func(_, tick, started time.Time) error {
				if tick.Truncate(time.Second) != tick || started.Sub(tick) < 300*time.Millisecond || started.Sub(tick) >= time.Second {
					return fmt.Errorf("tick %s for a run started at %s, want the whole second the run was scheduled for, 300 ms before",
						tick.Format("15:04:05.000000"), started.Format("15:04:05.000000"))
				}
				return nil
			}},
		{"OneTimeJob, 1.3s late", func(at time.Time) gocron.JobDefinition { return gocron.OneTimeJob(gocron.OneTimeJobStartDateTime(at)) }, 1300 * time.Millisecond,
			func(at, tick, started time.Time) error {
				if !tick.Equal(at) || started.Sub(tick) < 1300*time.Millisecond {
					return fmt.Errorf("tick %s for a run started at %s, want the scheduled %s",
						tick.Format("15:04:05.000000000"), started.Format("15:04:05.000000000"), at.Format("15:04:05.000000000"))
				}
				return nil
			}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			type run struct {
				tick, started time.Time
			}
			runs := make(chan run, 1)
			ticks := gocronlock.NewTicks(nil)
			job, err := gocronlock.Func(lk, pgtest.UniqueKey(t), func(ctx context.Context) error {
				tick, _ := gocronlock.TickFromContext(ctx)
				runs <- run{tick, time.Now()}
				return nil
			}, gocronlock.WithScope(pglock.Transaction), gocronlock.WithTicks(ticks))
			if err != nil {
				t.Fatal(err)
			}
			errs := make(chan error, 1)
			s := newScheduler(t, gocron.WithSchedulerMonitor(ticks))
			at := time.Now().Add(700*time.Millisecond + 123457*time.Nanosecond)
			_, err = s.NewJob(c.def(at), gocron.NewTask(job.Run), gocron.WithName(job.Name()), gocron.WithLimitedRuns(1),
				gocron.WithEventListeners(
					gocron.BeforeJobRuns(func(uuid.UUID, string) { time.Sleep(c.late) }),
					gocron.AfterJobRunsWithError(func(_ uuid.UUID, _ string, err error) { errs <- err }),
				))
			if err != nil {
				t.Fatal(err)
			}
			s.Start()
			var r run
			select {
			case r = <-runs:
			case err := <-errs:
				t.Fatalf("the run failed: %v", err)
			case <-time.After(5 * time.Second):
				t.Fatal("no run within 5 s")
			}
			shutdown(t, s)
			if err := c.check(at, r.tick, r.started); err != nil {
				t.Error(err)
			}
			var recorded time.Time
			if err := obs.QueryRow(ctx, "SELECT tick FROM pglock.tick WHERE job = $1", gocronlock.DefaultNamespace+job.Name()).Scan(&recorded); err != nil {
				t.Fatal(err)
			}
			if !recorded.Equal(r.tick.Truncate(time.Microsecond)) {
				t.Errorf("pglock.tick records %s, want the run's tick %s", recorded.Format(time.RFC3339Nano), r.tick.Format(time.RFC3339Nano))
			}
		})
	}
}

// TestTicksByHand: a Job WithTicks driven without gocron. TryRun has no
// scheduled time (ErrNoTick; the function does not run). TryRunTick runs a
// tick once: a second run of it, here or on another replica, is skipped and
// logged; a run that failed leaves its tick unrecorded, so it runs again.
func TestTicksByHand(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	migrated(t, 1)
	lks := newLockers(t, 2)
	name := pgtest.UniqueKey(t)
	var rec recLog
	var runs atomic.Int32
	fail := errors.New("job failed")
	var failNext atomic.Bool
	fn := func(ctx context.Context) error {
		if _, ok := gocronlock.TickFromContext(ctx); !ok {
			return errors.New("no tick in the job's context")
		}
		if failNext.Swap(false) {
			return fail
		}
		runs.Add(1)
		return nil
	}
	jobs := make([]*gocronlock.Job, 2)
	for i, lk := range lks {
		j, err := gocronlock.Func(lk, name, fn, gocronlock.WithScope(pglock.Transaction),
			gocronlock.WithTicks(gocronlock.NewTicks(nil)), gocronlock.WithLogger(&rec))
		if err != nil {
			t.Fatal(err)
		}
		jobs[i] = j
	}
	if ran, err := jobs[0].TryRun(ctx); ran || !errors.Is(err, gocronlock.ErrNoTick) {
		t.Errorf("TryRun without gocron = (%v, %v), want ErrNoTick", ran, err)
	}
	if ran, err := jobs[0].TryRunTick(ctx, time.Time{}); ran || !errors.Is(err, gocronlock.ErrNoTick) {
		t.Errorf("TryRunTick(zero) = (%v, %v), want ErrNoTick", ran, err)
	}
	tick := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC).Add(time.Duration(rand.IntN(1e6)) * time.Second)
	for i, want := range []bool{true, false} {
		for r, j := range jobs {
			if ran, err := j.TryRunTick(ctx, tick); err != nil || ran != (want && r == 0) {
				t.Errorf("round %d, replica %d: TryRunTick = (%v, %v), want (%v, nil)", i, r, ran, err, want && r == 0)
			}
		}
	}
	if n := rec.Count("INFO gocronlock: skip", "reason=tick already ran", "tick="+tick.String()); n != 3 {
		t.Errorf("%d skips logged as tick already ran, want 3:\n%s", n, rec.String())
	}
	failNext.Store(true)
	next := tick.Add(time.Second)
	if ran, err := jobs[1].TryRunTick(ctx, next); !ran || !errors.Is(err, fail) {
		t.Errorf("a failing run = (%v, %v), want (true, its error)", ran, err)
	}
	if ran, err := jobs[0].TryRunTick(ctx, next); !ran || err != nil {
		t.Errorf("the tick of a failed run, again = (%v, %v), want (true, nil): a failed run records nothing", ran, err)
	}
	if n := runs.Load(); n != 2 {
		t.Errorf("the function succeeded %d times, want 2", n)
	}
}

// freshDatabase creates an empty database (no pglock schema) for one test
// and returns its URL; it is dropped when the test ends.
func freshDatabase(t *testing.T) string {
	t.Helper()
	admin := pgtest.Pool(t, 1)
	name := fmt.Sprintf("gocronlock_fresh_%d", rand.Uint32())
	if _, err := admin.Exec(context.Background(), "CREATE DATABASE "+name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = admin.Exec(context.Background(), "DROP DATABASE "+name+" WITH (FORCE)") })
	u, err := url.Parse(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	return u.String()
}

// TestTicksNeedSchema: without the pglock schema a run WithTicks fails with
// an error matching pglock.ErrSchema, the function does not run, and the
// lock is free afterwards.
func TestTicksNeedSchema(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, freshDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	lk, err := pglock.NewLocker(pool)
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	var rec recLog
	ran := false
	job, err := gocronlock.Func(lk, pgtest.UniqueKey(t), func(context.Context) error { ran = true; return nil },
		gocronlock.WithScope(pglock.Transaction), gocronlock.WithTicks(gocronlock.NewTicks(nil)), gocronlock.WithLogger(&rec))
	if err != nil {
		t.Fatal(err)
	}
	ok, err := job.TryRunTick(ctx, time.Now().Truncate(time.Second))
	if ok || ran || !errors.Is(err, pglock.ErrSchema) {
		t.Errorf("TryRunTick without the schema = (%v, %v), function ran: %v; want ErrSchema", ok, err, ran)
	}
	if rec.Count("ERROR gocronlock: tick not recorded") != 1 {
		t.Errorf("log:\n%s", rec.String())
	}
	var n int
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())").Scan(&n); err != nil || n != 0 {
		t.Errorf("advisory locks left: %d, %v", n, err)
	}
}
