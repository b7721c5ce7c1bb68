package riverlock_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/riverlock"
)

// CustomerArgs is a job for one customer: jobs of one customer must not
// overlap.
type CustomerArgs struct {
	Customer string `json:"customer"`
	Seq      int    `json:"seq"`
}

func (CustomerArgs) Kind() string      { return "riverlock_customer" }
func (a CustomerArgs) LockKey() string { return a.Customer }

// overlap counts the jobs of each key running now, and the most ever seen.
type overlap struct {
	mu      sync.Mutex
	running map[string]int
	max     map[string]int
	order   map[string][]int
	nodes   map[string]int
}

func newOverlap() *overlap {
	return &overlap{running: map[string]int{}, max: map[string]int{}, order: map[string][]int{}, nodes: map[string]int{}}
}

func (o *overlap) enter(key string, seq int, node string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.running[key]++
	o.max[key] = max(o.max[key], o.running[key])
	o.order[key] = append(o.order[key], seq)
	o.nodes[node]++
}

func (o *overlap) leave(key string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.running[key]--
}

type customerWorker struct {
	river.WorkerDefaults[CustomerArgs]
	node  string
	ov    *overlap
	sleep time.Duration
}

func (w *customerWorker) Work(ctx context.Context, job *river.Job[CustomerArgs]) error {
	w.ov.enter(job.Args.Customer, job.Args.Seq, w.node)
	defer w.ov.leave(job.Args.Customer)
	select {
	case <-time.After(w.sleep):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Two clients with two pools each (two nodes) work 50 jobs over 5 keys:
// jobs of one key never overlap, every job completes on its first attempt
// (snoozes do not count), and some jobs were in fact snoozed, so the keys
// were contended. Nothing stays locked.
func TestSerializeTwoNodes(t *testing.T) {
	t.Parallel()
	e := newRiverEnv(t)
	ov, res, clients, lockers := runCustomers(t, e, true, 15*time.Millisecond)
	const jobs, keys = 50, 5

	snoozed := 0
	for _, r := range res {
		job := waitJob(t, clients[0], r.Job.ID, 60*time.Second)
		if job.State != rivertype.JobStateCompleted {
			t.Errorf("job %d: state %s, errors %+v", job.ID, job.State, job.Errors)
		}
		if job.Attempt != 1 || len(job.Errors) != 0 {
			t.Errorf("job %d: attempt %d, errors %+v; want attempt 1 and no errors (snoozes must not consume attempts)", job.ID, job.Attempt, job.Errors)
		}
		if strings.Contains(string(job.Metadata), `"snoozes"`) {
			snoozed++
		}
	}
	ov.mu.Lock()
	defer ov.mu.Unlock()
	total := 0
	for k := range keys {
		key := fmt.Sprintf("c%d", k)
		if ov.max[key] != 1 {
			t.Errorf("key %s: at most %d jobs at once, want 1", key, ov.max[key])
		}
		total += len(ov.order[key])
		t.Logf("key %s order %v", key, ov.order[key])
		pgtest.WaitFree(t, e.admin, e.key(t, lockers[0], CustomerArgs{}.Kind(), key))
	}
	if total != jobs {
		t.Errorf("%d runs, want %d (each job exactly once)", total, jobs)
	}
	if snoozed == 0 {
		t.Errorf("no job was snoozed: the keys were never contended, the test proves nothing")
	}
	t.Logf("%d of %d jobs snoozed at least once; runs per node %v", snoozed, jobs, ov.nodes)
	if ov.nodes["node1"] == 0 || ov.nodes["node2"] == 0 {
		t.Errorf("runs per node %v: both nodes should have worked jobs", ov.nodes)
	}
}

// The control: the same workload without the middleware overlaps, so the
// overlap counter above can see an overlap.
func TestSerializeControlOverlaps(t *testing.T) {
	t.Parallel()
	e := newRiverEnv(t)
	ov, res, clients, _ := runCustomers(t, e, false, 80*time.Millisecond)
	for _, r := range res {
		waitJob(t, clients[0], r.Job.ID, 60*time.Second)
	}
	ov.mu.Lock()
	defer ov.mu.Unlock()
	most := 0
	for _, n := range ov.max {
		most = max(most, n)
	}
	if most < 2 {
		t.Fatalf("without the middleware no key ever ran twice at once (max %v): the counter cannot see overlap", ov.max)
	}
}

// runCustomers starts two nodes (a River client and a Locker, each on pools
// of their own), with the middleware or without, and inserts 50 jobs over 5
// keys.
func runCustomers(t *testing.T, e *riverEnv, locked bool, sleep time.Duration) (*overlap, []*rivertype.JobInsertResult, []*river.Client[pgx.Tx], []*pglock.Locker) {
	t.Helper()
	ov := newOverlap()
	var lockers []*pglock.Locker
	var clients []*river.Client[pgx.Tx]
	for _, node := range []string{"node1", "node2"} {
		var mws []rivertype.Middleware
		if locked {
			lk := e.locker(t, 6)
			lockers = append(lockers, lk)
			mws = append(mws, newMiddleware(t, lk, &riverlock.Config{
				Busy: riverlock.Snooze(30 * time.Millisecond),
				Kinds: map[string]riverlock.KindConfig{
					CustomerArgs{}.Kind(): {Key: riverlock.ArgsKey[CustomerArgs]()},
				},
			}))
		}
		workers := river.NewWorkers()
		river.AddWorker(workers, &customerWorker{node: node, ov: ov, sleep: sleep})
		clients = append(clients, e.client(t, workers, 5, mws...))
	}
	params := make([]river.InsertManyParams, 50)
	for i := range params {
		params[i] = river.InsertManyParams{Args: CustomerArgs{Customer: fmt.Sprintf("c%d", i%5), Seq: i}}
	}
	res, err := clients[0].InsertMany(context.Background(), params)
	if err != nil {
		t.Fatal(err)
	}
	return ov, res, clients, lockers
}

// blockArgs jobs block until the test releases them.
type blockArgs struct {
	Key string `json:"key"`
}

func (blockArgs) Kind() string      { return "riverlock_block" }
func (a blockArgs) LockKey() string { return a.Key }

type blockWorker struct {
	river.WorkerDefaults[blockArgs]
	started chan int64    // receives each job's ID as it starts
	release chan struct{} // closed to let jobs finish
	cause   chan error    // receives context.Cause when a job's ctx ends first
	runs    atomic.Int64
}

func newBlockWorker() *blockWorker {
	return &blockWorker{started: make(chan int64, 16), release: make(chan struct{}), cause: make(chan error, 16)}
}

func (w *blockWorker) Work(ctx context.Context, job *river.Job[blockArgs]) error {
	w.runs.Add(1)
	w.started <- job.ID
	select {
	case <-w.release:
		return nil
	case <-ctx.Done():
		w.cause <- context.Cause(ctx)
		return ctx.Err()
	}
}

func recv[T any](t *testing.T, ch <-chan T, within time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(within):
		t.Fatalf("timed out after %v waiting for %s", within, what)
		panic("unreachable")
	}
}

// Cancel policy: a duplicate inserted while its twin runs (on the other
// node) is cancelled with the reason recorded in its errors, never runs, and
// the twin completes.
func TestCancelDuplicate(t *testing.T) {
	t.Parallel()
	e := newRiverEnv(t)
	w := newBlockWorker()
	var clients []*river.Client[pgx.Tx]
	var lk *pglock.Locker
	for range 2 {
		lk = e.locker(t, 4)
		mw := newMiddleware(t, lk, &riverlock.Config{
			Kinds: map[string]riverlock.KindConfig{
				blockArgs{}.Kind(): {Key: riverlock.ArgsKey[blockArgs](), Busy: riverlock.Cancel()},
			},
		})
		workers := river.NewWorkers()
		river.AddWorker(workers, w)
		clients = append(clients, e.client(t, workers, 2, mw))
	}
	twin := insert(t, clients[0], blockArgs{Key: "order-7"}, nil)
	if got := recv(t, w.started, 20*time.Second, "the twin to start"); got != twin {
		t.Fatalf("started job %d, want %d", got, twin)
	}
	key := e.key(t, lk, blockArgs{}.Kind(), "order-7")
	if h := pgtest.Granted(t, e.admin, key); len(h) != 1 {
		t.Fatalf("pg_locks while the twin runs: %+v, want one holder", h)
	}

	dup := insert(t, clients[1], blockArgs{Key: "order-7"}, nil)
	job := waitJob(t, clients[1], dup, 20*time.Second)
	if job.State != rivertype.JobStateCancelled {
		t.Fatalf("duplicate: state %s, want cancelled (errors %+v)", job.State, job.Errors)
	}
	if len(job.Errors) != 1 || !strings.Contains(job.Errors[0].Error, "cancelled as a duplicate") ||
		!strings.Contains(job.Errors[0].Error, riverlock.ErrBusy.Error()) {
		t.Fatalf("duplicate's errors = %+v, want the reason", job.Errors)
	}
	t.Logf("recorded reason: %s", job.Errors[0].Error)

	close(w.release)
	if job := waitJob(t, clients[0], twin, 20*time.Second); job.State != rivertype.JobStateCompleted {
		t.Fatalf("twin: state %s, errors %+v", job.State, job.Errors)
	}
	if n := w.runs.Load(); n != 1 {
		t.Fatalf("worker ran %d times, want 1 (the duplicate must not run)", n)
	}
	pgtest.WaitFree(t, e.admin, key)
}

// Killing the backend that holds a running job's lock cancels that job's
// context with cause pglock.ErrLockLost; the job's recorded error says the
// lock was lost; nothing stays locked.
func TestLostLockCancelsJob(t *testing.T) {
	t.Parallel()
	e := newRiverEnv(t)
	w := newBlockWorker()
	defer close(w.release)
	lk := e.locker(t, 4)
	mw := newMiddleware(t, lk, &riverlock.Config{Key: riverlock.ArgsKey[blockArgs]()})
	workers := river.NewWorkers()
	river.AddWorker(workers, w)
	client := e.client(t, workers, 2, mw)

	id := insert(t, client, blockArgs{Key: "lost"}, &river.InsertOpts{MaxAttempts: 1})
	recv(t, w.started, 20*time.Second, "the job to start")
	key := e.key(t, lk, blockArgs{}.Kind(), "lost")
	h := pgtest.Granted(t, e.admin, key)
	if len(h) != 1 {
		t.Fatalf("pg_locks while the job runs: %+v", h)
	}
	start := time.Now()
	pgtest.Terminate(t, e.admin, h[0].PID)
	cause := recv(t, w.cause, 10*time.Second, "the job's context to be cancelled")
	if !errors.Is(cause, pglock.ErrLockLost) {
		t.Fatalf("context cause = %v, want pglock.ErrLockLost", cause)
	}
	t.Logf("job context cancelled %v after pg_terminate_backend", time.Since(start))
	job := waitJob(t, client, id, 20*time.Second)
	if job.State != rivertype.JobStateDiscarded || len(job.Errors) != 1 ||
		!strings.Contains(job.Errors[0].Error, pglock.ErrLockLost.Error()) {
		t.Fatalf("job: state %s, errors %+v; want discarded with the lost lock recorded", job.State, job.Errors)
	}
	pgtest.WaitFree(t, e.admin, key)
}

// A KeyFunc error fails the job with that error, visibly, and the worker
// never runs; a KeyFunc returning river.JobCancel cancels the job. A job
// without a key runs untouched, with no lock.
func TestKeyFuncErrorsAndNoKey(t *testing.T) {
	t.Parallel()
	e := newRiverEnv(t)
	w := newBlockWorker()
	close(w.release)
	lk := e.locker(t, 4)
	errNoCustomer := errors.New("args carry no customer")
	mw := newMiddleware(t, lk, &riverlock.Config{
		Key: func(job *rivertype.JobRow) (string, bool, error) {
			switch {
			case strings.Contains(string(job.EncodedArgs), "bad"):
				return "", false, errNoCustomer
			case strings.Contains(string(job.EncodedArgs), "cancel"):
				return "", false, river.JobCancel(errNoCustomer)
			case strings.Contains(string(job.EncodedArgs), "none"):
				return "", false, nil
			}
			return "x", true, nil
		},
	})
	workers := river.NewWorkers()
	river.AddWorker(workers, w)
	client := e.client(t, workers, 2, mw)

	bad := waitJob(t, client, insert(t, client, blockArgs{Key: "bad"}, &river.InsertOpts{MaxAttempts: 1}), 20*time.Second)
	if bad.State != rivertype.JobStateDiscarded || len(bad.Errors) != 1 ||
		!strings.Contains(bad.Errors[0].Error, errNoCustomer.Error()) ||
		!strings.Contains(bad.Errors[0].Error, riverlock.ErrKey.Error()) {
		t.Fatalf("KeyFunc error: state %s, errors %+v", bad.State, bad.Errors)
	}
	cancelled := waitJob(t, client, insert(t, client, blockArgs{Key: "cancel"}, nil), 20*time.Second)
	if cancelled.State != rivertype.JobStateCancelled || len(cancelled.Errors) != 1 ||
		!strings.Contains(cancelled.Errors[0].Error, errNoCustomer.Error()) {
		t.Fatalf("KeyFunc JobCancel: state %s, errors %+v", cancelled.State, cancelled.Errors)
	}
	if n := w.runs.Load(); n != 0 {
		t.Fatalf("worker ran %d times for jobs whose key failed", n)
	}
	none := waitJob(t, client, insert(t, client, blockArgs{Key: "none"}, nil), 20*time.Second)
	if none.State != rivertype.JobStateCompleted || w.runs.Load() != 1 {
		t.Fatalf("job without a key: state %s, runs %d", none.State, w.runs.Load())
	}
}

// ArgsKey refuses args registered under the wrong kind.
func TestArgsKeyWrongKind(t *testing.T) {
	t.Parallel()
	kf := riverlock.ArgsKey[CustomerArgs]()
	_, _, err := kf(&rivertype.JobRow{Kind: "other", EncodedArgs: []byte(`{"customer":"a"}`)})
	if err == nil || !strings.Contains(err.Error(), "riverlock_customer") {
		t.Fatalf("ArgsKey on the wrong kind = %v", err)
	}
	key, ok, err := kf(&rivertype.JobRow{Kind: CustomerArgs{}.Kind(), EncodedArgs: []byte(`{"customer":"a"}`)})
	if key != "a" || !ok || err != nil {
		t.Fatalf("ArgsKey = %q, %v, %v", key, ok, err)
	}
	if _, ok, err := kf(&rivertype.JobRow{Kind: CustomerArgs{}.Kind(), EncodedArgs: []byte(`{}`)}); ok || err != nil {
		t.Fatalf("ArgsKey with an empty LockKey = %v, %v; want no key", ok, err)
	}
	if _, _, err := kf(&rivertype.JobRow{Kind: CustomerArgs{}.Kind(), EncodedArgs: []byte(`{"customer":1}`)}); err == nil {
		t.Fatal("ArgsKey on args that do not decode: no error")
	}
}

// Wait policy: jobs of one key wait for each other instead of snoozing; a
// wait that runs out fails the attempt with ErrBusy.
func TestWaitPolicy(t *testing.T) {
	t.Parallel()
	e := newRiverEnv(t)
	ov := newOverlap()
	lk := e.locker(t, 6)
	mw := newMiddleware(t, lk, &riverlock.Config{
		Busy: riverlock.Wait(10 * time.Second),
		Key:  riverlock.ArgsKey[CustomerArgs](),
		Kinds: map[string]riverlock.KindConfig{
			blockArgs{}.Kind(): {Key: riverlock.ArgsKey[blockArgs](), Busy: riverlock.Wait(300 * time.Millisecond)},
		},
	})
	w := newBlockWorker()
	close(w.release)
	workers := river.NewWorkers()
	river.AddWorker(workers, &customerWorker{node: "n", ov: ov, sleep: 50 * time.Millisecond})
	river.AddWorker(workers, w)
	client := e.client(t, workers, 4, mw)

	var ids []int64
	for i := range 4 {
		ids = append(ids, insert(t, client, CustomerArgs{Customer: "w", Seq: i}, nil))
	}
	for _, id := range ids {
		job := waitJob(t, client, id, 30*time.Second)
		if job.State != rivertype.JobStateCompleted || job.Attempt != 1 || strings.Contains(string(job.Metadata), "snoozes") {
			t.Fatalf("job %d: state %s attempt %d metadata %s", id, job.State, job.Attempt, job.Metadata)
		}
	}
	ov.mu.Lock()
	if ov.max["w"] != 1 {
		t.Fatalf("at most %d jobs at once, want 1", ov.max["w"])
	}
	ov.mu.Unlock()

	// Hold the key from outside; the job waits 300ms, then fails.
	held, err := lk.NewLock(riverlock.DefaultNamespace(blockArgs{}.Kind()) + "held")
	if err != nil {
		t.Fatal(err)
	}
	if err := held.Acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer held.Release(context.Background())
	job := waitJob(t, client, insert(t, client, blockArgs{Key: "held"}, &river.InsertOpts{MaxAttempts: 1}), 20*time.Second)
	if job.State != rivertype.JobStateDiscarded || len(job.Errors) != 1 ||
		!strings.Contains(job.Errors[0].Error, riverlock.ErrBusy.Error()) {
		t.Fatalf("job that waited in vain: state %s, errors %+v", job.State, job.Errors)
	}
	if w.runs.Load() != 0 {
		t.Fatal("the job ran without its lock")
	}
}

// Bad configuration is an error at construction, never a panic later.
func TestConfigErrors(t *testing.T) {
	t.Parallel()
	if _, err := riverlock.NewMiddleware(nil, nil); !errors.Is(err, riverlock.ErrInvalidConfig) || !errors.Is(err, riverlock.ErrNilLocker) {
		t.Fatalf("nil locker: %v", err)
	}
	pool := pgtest.Pool(t, 2)
	lk, err := pglock.NewLocker(pool)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	if _, err := riverlock.NewMiddleware(lk, nil); err != nil {
		t.Fatalf("nil config: %v", err)
	}
	for _, p := range []riverlock.Policy{riverlock.Snooze(-time.Second), riverlock.Wait(0), riverlock.Wait(-1)} {
		if _, err := riverlock.NewMiddleware(lk, &riverlock.Config{Busy: p}); !errors.Is(err, riverlock.ErrInvalidConfig) {
			t.Errorf("Busy %v: %v", p, err)
		}
		_, err := riverlock.NewMiddleware(lk, &riverlock.Config{Kinds: map[string]riverlock.KindConfig{"k": {Busy: p}}})
		if !errors.Is(err, riverlock.ErrInvalidConfig) {
			t.Errorf("Kinds[k].Busy %v: %v", p, err)
		}
	}
	tx, err := pool.Begin(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background())
	txLocker, err := pglock.NewLocker(tx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := riverlock.NewMiddleware(txLocker, nil); !errors.Is(err, riverlock.ErrInvalidConfig) {
		t.Fatalf("locker on a transaction: %v", err)
	}
	conn, err := pool.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	connLocker, err := pglock.NewLocker(conn)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := riverlock.NewMiddleware(connLocker, nil); !errors.Is(err, riverlock.ErrInvalidConfig) {
		t.Fatalf("locker on one connection: %v", err)
	}
	if err := riverlock.WorkTx[CustomerArgs](context.Background(), nil, &river.Job[CustomerArgs]{JobRow: &rivertype.JobRow{}}, nil); !errors.Is(err, riverlock.ErrInvalidConfig) {
		t.Fatalf("WorkTx with a nil locker: %v", err)
	}
	for p, want := range map[riverlock.Policy]string{
		{}: "snooze(1s)", riverlock.Snooze(0): "snooze(1s)", riverlock.Snooze(time.Minute): "snooze(1m0s)",
		riverlock.Cancel(): "cancel", riverlock.Wait(time.Second): "wait(1s)",
	} {
		if got := p.String(); got != want {
			t.Errorf("String = %q, want %q", got, want)
		}
	}
}

// panicArgs jobs panic the first time they run.
type panicArgs struct {
	Key string `json:"key"`
}

func (panicArgs) Kind() string      { return "riverlock_panic" }
func (a panicArgs) LockKey() string { return a.Key }

type panicWorker struct {
	river.WorkerDefaults[panicArgs]
	runs atomic.Int64
}

func (w *panicWorker) Work(ctx context.Context, job *river.Job[panicArgs]) error {
	if w.runs.Add(1) == 1 {
		panic("worker panicked on purpose")
	}
	return nil
}

// A worker that panics releases its lock (the middleware's defer runs before
// River recovers the panic): the panic is recorded, the key is free, and the
// next job of the key runs.
func TestPanicReleasesLock(t *testing.T) {
	t.Parallel()
	e := newRiverEnv(t)
	lk := e.locker(t, 4)
	mw := newMiddleware(t, lk, &riverlock.Config{Key: riverlock.ArgsKey[panicArgs]()})
	w := &panicWorker{}
	workers := river.NewWorkers()
	river.AddWorker(workers, w)
	client := e.client(t, workers, 2, mw)

	first := waitJob(t, client, insert(t, client, panicArgs{Key: "p"}, &river.InsertOpts{MaxAttempts: 1}), 20*time.Second)
	if first.State != rivertype.JobStateDiscarded || len(first.Errors) != 1 || !strings.Contains(first.Errors[0].Error, "panicked on purpose") {
		t.Fatalf("panicking job: state %s, errors %+v", first.State, first.Errors)
	}
	pgtest.WaitFree(t, e.admin, e.key(t, lk, panicArgs{}.Kind(), "p"))
	second := waitJob(t, client, insert(t, client, panicArgs{Key: "p"}, nil), 20*time.Second)
	if second.State != rivertype.JobStateCompleted || second.Attempt != 1 {
		t.Fatalf("next job of the key: state %s, attempt %d", second.State, second.Attempt)
	}
}

// stubbornArgs jobs ignore their context: they finish when released.
type stubbornArgs struct {
	Key string `json:"key"`
}

func (stubbornArgs) Kind() string      { return "riverlock_stubborn" }
func (a stubbornArgs) LockKey() string { return a.Key }

type stubbornWorker struct {
	river.WorkerDefaults[stubbornArgs]
	started chan struct{}
	release chan struct{}
}

func (w *stubbornWorker) Work(ctx context.Context, job *river.Job[stubbornArgs]) error {
	close(w.started)
	<-w.release
	return nil
}

// syncBuffer is a bytes.Buffer for a logger written from other goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A job that returns nil although its lock was lost while it ran is done:
// it completes (failing it would run its work twice), and the loss is logged
// at Warn level.
func TestLostLockAfterSuccessIsLogged(t *testing.T) {
	t.Parallel()
	e := newRiverEnv(t)
	lk := e.locker(t, 4)
	var logs syncBuffer
	mw := newMiddleware(t, lk, &riverlock.Config{
		Key:    riverlock.ArgsKey[stubbornArgs](),
		Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	w := &stubbornWorker{started: make(chan struct{}), release: make(chan struct{})}
	workers := river.NewWorkers()
	river.AddWorker(workers, w)
	client := e.client(t, workers, 1, mw)

	id := insert(t, client, stubbornArgs{Key: "s"}, &river.InsertOpts{MaxAttempts: 1})
	recv(t, w.started, 20*time.Second, "the job to start")
	key := e.key(t, lk, stubbornArgs{}.Kind(), "s")
	h := pgtest.Granted(t, e.admin, key)
	if len(h) != 1 {
		t.Fatalf("pg_locks while the job runs: %+v", h)
	}
	pgtest.Terminate(t, e.admin, h[0].PID)
	pgtest.WaitFree(t, e.admin, key)
	close(w.release)
	job := waitJob(t, client, id, 20*time.Second)
	if job.State != rivertype.JobStateCompleted {
		t.Fatalf("job: state %s, errors %+v; want completed", job.State, job.Errors)
	}
	if out := logs.String(); !strings.Contains(out, "level=WARN") || !strings.Contains(out, "lock lost") {
		t.Fatalf("logs = %q, want a warning about the lost lock", out)
	}
}
