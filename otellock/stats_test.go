package otellock_test

import (
	"context"
	"errors"
	"math"
	"testing"

	"go.opentelemetry.io/otel/attribute"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/otellock"
	"github.com/pglockkit/kit/pglock"
)

// RecordStats reports a Locker's figures as Stats gives them: nothing held
// and no connection before its first lock; then a key held and another
// goroutine queued behind it in the process, with the lock-table cap read
// from the server; nothing more once unregistered.
func TestRecordStats(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tel := newTelemetry(t)
	pool := pgtest.Pool(t, 2)
	lk, err := pglock.NewLocker(pool, append(tel.inst.Options(), pglock.WithLockConns(2))...)
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	reg, err := tel.inst.RecordStats(lk)
	if err != nil {
		t.Fatal(err)
	}

	points := tel.collect(t)
	for name, want := range map[string]float64{
		"pglock.locker.connection.count":  0,
		"pglock.locker.queued":            0,
		"pglock.locker.server_lock.usage": 0,
	} {
		if ps := named(points, name); len(ps) == 0 || total(points, name) != want {
			t.Errorf("%s before the first lock = %v, want %v%s", name, ps, want, dump(points))
		}
	}
	for _, name := range []string{"pglock.locker.server_lock.limit", "pglock.locker.server_lock.utilization"} {
		if ps := named(points, name); len(ps) != 0 {
			t.Errorf("%s reported before the cap is known: %v", name, ps)
		}
	}

	name := pgtest.UniqueKey(t)
	holder, err := lk.NewLock(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	queued, err := lk.NewLock(name)
	if err != nil {
		t.Fatal(err)
	}
	qctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- queued.Acquire(qctx) }()
	waitFor(t, "a goroutine queued in the Locker", func() bool { return lk.Stats().Queued == 1 })

	points = tel.collect(t)
	st := lk.Stats()
	if st.MaxLocks <= 0 || st.ServerLocks != 1 || st.LockConns < 1 {
		t.Fatalf("Stats = %+v, want a cap, 1 server lock, a lock connection", st)
	}
	if got := total(points, "pglock.locker.queued"); got != 1 {
		t.Errorf("queued = %v, want 1", got)
	}
	if got := total(points, "pglock.locker.server_lock.usage"); got != 1 {
		t.Errorf("server_lock.usage = %v, want 1", got)
	}
	if got := total(points, "pglock.locker.server_lock.limit"); got != float64(st.MaxLocks) {
		t.Errorf("server_lock.limit = %v, want Stats().MaxLocks = %d", got, st.MaxLocks)
	}
	ps := named(points, "pglock.locker.server_lock.utilization")
	if len(ps) != 1 || ps[0].kind != "gauge" || ps[0].unit != "1" || math.Abs(ps[0].value-1/float64(st.MaxLocks)) > 1e-12 {
		t.Errorf("server_lock.utilization = %v, want 1/%d as a gauge of unit 1", ps, st.MaxLocks)
	}
	conns := byAttr(points, "pglock.locker.connection.count", "pglock.connection.type")
	if conns["lock"] != float64(st.LockConns) || conns["wait"] != float64(st.WaitConns) || len(conns) != 2 {
		t.Errorf("connection.count = %v, Stats = %+v", conns, st)
	}
	states := byAttr(points, "pglock.locker.connection.count", "pglock.connection.state")
	if states["waiting"] != float64(st.WaitingConns) || states["holding"] != float64(st.HoldingConns) ||
		states["idle"] != float64(st.IdleConns) || states["leader"] != float64(st.LeaderConns) || states[""] != float64(st.LockConns) {
		t.Errorf("connection.count by state = %v, Stats = %+v", states, st)
	}
	for _, name := range []string{"pglock.locker.connection.count", "pglock.locker.queued", "pglock.locker.server_lock.usage", "pglock.locker.server_lock.limit"} {
		for _, p := range named(points, name) {
			if p.kind != "updown" {
				t.Errorf("%s: %s, want an UpDownCounter", name, p.kind)
			}
			if _, ok := p.attr("pglock.scope"); ok {
				t.Errorf("%s: has pglock.scope; a Locker's figures are not a lock's", name)
			}
		}
	}

	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("queued Acquire: %v", err)
	}
	if err := holder.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if got := total(tel.collect(t), "pglock.locker.server_lock.usage"); got != 0 {
		t.Errorf("server_lock.usage after the release = %v, want 0", got)
	}
	if err := reg.Unregister(); err != nil {
		t.Fatal(err)
	}
	for _, p := range tel.collect(t) {
		if p.metric == "pglock.locker.queued" || p.metric == "pglock.locker.server_lock.usage" {
			t.Errorf("after Unregister: %v", p)
		}
	}
}

// Two Lockers, each with an Instrumentation with attributes of its own,
// report two series of every figure, and their lock metrics and spans carry
// the attributes too.
func TestWithAttributesTellsLockersApart(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tel := newTelemetry(t)
	pool := pgtest.Pool(t, 2)
	for _, name := range []string{"jobs", "http"} {
		inst, err := otellock.New(otellock.WithMeterProvider(tel.mp), otellock.WithTracerProvider(tel.tp),
			otellock.WithAttributes(attribute.String("pglock.locker", name)))
		if err != nil {
			t.Fatal(err)
		}
		lk, err := pglock.NewLocker(pool, inst.Options()...)
		if err != nil {
			t.Fatal(err)
		}
		defer lk.Close()
		reg, err := inst.RecordStats(lk)
		if err != nil {
			t.Fatal(err)
		}
		defer reg.Unregister()
		if name == "jobs" {
			if err := lk.Do(ctx, pgtest.UniqueKey(t), func(context.Context) error { return nil }); err != nil {
				t.Fatal(err)
			}
		}
	}
	points := tel.collect(t)
	if got := byAttr(points, "pglock.locker.queued", "pglock.locker"); len(got) != 2 || got["jobs"] != 0 || got["http"] != 0 {
		t.Errorf("queued by pglock.locker = %v, want a series for jobs and one for http", got)
	}
	if got := byAttr(points, "pglock.lock.acquisitions", "pglock.locker"); got["jobs"] != 1 || len(got) != 1 {
		t.Errorf("acquisitions by pglock.locker = %v, want jobs: 1", got)
	}
	for _, s := range tel.ownSpans() {
		if v, _ := spanAttr(s, "pglock.locker"); v.AsString() != "jobs" {
			t.Errorf("%s: pglock.locker = %q, want jobs", s.Name(), v.AsString())
		}
	}
}

// RecordLockTable reports the server's advisory locks against its lock
// table's size, the figures `pglock locks` prints: a held lock counts, the
// capacity is the server's formula, and the ratio is their quotient.
func TestRecordLockTable(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tel := newTelemetry(t)
	pool := pgtest.Pool(t, 2)
	if _, err := tel.inst.RecordLockTable(nil, 0); !errors.Is(err, otellock.ErrInvalidOption) {
		t.Errorf("RecordLockTable(nil) = %v, want ErrInvalidOption", err)
	}
	reg, err := tel.inst.RecordLockTable(pool, 0)
	if err != nil {
		t.Fatal(err)
	}
	l, _ := pglock.NewLock(pool, pgtest.UniqueKey(t))
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	defer l.Release(ctx)
	var want int64
	if err := pool.QueryRow(ctx, `SELECT current_setting('max_locks_per_transaction')::int8 *
		(current_setting('max_connections')::int8 + current_setting('max_prepared_transactions')::int8)`).Scan(&want); err != nil {
		t.Fatal(err)
	}
	points := tel.collect(t)
	held, capacity := total(points, "pglock.server.advisory_locks"), total(points, "pglock.server.lock_table.capacity")
	if held < 1 || capacity != float64(want) {
		t.Errorf("advisory locks %v of %v, want at least 1 of %d%s", held, capacity, want, dump(points))
	}
	if u := total(points, "pglock.server.lock_table.utilization"); math.Abs(u-held/capacity) > 1e-9 {
		t.Errorf("utilization %v, want %v", u, held/capacity)
	}
	if err := reg.Unregister(); err != nil {
		t.Fatal(err)
	}
	if ps := named(tel.collect(t), "pglock.server.advisory_locks"); len(ps) != 0 {
		t.Errorf("reported after Unregister: %v", ps)
	}
}
