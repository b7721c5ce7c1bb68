package riverlock_test

import (
	"context"
	"errors"
	"fmt"
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

// exportArgs is an export for a tenant: at most a few of one tenant may run
// at once.
type exportArgs struct {
	Tenant string `json:"tenant"`
}

func (exportArgs) Kind() string      { return "riverlock_export" }
func (a exportArgs) LockKey() string { return a.Tenant }

// exportWorker counts the exports running at once and the most ever seen.
// Each stays until limit of them run at once, or a moment has passed, so
// that the first jobs of a key overlap whatever the scheduling.
type exportWorker struct {
	river.WorkerDefaults[exportArgs]
	limit     int32
	cur, most atomic.Int32
}

func (w *exportWorker) Work(ctx context.Context, job *river.Job[exportArgs]) error {
	n := w.cur.Add(1)
	defer w.cur.Add(-1)
	for m := w.most.Load(); n > m && !w.most.CompareAndSwap(m, n); m = w.most.Load() {
	}
	for deadline := time.Now().Add(300 * time.Millisecond); w.most.Load() < w.limit && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	select {
	case <-time.After(20 * time.Millisecond):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// nodeWorker is exportWorker on one node: it shares the counters and
// counts the node's runs.
type nodeWorker struct {
	river.WorkerDefaults[exportArgs]
	w    *exportWorker
	runs *atomic.Int32
}

func (nw *nodeWorker) Work(ctx context.Context, job *river.Job[exportArgs]) error {
	nw.runs.Add(1)
	return nw.w.Work(ctx, job)
}

// runExports starts three nodes (a River client and a Locker each, on pools
// of their own) with the middleware set to limit the export kind to n per
// tenant under busy, inserts jobs exports of one tenant, and waits for them
// all: it returns the worker, the final rows and the runs per node.
func runExports(t *testing.T, n, jobs int, busy riverlock.Policy) (*exportWorker, []*rivertype.JobRow, []int32, *riverEnv, *pglock.Locker) {
	t.Helper()
	e := newRiverEnv(t)
	w := &exportWorker{limit: int32(n)}
	runs := make([]atomic.Int32, 3)
	var clients []*river.Client[pgx.Tx]
	var lk *pglock.Locker
	for i := range 3 {
		lk = e.locker(t, 6)
		mw := newMiddleware(t, lk, &riverlock.Config{
			Busy: busy,
			Kinds: map[string]riverlock.KindConfig{
				exportArgs{}.Kind(): {Key: riverlock.ArgsKey[exportArgs](), Limit: n},
			},
		})
		workers := river.NewWorkers()
		river.AddWorker(workers, &nodeWorker{w: w, runs: &runs[i]})
		clients = append(clients, e.client(t, workers, 6, mw))
	}
	params := make([]river.InsertManyParams, jobs)
	for i := range params {
		params[i] = river.InsertManyParams{Args: exportArgs{Tenant: "acme"}}
	}
	res, err := clients[0].InsertMany(context.Background(), params)
	if err != nil {
		t.Fatal(err)
	}
	rows := make([]*rivertype.JobRow, len(res))
	for i, r := range res {
		rows[i] = waitJob(t, clients[0], r.Job.ID, 60*time.Second)
	}
	perNode := make([]int32, len(runs))
	for i := range runs {
		perNode[i] = runs[i].Load()
	}
	return w, rows, perNode, e, lk
}

// slotsFree waits until no slot of the semaphore that the middleware makes
// for a tenant's exports is held.
func slotsFree(t *testing.T, e *riverEnv, lk *pglock.Locker, tenant string, n int) {
	t.Helper()
	for i := range n {
		pgtest.WaitFree(t, e.admin, e.key(t, lk, exportArgs{}.Kind(), fmt.Sprintf("%s#%d", tenant, i)))
	}
}

// Issue 24, Snooze: three nodes work 15 exports of one tenant under Limit 3:
// never more than 3 run at once, 3 at once is reached, every job completes
// on its first attempt (snoozes do not count), and some were snoozed, so
// the limit was reached. (Without the limit's effect they run 1 at a time.)
func TestLimitSnooze(t *testing.T) {
	t.Parallel()
	const n, jobs = 3, 15
	w, rows, perNode, e, lk := runExports(t, n, jobs, riverlock.Snooze(20*time.Millisecond))
	snoozed := 0
	for _, job := range rows {
		if job.State != rivertype.JobStateCompleted || job.Attempt != 1 || len(job.Errors) != 0 {
			t.Errorf("job %d: state %s, attempt %d, errors %+v; want completed on attempt 1", job.ID, job.State, job.Attempt, job.Errors)
		}
		if strings.Contains(string(job.Metadata), `"snoozes"`) {
			snoozed++
		}
	}
	if m := w.most.Load(); m != n {
		t.Errorf("most exports of one tenant at once = %d, want %d", m, n)
	}
	if snoozed == 0 {
		t.Errorf("no job was snoozed: the limit was never reached, the test proves nothing")
	}
	t.Logf("%d of %d jobs snoozed at least once; runs per node %v", snoozed, jobs, perNode)
	slotsFree(t, e, lk, "acme", n)
}

// Issue 24, Wait: the same under Wait: every job completes on its first
// attempt without a snooze, never more than 3 at once, and 3 at once is
// reached. (Without the limit's effect they run 1 at a time.)
func TestLimitWait(t *testing.T) {
	t.Parallel()
	const n, jobs = 3, 15
	w, rows, perNode, e, lk := runExports(t, n, jobs, riverlock.Wait(time.Minute))
	for _, job := range rows {
		if job.State != rivertype.JobStateCompleted || job.Attempt != 1 || len(job.Errors) != 0 ||
			strings.Contains(string(job.Metadata), `"snoozes"`) {
			t.Errorf("job %d: state %s, attempt %d, errors %+v, metadata %s; want completed on attempt 1, no snooze",
				job.ID, job.State, job.Attempt, job.Errors, job.Metadata)
		}
	}
	if m := w.most.Load(); m != n {
		t.Errorf("most exports of one tenant at once = %d, want %d", m, n)
	}
	t.Logf("runs per node %v", perNode)
	slotsFree(t, e, lk, "acme", n)
}

// Issue 24: under Limit 2 two jobs of a key hold both slots (seen in
// pg_locks); a third job under Cancel is cancelled with the reason, one
// under Wait(300ms) fails its attempt with ErrBusy once the limit passed
// and never runs, and the two holders, running well past that limit, keep
// a live context and complete.
func TestLimitBusyPolicies(t *testing.T) {
	t.Parallel()
	const n = 2
	e := newRiverEnv(t)
	w := newBlockWorker()
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(w.release) }) }) // before the clients stop, on failure too
	lk := e.locker(t, 6)
	mw := newMiddleware(t, lk, &riverlock.Config{
		Limit: n,
		Busy:  riverlock.Wait(300 * time.Millisecond),
		Kinds: map[string]riverlock.KindConfig{
			// Two kinds, one semaphore: the same namespace and limit.
			blockArgs{}.Kind():    {Key: riverlock.ArgsKey[blockArgs](), Namespace: "riverlock_limit:"},
			CustomerArgs{}.Kind(): {Key: riverlock.ArgsKey[CustomerArgs](), Namespace: "riverlock_limit:", Busy: riverlock.Cancel()},
		},
	})
	workers := river.NewWorkers()
	river.AddWorker(workers, w)
	river.AddWorker(workers, &customerWorker{node: "n", ov: newOverlap()})
	client := e.client(t, workers, 6, mw)

	var holders []int64
	for range n {
		holders = append(holders, insert(t, client, blockArgs{Key: "k"}, nil))
	}
	for i := range n {
		recv(t, w.started, 20*time.Second, fmt.Sprintf("holder %d to start", i))
	}
	held := 0
	for i := range n {
		k, err := lk.Key(fmt.Sprintf("riverlock_limit:k#%d", i))
		if err != nil {
			t.Fatal(err)
		}
		held += len(pgtest.Granted(t, e.admin, k))
	}
	if held != n {
		t.Errorf("slot locks granted while %d jobs run: %d", n, held)
	}

	dup := waitJob(t, client, insert(t, client, CustomerArgs{Customer: "k"}, nil), 20*time.Second)
	if dup.State != rivertype.JobStateCancelled || len(dup.Errors) != 1 ||
		!strings.Contains(dup.Errors[0].Error, riverlock.ErrBusy.Error()) || !strings.Contains(dup.Errors[0].Error, "every slot") {
		t.Errorf("job over the limit under Cancel: state %s, errors %+v; want cancelled, the reason recorded", dup.State, dup.Errors)
	}

	start := time.Now()
	over := waitJob(t, client, insert(t, client, blockArgs{Key: "k"}, &river.InsertOpts{MaxAttempts: 1}), 20*time.Second)
	if over.State != rivertype.JobStateDiscarded || len(over.Errors) != 1 ||
		!strings.Contains(over.Errors[0].Error, riverlock.ErrBusy.Error()) {
		t.Errorf("job over the limit under Wait: state %s, errors %+v; want discarded with ErrBusy", over.State, over.Errors)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("job over the limit failed after %v, before its wait limit", d)
	}
	if runs := w.runs.Load(); runs != n {
		t.Errorf("the worker ran %d times, want %d (the job over the limit must not run)", runs, n)
	}

	once.Do(func() { close(w.release) })
	for _, id := range holders {
		if job := waitJob(t, client, id, 20*time.Second); job.State != rivertype.JobStateCompleted || job.Attempt != 1 {
			t.Errorf("holder %d: state %s, attempt %d, errors %+v; want completed on attempt 1", id, job.State, job.Attempt, job.Errors)
		}
	}
	select {
	case err := <-w.cause:
		t.Errorf("a holder's context ended: %v", err)
	default:
	}
}

// limitTxWorker runs WorkTx and stays in it until limit jobs are in it at
// once (or a moment passed).
type limitTxWorker struct {
	river.WorkerDefaults[exportArgs]
	lk        *pglock.Locker
	limit     int32
	cur, most atomic.Int32
}

func (w *limitTxWorker) Work(ctx context.Context, job *river.Job[exportArgs]) error {
	return riverlock.WorkTx(ctx, w.lk, job, func(ctx context.Context, tx pgx.Tx) error {
		n := w.cur.Add(1)
		defer w.cur.Add(-1)
		for m := w.most.Load(); n > m && !w.most.CompareAndSwap(m, n); m = w.most.Load() {
		}
		for deadline := time.Now().Add(2 * time.Second); w.most.Load() < w.limit && time.Now().Before(deadline); {
			time.Sleep(5 * time.Millisecond)
		}
		return nil
	})
}

// Issue 24: WorkTx inside a job that holds a slot of its key's limit locks
// the job itself, so the jobs the limit lets run together run their
// transactions together too (rather than one at a time on the key), and
// complete.
func TestLimitWorkTx(t *testing.T) {
	t.Parallel()
	const n = 2
	e := newRiverEnv(t)
	lk := e.locker(t, 8)
	w := &limitTxWorker{lk: lk, limit: n}
	mw := newMiddleware(t, lk, &riverlock.Config{
		Limit: n,
		Busy:  riverlock.Wait(time.Minute),
		Key:   riverlock.ArgsKey[exportArgs](),
	})
	workers := river.NewWorkers()
	river.AddWorker(workers, w)
	client := e.client(t, workers, 4, mw)
	var ids []int64
	for range 4 {
		ids = append(ids, insert(t, client, exportArgs{Tenant: "tx"}, nil))
	}
	for _, id := range ids {
		if job := waitJob(t, client, id, 30*time.Second); job.State != rivertype.JobStateCompleted || job.Attempt != 1 {
			t.Errorf("job %d: state %s, attempt %d, errors %+v", id, job.State, job.Attempt, job.Errors)
		}
	}
	if m := w.most.Load(); m != n {
		t.Errorf("most WorkTx of one key at once = %d, want %d", m, n)
	}
}

// Issue 24: bad limits are errors at construction.
func TestLimitConfigErrors(t *testing.T) {
	t.Parallel()
	lk, err := pglock.NewLocker(pgtest.Pool(t, 2))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	txLocker, err := pglock.NewLocker(pgtest.Pool(t, 2), pglock.WithScope(pglock.Transaction))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = txLocker.Close() })
	key := riverlock.ArgsKey[exportArgs]()
	bad := []struct {
		name string
		lk   *pglock.Locker
		cfg  riverlock.Config
		says []string
	}{
		{"negative", lk, riverlock.Config{Key: key, Limit: -1}, []string{"Config.Limit -1"}},
		{"negative per kind", lk, riverlock.Config{Kinds: map[string]riverlock.KindConfig{"k": {Key: key, Limit: -3}}},
			[]string{`Kinds["k"].Limit -3`}},
		{"too large", lk, riverlock.Config{Key: key, Limit: 5000}, []string{"Limit 5000", "1024"}},
		{"shared namespace, two limits", lk, riverlock.Config{Kinds: map[string]riverlock.KindConfig{
			"a": {Key: key, Namespace: "ns:", Limit: 2},
			"b": {Key: key, Namespace: "ns:"},
		}}, []string{`Kinds["a"]`, `Kinds["b"]`, `"ns:"`, "Limits 2 and 1"}},
	}
	for _, c := range bad {
		mw, err := riverlock.NewMiddleware(c.lk, &c.cfg)
		if mw != nil || !errors.Is(err, riverlock.ErrInvalidConfig) {
			t.Errorf("%s: %v, want ErrInvalidConfig", c.name, err)
			continue
		}
		for _, s := range c.says {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("%s: error %q does not say %q", c.name, err, s)
			}
		}
	}
	good := []struct {
		name string
		lk   *pglock.Locker
		cfg  riverlock.Config
	}{
		{"limit 1 on a Transaction Locker", txLocker, riverlock.Config{Key: key, Limit: 1}},
		{"limit 2 on a Transaction Locker (session slots)", txLocker, riverlock.Config{Key: key, Limit: 2}},
		{"limit without a key", txLocker, riverlock.Config{Limit: 3}},
		{"largest", lk, riverlock.Config{Key: key, Limit: 1024}},
		{"shared namespace, one limit", lk, riverlock.Config{Limit: 2, Kinds: map[string]riverlock.KindConfig{
			"a": {Key: key, Namespace: "ns:"},
			"b": {Key: key, Namespace: "ns:", Limit: 2},
		}}},
	}
	for _, c := range good {
		if _, err := riverlock.NewMiddleware(c.lk, &c.cfg); err != nil {
			t.Errorf("%s: %v", c.name, err)
		}
	}
}
