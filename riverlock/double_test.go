package riverlock_test

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/pglock/pglocktest"
	"github.com/pglockkit/kit/riverlock"
)

// doubleNode is one River node's middleware on pglocktest's double, with
// each busy policy: River itself needs PostgreSQL for its job tables, so
// the test calls the middleware's Work as River's executor does, with a job
// row and the rest of the stack (the worker) as doInner.
type doubleNode struct {
	locker               *pglock.Locker
	snooze, cancel, wait *riverlock.Middleware
}

func newDoubleNode(t *testing.T, srv *pglocktest.Server, logger *slog.Logger) *doubleNode {
	t.Helper()
	lk, err := pglocktest.NewLocker(srv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	n := &doubleNode{locker: lk}
	for _, m := range []struct {
		mw   **riverlock.Middleware
		busy riverlock.Policy
	}{{&n.snooze, riverlock.Policy{}}, {&n.cancel, riverlock.Cancel()}, {&n.wait, riverlock.Wait(10 * time.Second)}} {
		*m.mw, err = riverlock.NewMiddleware(lk, &riverlock.Config{
			Kinds:  map[string]riverlock.KindConfig{CustomerArgs{}.Kind(): {Key: riverlock.ArgsKey[CustomerArgs]()}},
			Busy:   m.busy,
			Logger: logger,
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return n
}

// customerJob is the row of job id for customer, as River hands it to the
// middleware.
func customerJob(t *testing.T, id int64, customer string) *rivertype.JobRow {
	t.Helper()
	args, err := json.Marshal(CustomerArgs{Customer: customer, Seq: int(id)})
	if err != nil {
		t.Fatal(err)
	}
	return &rivertype.JobRow{ID: id, Kind: CustomerArgs{}.Kind(), EncodedArgs: args, State: rivertype.JobStateRunning, Attempt: 1}
}

// work runs job through mw with a job timeout of 5 s (a worker that runs
// when it should not ends then, and the test fails, not hangs).
func work(mw *riverlock.Middleware, job *rivertype.JobRow, worker func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return mw.Work(ctx, job, worker)
}

// riverlock's middleware on pglocktest's in-memory double, unchanged: two
// jobs of one customer on two nodes run one after the other (Wait), a job
// whose key another node's job holds is snoozed, one whose key is held
// elsewhere is cancelled as a duplicate (Cancel), the database down fails
// the attempt (not busy: River retries it), and a lock lost while the job
// runs cancels the worker's context with cause pglock.ErrLockLost: the
// job's error matches it (River retries), or, when the worker returns nil
// anyway, the job is done and the loss is logged.
func TestOnDouble(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	var logs locktest.SlogRecords
	a, b := newDoubleNode(t, srv, logs.Logger()), newDoubleNode(t, srv, logs.Logger())
	key := locktest.Key(t, a.locker, riverlock.DefaultNamespace(CustomerArgs{}.Kind())+"acme")

	var running locktest.Overlap
	entered := make(chan struct{}, 4)
	release := make(chan struct{})
	causes := make(chan error, 4)
	var failOnLoss atomic.Bool
	worker := func(ctx context.Context) error {
		running.Enter()
		defer running.Leave()
		entered <- struct{}{}
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			causes <- context.Cause(ctx)
			if failOnLoss.Load() {
				return context.Cause(ctx)
			}
			return nil // the work is done: the job succeeded
		}
	}

	// Two jobs of customer acme, one per node, both waiting for the lock:
	// the second waits in the server's queue until the first returns.
	errs := make(chan error, 2)
	var wg sync.WaitGroup
	for i, n := range []*doubleNode{a, b} {
		wg.Go(func() { errs <- work(n.wait, customerJob(t, int64(i+1), "acme"), worker) })
	}
	<-entered
	locktest.WaitFor(t, "the second job to wait", func() bool { return len(srv.Waiters(key)) == 1 })
	release <- struct{}{}
	<-entered
	release <- struct{}{}
	wg.Wait()
	if e1, e2 := <-errs, <-errs; e1 != nil || e2 != nil || running.Max() != 1 {
		t.Fatalf("jobs: %v, %v; at most %d workers at once (want nil, nil, 1)", e1, e2, running.Max())
	}

	// Busy: a job of acme on node a runs; node b's job is snoozed.
	go func() { errs <- work(a.snooze, customerJob(t, 3, "acme"), worker) }()
	<-entered
	err := work(b.snooze, customerJob(t, 4, "acme"), worker)
	var snooze *river.JobSnoozeError
	if !errors.Is(err, riverlock.ErrBusy) || !errors.As(err, &snooze) || snooze.Duration != riverlock.DefaultSnooze {
		t.Fatalf("a job whose key another node's job holds: %v, want ErrBusy and a snooze of %v", err, riverlock.DefaultSnooze)
	}
	release <- struct{}{}
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	// Held elsewhere, under Cancel: the job is a duplicate.
	let := srv.HoldElsewhere(key)
	err = work(b.cancel, customerJob(t, 5, "acme"), worker)
	let()
	var cancelled *rivertype.JobCancelError
	if !errors.Is(err, riverlock.ErrBusy) || !errors.As(err, &cancelled) {
		t.Fatalf("a job whose key is held elsewhere, under Cancel: %v, want ErrBusy and River's cancel", err)
	}
	srv.BusyNext(key)
	if err := work(a.snooze, customerJob(t, 6, "acme"), worker); !errors.As(err, &snooze) {
		t.Fatalf("a job whose key BusyNext made busy: %v, want a snooze", err)
	}

	// The database is down: the attempt fails (River retries it), and is
	// neither a snooze nor a duplicate.
	srv.SetDown(true)
	err = work(a.snooze, customerJob(t, 7, "acme"), worker)
	srv.SetDown(false)
	if !errors.Is(err, pglock.ErrUnavailable) || errors.Is(err, riverlock.ErrBusy) || errors.As(err, &snooze) {
		t.Fatalf("database down: %v, want pglock.ErrUnavailable, not busy", err)
	}
	if len(entered) != 0 {
		t.Fatal("a worker ran without its lock")
	}

	// Lost while the job runs: the worker's context ends with cause
	// ErrLockLost. A worker that returns the cause fails the attempt...
	failOnLoss.Store(true)
	go func() { errs <- work(b.snooze, customerJob(t, 8, "acme"), worker) }()
	<-entered
	if n := srv.Lose(key); n != 1 {
		t.Fatalf("Lose = %d, want 1", n)
	}
	if cause := <-causes; !errors.Is(cause, pglock.ErrLockLost) {
		t.Fatalf("the worker's context ended with %v, want pglock.ErrLockLost", cause)
	}
	if err := <-errs; !errors.Is(err, pglock.ErrLockLost) {
		t.Fatalf("the job whose lock was lost: %v, want pglock.ErrLockLost", err)
	}
	// ... and one that returns nil is done, the loss logged.
	failOnLoss.Store(false)
	go func() { errs <- work(a.wait, customerJob(t, 9, "acme"), worker) }()
	<-entered
	if n := srv.Lose(key); n != 1 {
		t.Fatalf("Lose = %d, want 1", n)
	}
	if cause := <-causes; !errors.Is(cause, pglock.ErrLockLost) {
		t.Fatalf("the worker's context ended with %v, want pglock.ErrLockLost", cause)
	}
	if err := <-errs; err != nil {
		t.Fatalf("a job that succeeded after its lock was lost: %v, want nil (done)", err)
	}
	warned := logs.Errors(slog.LevelWarn, "riverlock: lock lost or not released cleanly after the job succeeded")
	if len(warned) != 1 || !errors.Is(warned[0], pglock.ErrLockLost) {
		t.Fatalf("Warn logs of the loss: %v, want one matching pglock.ErrLockLost", warned)
	}
	if keys := srv.Keys(); len(keys) != 0 {
		t.Fatalf("keys left: %v", keys)
	}
}
