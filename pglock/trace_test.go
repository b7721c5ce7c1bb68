package pglock_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

type traceKey struct{}

// recTracer records the operations a Lock traces, and marks each one's
// context with its name, so that nesting can be checked.
type recTracer struct {
	mu  sync.Mutex
	ops []recOp
}

type recOp struct {
	name, parent string
	ended        bool
	held         bool
	err          error
}

func (r *recTracer) Start(ctx context.Context, op pglock.TraceOp) (context.Context, func(bool, error)) {
	parent, _ := ctx.Value(traceKey{}).(string)
	r.mu.Lock()
	i := len(r.ops)
	r.ops = append(r.ops, recOp{name: op.Name, parent: parent})
	r.mu.Unlock()
	return context.WithValue(ctx, traceKey{}, op.Name), func(held bool, err error) {
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.ops[i].ended {
			panic("end called twice")
		}
		r.ops[i].ended, r.ops[i].held, r.ops[i].err = true, held, err
	}
}

func (r *recTracer) take() []recOp {
	r.mu.Lock()
	defer r.mu.Unlock()
	ops := r.ops
	r.ops = nil
	return ops
}

// A Tracer sees each blocking Acquire, Do and TryDo, once each, with the
// outcome; Do's wait nests under the Do, and so does the work (fn's context
// carries the Do's); TryAcquire and Release are not traced. Events carry the
// hold's length.
func TestTracerAndHeld(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	tr := &recTracer{}
	var evMu sync.Mutex
	var events []pglock.Event
	lk, err := pglock.NewLocker(pool, pglock.WithTracer(tr), pglock.WithObserver(func(e pglock.Event) {
		evMu.Lock()
		events = append(events, e)
		evMu.Unlock()
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	key := pgtest.UniqueKey(t)
	l, _ := lk.NewLock(key)

	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if ops := tr.take(); len(ops) != 1 || ops[0].name != "acquire" || !ops[0].ended || !ops[0].held || ops[0].err != nil {
		t.Errorf("Acquire traced as %+v", ops)
	}
	evMu.Lock()
	last := events[len(events)-1]
	evMu.Unlock()
	if last.Kind != pglock.EventReleased || last.Held < 20*time.Millisecond || last.Held > 5*time.Second {
		t.Errorf("release event = %+v, want Held of about 20 ms", last)
	}

	err = l.Do(ctx, func(ctx context.Context) error {
		if name, _ := ctx.Value(traceKey{}).(string); name != "do" {
			t.Errorf("fn's context carries trace %q, want the Do's", name)
		}
		return errors.New("work failed")
	})
	ops := tr.take()
	if len(ops) != 2 || ops[0].name != "do" || ops[1].name != "acquire" || ops[1].parent != "do" ||
		!ops[0].held || ops[0].err == nil || ops[0].err.Error() != err.Error() || !ops[1].held {
		t.Errorf("Do traced as %+v (Do returned %v)", ops, err)
	}

	// Busy: TryDo ends with held false and no error; a blocking Acquire
	// that times out ends with its error.
	other, _ := pglock.NewLock(pgtest.Pool(t, 2), key)
	if err := other.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	ran, err := l.TryDo(ctx, func(context.Context) error { return nil })
	if ran || err != nil {
		t.Fatalf("TryDo while busy = %v, %v", ran, err)
	}
	if ok, err := l.TryAcquire(ctx); ok || err != nil {
		t.Fatalf("TryAcquire while busy = %v, %v", ok, err)
	}
	wctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	aerr := l.Acquire(wctx)
	cancel()
	ops = tr.take()
	if len(ops) != 2 || ops[0].name != "trydo" || ops[0].held || ops[0].err != nil ||
		ops[1].name != "acquire" || ops[1].held || !errors.Is(ops[1].err, pglock.ErrNotAcquired) || aerr == nil {
		t.Errorf("busy TryDo and timed-out Acquire traced as %+v", ops)
	}
	if err := other.Release(ctx); err != nil {
		t.Fatal(err)
	}

	// A panic ends the Do's trace with an error that says so, and goes on.
	func() {
		defer func() {
			if v := recover(); v != "boom" {
				t.Errorf("recovered %v, want the panic of fn", v)
			}
		}()
		_ = l.Do(ctx, func(context.Context) error { panic("boom") })
	}()
	ops = tr.take()
	if len(ops) != 2 || ops[0].name != "do" || !ops[0].ended || ops[0].err == nil || !strings.Contains(ops[0].err.Error(), "panic") {
		t.Errorf("panicking Do traced as %+v", ops)
	}
	pgtest.WaitFree(t, pool, l.Key())

	// A lost hold reports how long it was held.
	lost, _ := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithObserver(func(e pglock.Event) {
		evMu.Lock()
		events = append(events, e)
		evMu.Unlock()
	}))
	if err := lost.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	pgtest.Terminate(t, pool, pgtest.Granted(t, pool, lost.Key())[0].PID)
	select {
	case <-lost.Lost():
	case <-time.After(3 * time.Second):
		t.Fatal("not lost")
	}
	_ = lost.Release(ctx)
	evMu.Lock()
	defer evMu.Unlock()
	found := false
	for _, e := range events {
		if e.Kind == pglock.EventLost && e.Key == lost.Key() {
			found = true
			if e.Held < 100*time.Millisecond {
				t.Errorf("lost event Held = %v, want at least 100 ms", e.Held)
			}
		}
	}
	if !found {
		t.Error("no EventLost")
	}
}

// A hold that was lost and then let go by the next Acquire (without a
// Release) still ends with an event, so that counts of held locks come back
// to zero; events and traces carry the key's name.
func TestLostHoldDroppedByAcquireEnds(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	var mu sync.Mutex
	held := 0
	var names []string
	l, err := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithNamespace("ns:"), pglock.WithObserver(func(e pglock.Event) {
		mu.Lock()
		defer mu.Unlock()
		names = append(names, e.KeyName)
		switch e.Kind {
		case pglock.EventAcquired:
			held++
		case pglock.EventReleased, pglock.EventReleaseFailed:
			held--
		}
	}))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(l.Name(), "ns:pgtest:") {
		t.Errorf("Name() = %q, want the namespace and the name", l.Name())
	}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	pgtest.Terminate(t, pool, pgtest.Granted(t, pool, l.Key())[0].PID)
	<-l.Lost()
	if err := l.Acquire(ctx); err != nil { // no Release: the lost hold is let go
		t.Fatal(err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if held != 0 {
		t.Errorf("acquired minus ended events = %d, want 0", held)
	}
	for _, n := range names {
		if n != l.Name() {
			t.Errorf("event KeyName %q, want %q", n, l.Name())
		}
	}
	if k, _ := pglock.NewLock(pool, pglock.Int64Key(7)); k.Name() != "" {
		t.Errorf("Name of a Key = %q, want empty", k.Name())
	}
}
