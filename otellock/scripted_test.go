package otellock_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

// TestScriptedRun takes locks on a real server through an instrumented
// Locker: a wait cancelled while another session holds the key, a TryDo
// that finds it busy, an httplock request (wait mode, so Locker.Do) under a
// parent span, and a hold lost to pg_terminate_backend and then released.
// Every instrument then holds exactly the expected counts, the Locker's
// gauges read what Locker.Stats says, no metric carries a key, and the
// request's spans nest: request > pglock.do > (pglock.acquire, the
// handler's span).
func TestScriptedRun(t *testing.T) {
	ctx := context.Background()
	tel := newTelemetry(t)
	admin := pgtest.Pool(t, 4) // the other session, and pg_locks
	pool := pgtest.Pool(t, 4)
	lk, err := pglock.NewLocker(pool, tel.inst.Options()...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	stats, err := tel.inst.RecordStats(lk)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stats.Unregister() })

	name := pgtest.UniqueKey(t)
	nameA, nameB, nameC := name+":a", name+":b", name+":c"
	keyA, err := lk.Key(nameA)
	if err != nil {
		t.Fatal(err)
	}
	keyB, err := lk.Key(httplock.DefaultNamespace + nameB)
	if err != nil {
		t.Fatal(err)
	}

	// 1. Another session holds A; the Locker waits for it in the server's
	// queue, and the wait is cancelled.
	other, err := admin.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Release()
	if _, err := other.Exec(ctx, "SELECT pg_advisory_lock($1::bigint)", keyA.Int64()); err != nil {
		t.Fatal(err)
	}
	lockA, err := lk.NewLock(nameA)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	waited := make(chan error, 1)
	go func() { waited <- lockA.Acquire(wctx) }()
	waitFor(t, "the Locker waiting for A in pg_locks", func() bool {
		hs, err := pgtest.Holders(ctx, admin, keyA)
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range hs {
			if !h.Granted {
				return true
			}
		}
		return false
	})
	// While it waits: the gauges read what Stats reads, on one waiting
	// connection.
	mid := tel.collect(t)
	st := lk.Stats()
	if st.WaitConns != 1 {
		t.Errorf("Stats().WaitConns = %d during the wait, want 1", st.WaitConns)
	}
	conns := byAttr(mid, "pglock.locker.connection.count", "pglock.connection.type")
	if conns["wait"] != float64(st.WaitConns) || conns["lock"] != float64(st.LockConns) {
		t.Errorf("connection.count = %v, Stats = %+v", conns, st)
	}
	if got := total(mid, "pglock.locker.server_lock.usage"); got != float64(st.ServerLocks) {
		t.Errorf("server_lock.usage = %v, Stats().ServerLocks = %d", got, st.ServerLocks)
	}
	cancel()
	if err := <-waited; !errors.Is(err, pglock.ErrNotAcquired) || !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Acquire: %v, want ErrNotAcquired and context.Canceled", err)
	}

	// 2. TryDo on A, still held by the other session: busy.
	ran, err := lk.TryDo(ctx, nameA, func(context.Context) error { return nil })
	if ran || err != nil {
		t.Fatalf("TryDo on a busy key = %v, %v; want false, nil", ran, err)
	}
	if _, err := other.Exec(ctx, "SELECT pg_advisory_unlock($1::bigint)", keyA.Int64()); err != nil {
		t.Fatal(err)
	}

	// 3. An httplock request for B (wait mode: Locker.Do) under a parent
	// span, whose handler makes a span of its own.
	testTracer := tel.tp.Tracer("test")
	locked, err := httplock.Middleware(lk, httplock.Query("id"), httplock.WithWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	handler := locked(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, span := testTracer.Start(r.Context(), "handler")
		span.End()
		w.WriteHeader(http.StatusNoContent)
	}))
	withParentSpan := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, span := testTracer.Start(r.Context(), "POST /orders", trace.WithSpanKind(trace.SpanKindServer))
		defer span.End()
		handler.ServeHTTP(w, r.WithContext(ctx))
	})
	rec := httptest.NewRecorder()
	withParentSpan.ServeHTTP(rec, httptest.NewRequestWithContext(ctx, http.MethodPost, "/orders?id="+url.QueryEscape(nameB), nil))
	if rec.Code != http.StatusNoContent {
		t.Fatalf("request: status %d: %s", rec.Code, rec.Body)
	}

	// 4. C is acquired, and lost: its lock connection's backend is
	// terminated.
	lockC, err := lk.NewLock(nameC)
	if err != nil {
		t.Fatal(err)
	}
	if err := lockC.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	holders := pgtest.Granted(t, admin, lockC.Key())
	if len(holders) != 1 {
		t.Fatalf("holders of C: %+v", holders)
	}
	pgtest.Terminate(t, admin, holders[0].PID)
	select {
	case <-lockC.Lost():
	case <-time.After(5 * time.Second):
		t.Fatal("C not reported lost 5 s after pg_terminate_backend")
	}
	// Lost, not yet released: it still counts as held.
	mid = tel.collect(t)
	if got := total(mid, "pglock.lock.lost"); got != 1 {
		t.Errorf("lost = %v before the release, want 1%s", got, dump(mid))
	}
	if got := total(mid, "pglock.lock.held"); got != 1 {
		t.Errorf("held = %v before the lost lock's release, want 1%s", got, dump(mid))
	}
	if err := lockC.Release(ctx); !errors.Is(err, pglock.ErrLockLost) {
		t.Fatalf("Release of a lost lock: %v, want ErrLockLost", err)
	}

	// The metrics: exactly the script's counts.
	points := tel.collect(t)
	want := map[string]float64{"acquired": 2, "busy": 1, "cancelled": 1}
	for _, name := range []string{"pglock.lock.acquisitions", "pglock.lock.wait.duration"} {
		if got := byAttr(points, name, "pglock.outcome"); !equalCounts(got, want) {
			t.Errorf("%s by outcome = %v, want %v%s", name, got, want, dump(points))
		}
	}
	if got, want := byAttr(points, "pglock.lock.hold.duration", "error.type"), map[string]float64{"": 1, "lock_lost": 1}; !equalCounts(got, want) {
		t.Errorf("hold.duration by error.type = %v, want %v", got, want)
	}
	if got := byAttr(points, "pglock.lock.acquisitions", "error.type"); got["cancelled"] != 1 || len(got) != 2 {
		t.Errorf("acquisitions by error.type = %v, want cancelled: 1 (and none for the others)", got)
	}
	if got := total(points, "pglock.lock.lost"); got != 1 {
		t.Errorf("lost = %v, want 1", got)
	}
	if got := total(points, "pglock.lock.held"); got != 0 {
		t.Errorf("held = %v after every release, want 0%s", got, dump(points))
	}
	for _, p := range points {
		if _, ok := p.attr("pglock.key"); ok {
			t.Errorf("a metric carries the key: %v", p)
		}
		if p.metric == "pglock.lock.acquisitions" || p.metric == "pglock.lock.held" {
			if s, _ := p.attr("pglock.scope"); s != "session" {
				t.Errorf("%v: pglock.scope %q, want session", p, s)
			}
			if m, _ := p.attr("pglock.mode"); m != "exclusive" {
				t.Errorf("%v: pglock.mode %q, want exclusive", p, m)
			}
		}
	}
	for name, unit := range map[string]string{
		"pglock.lock.acquisitions":  "{acquisition}",
		"pglock.lock.wait.duration": "s",
		"pglock.lock.hold.duration": "s",
		"pglock.lock.lost":          "{lock}",
		"pglock.lock.held":          "{lock}",
	} {
		ps := named(points, name)
		if len(ps) == 0 {
			t.Errorf("no %s", name)
		} else if ps[0].unit != unit {
			t.Errorf("%s: unit %q, want %q", name, ps[0].unit, unit)
		}
	}

	// The spans.
	all := tel.spans.Ended()
	byName := map[string][]sdktrace.ReadOnlySpan{}
	for _, s := range all {
		byName[s.Name()] = append(byName[s.Name()], s)
	}
	if n := len(tel.ownSpans()); n != 5 {
		t.Errorf("%d pglock spans, want 5 (3 acquires, a do, a trydo): %v", n, names(all))
	}
	if len(byName["pglock.acquire"]) != 3 || len(byName["pglock.do"]) != 1 || len(byName["pglock.trydo"]) != 1 ||
		len(byName["POST /orders"]) != 1 || len(byName["handler"]) != 1 {
		t.Fatalf("spans: %v", names(all))
	}
	acquires := byName["pglock.acquire"] // in the order they ended: A (cancelled), B (in Do), C
	cancelled, inDo, acquiredC := acquires[0], acquires[1], acquires[2]
	checkSpan(t, cancelled, keyA, "cancelled", codes.Error)
	if v, _ := spanAttr(cancelled, "error.type"); v.AsString() != "cancelled" {
		t.Errorf("cancelled acquire: error.type %q", v.AsString())
	}
	if len(cancelled.Events()) == 0 || cancelled.Events()[0].Name != "exception" {
		t.Errorf("cancelled acquire: events %v, want the error recorded", cancelled.Events())
	}
	checkSpan(t, byName["pglock.trydo"][0], keyA, "busy", codes.Unset)
	do := byName["pglock.do"][0]
	checkSpan(t, do, keyB, "acquired", codes.Unset)
	checkSpan(t, inDo, keyB, "acquired", codes.Unset)
	checkSpan(t, acquiredC, lockC.Key(), "acquired", codes.Unset)

	request := byName["POST /orders"][0]
	if do.Parent().SpanID() != request.SpanContext().SpanID() || do.SpanContext().TraceID() != request.SpanContext().TraceID() {
		t.Errorf("pglock.do is not a child of the request's span")
	}
	if inDo.Parent().SpanID() != do.SpanContext().SpanID() {
		t.Errorf("Do's pglock.acquire is not a child of pglock.do")
	}
	if h := byName["handler"][0]; h.Parent().SpanID() != do.SpanContext().SpanID() {
		t.Errorf("the handler's span is not a child of pglock.do")
	}
	for _, s := range []sdktrace.ReadOnlySpan{cancelled, acquiredC, byName["pglock.trydo"][0]} {
		if s.Parent().IsValid() {
			t.Errorf("%s: has a parent, but its caller's context had no span", s.Name())
		}
	}
	pgtest.WaitFree(t, admin, keyA)
	pgtest.WaitFree(t, admin, keyB)
	pgtest.WaitFree(t, admin, lockC.Key())
}

// checkSpan checks a pglock span's attributes and status.
func checkSpan(t *testing.T, s sdktrace.ReadOnlySpan, key pglock.Key, outcome string, status codes.Code) {
	t.Helper()
	if s.SpanKind() != trace.SpanKindInternal {
		t.Errorf("%s: kind %v, want internal", s.Name(), s.SpanKind())
	}
	if v, _ := spanAttr(s, "pglock.key"); v.AsInt64() != key.Int64() {
		t.Errorf("%s: pglock.key %v, want %d", s.Name(), v.String(), key.Int64())
	}
	if v, _ := spanAttr(s, "pglock.scope"); v.AsString() != "session" {
		t.Errorf("%s: pglock.scope %q", s.Name(), v.AsString())
	}
	if v, _ := spanAttr(s, "pglock.mode"); v.AsString() != "exclusive" {
		t.Errorf("%s: pglock.mode %q", s.Name(), v.AsString())
	}
	if v, _ := spanAttr(s, "pglock.outcome"); v.AsString() != outcome {
		t.Errorf("%s: pglock.outcome %q, want %q", s.Name(), v.AsString(), outcome)
	}
	if _, ok := spanAttr(s, "pglock.key_pair"); ok {
		t.Errorf("%s: pglock.key_pair set for a bigint key", s.Name())
	}
	if s.Status().Code != status {
		t.Errorf("%s: status %v, want %v", s.Name(), s.Status(), status)
	}
}

func names(spans []sdktrace.ReadOnlySpan) []string {
	var out []string
	for _, s := range spans {
		out = append(out, s.Name())
	}
	return out
}

func equalCounts(got, want map[string]float64) bool {
	if len(got) != len(want) {
		return false
	}
	for k, v := range want {
		if got[k] != v {
			return false
		}
	}
	return true
}

// waitFor polls cond for up to 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
