package riverlock_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/riverlock"
)

// txArgs tells the worker how its transaction should end.
type txArgs struct {
	Key  string `json:"key"`
	Mode string `json:"mode"` // "ok", "fail" (fn errors), "commitfail" (the commit fails)
}

func (txArgs) Kind() string      { return "riverlock_tx" }
func (a txArgs) LockKey() string { return a.Key }

type txResult struct {
	err          error
	holders      []pgtest.Holder // pg_locks for the key, seen from outside inside fn
	stateAfterTx rivertype.JobState
}

type txWorker struct {
	river.WorkerDefaults[txArgs]
	e       *riverEnv
	t       *testing.T
	lk      *pglock.Locker
	table   string
	results chan txResult
}

func (w *txWorker) Work(ctx context.Context, job *river.Job[txArgs]) error {
	var r txResult
	key := w.e.key(w.t, w.lk, job.Kind, job.Args.Key)
	r.err = riverlock.WorkTx(ctx, w.lk, job, func(ctx context.Context, tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "INSERT INTO "+w.table+" (job_id) VALUES ($1)", job.ID); err != nil {
			return err
		}
		if job.Args.Mode == "commitfail" {
			// A second row breaks the deferred unique constraint: the
			// commit, after JobCompleteTx, fails.
			if _, err := tx.Exec(ctx, "INSERT INTO "+w.table+" (job_id) VALUES ($1)", job.ID); err != nil {
				return err
			}
		}
		var err error
		r.holders, err = pgtest.Holders(ctx, w.e.admin, key)
		if err != nil {
			return err
		}
		if job.Args.Mode == "fail" {
			return errors.New("fn failed on purpose")
		}
		return nil
	})
	// What an outside session sees once WorkTx returned, before River
	// records this Work's result.
	err := w.e.admin.QueryRow(context.Background(),
		"SELECT state FROM "+pgx.Identifier{w.e.schema, "river_job"}.Sanitize()+" WHERE id = $1", job.ID).Scan(&r.stateAfterTx)
	if err != nil {
		r.err = errors.Join(r.err, err)
	}
	w.results <- r
	return r.err
}

// WorkTx: the work, the lock and the job's completion are one transaction.
// A succeeding fn commits both the row it inserted and the completion, with
// the xact lock held while fn runs; a failing fn, or a failing commit after
// JobCompleteTx, rolls back both; the lock is free afterwards every time.
func TestWorkTx(t *testing.T) {
	t.Parallel()
	e := newRiverEnv(t)
	ctx := context.Background()
	table := pgx.Identifier{e.schema, "worktx_rows"}.Sanitize()
	if _, err := e.admin.Exec(ctx, "CREATE TABLE "+table+
		" (job_id bigint NOT NULL, CONSTRAINT one_row UNIQUE (job_id) DEFERRABLE INITIALLY DEFERRED)"); err != nil {
		t.Fatal(err)
	}
	lk := e.locker(t, 4)
	w := &txWorker{e: e, t: t, lk: lk, table: table, results: make(chan txResult, 4)}
	workers := river.NewWorkers()
	river.AddWorker(workers, w)
	client := e.client(t, workers, 2)

	rows := func(id int64) int {
		var n int
		if err := e.admin.QueryRow(ctx, "SELECT count(*) FROM "+table+" WHERE job_id = $1", id).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}

	t.Run("ok", func(t *testing.T) {
		id := insert(t, client, txArgs{Key: "a", Mode: "ok"}, nil)
		r := recv(t, w.results, 20*time.Second, "the job")
		if r.err != nil {
			t.Fatalf("WorkTx = %v", r.err)
		}
		if len(r.holders) != 1 || !r.holders[0].Granted {
			t.Fatalf("pg_locks inside fn = %+v, want the xact lock granted", r.holders)
		}
		if r.stateAfterTx != rivertype.JobStateCompleted {
			t.Fatalf("job state right after WorkTx = %s, want completed (by JobCompleteTx, in the tx)", r.stateAfterTx)
		}
		if job := waitJob(t, client, id, 20*time.Second); job.State != rivertype.JobStateCompleted || rows(id) != 1 {
			t.Fatalf("state %s, rows %d; want completed with its row", job.State, rows(id))
		}
		pgtest.WaitFree(t, e.admin, e.key(t, lk, txArgs{}.Kind(), "a"))
	})

	t.Run("fail", func(t *testing.T) {
		id := insert(t, client, txArgs{Key: "b", Mode: "fail"}, &river.InsertOpts{MaxAttempts: 1})
		r := recv(t, w.results, 20*time.Second, "the job")
		if r.err == nil || !strings.Contains(r.err.Error(), "fn failed on purpose") {
			t.Fatalf("WorkTx = %v, want fn's error", r.err)
		}
		if r.stateAfterTx != rivertype.JobStateRunning {
			t.Fatalf("job state right after a failed WorkTx = %s, want running (not completed)", r.stateAfterTx)
		}
		job := waitJob(t, client, id, 20*time.Second)
		if job.State != rivertype.JobStateDiscarded || rows(id) != 0 {
			t.Fatalf("state %s, rows %d; want discarded with no row", job.State, rows(id))
		}
		pgtest.WaitFree(t, e.admin, e.key(t, lk, txArgs{}.Kind(), "b"))
	})

	t.Run("commitfail", func(t *testing.T) {
		id := insert(t, client, txArgs{Key: "c", Mode: "commitfail"}, &river.InsertOpts{MaxAttempts: 1})
		r := recv(t, w.results, 20*time.Second, "the job")
		var pgErr *pgconn.PgError
		if !errors.As(r.err, &pgErr) || pgErr.Code != "23505" {
			t.Fatalf("WorkTx = %v, want the commit's unique violation", r.err)
		}
		if r.stateAfterTx != rivertype.JobStateRunning {
			t.Fatalf("job state after a failed commit = %s, want running: the completion must roll back too", r.stateAfterTx)
		}
		job := waitJob(t, client, id, 20*time.Second)
		if job.State != rivertype.JobStateDiscarded || rows(id) != 0 {
			t.Fatalf("state %s, rows %d; want discarded with no row", job.State, rows(id))
		}
		pgtest.WaitFree(t, e.admin, e.key(t, lk, txArgs{}.Kind(), "c"))
	})
}

// WorkTx inside a job whose middleware holds the same key does not wait for
// its own job's lock: it locks the job itself, and completes.
func TestWorkTxUnderMiddleware(t *testing.T) {
	t.Parallel()
	e := newRiverEnv(t)
	ctx := context.Background()
	table := pgx.Identifier{e.schema, "worktx_rows"}.Sanitize()
	if _, err := e.admin.Exec(ctx, "CREATE TABLE "+table+" (job_id bigint NOT NULL UNIQUE)"); err != nil {
		t.Fatal(err)
	}
	lk := e.locker(t, 4)
	mw := newMiddleware(t, lk, &riverlock.Config{Key: riverlock.ArgsKey[txArgs]()})
	w := &txWorker{e: e, t: t, lk: lk, table: table, results: make(chan txResult, 1)}
	workers := river.NewWorkers()
	river.AddWorker(workers, w)
	client := e.client(t, workers, 1, mw)

	id := insert(t, client, txArgs{Key: "same", Mode: "ok"}, nil)
	r := recv(t, w.results, 20*time.Second, "the job")
	if r.err != nil || r.stateAfterTx != rivertype.JobStateCompleted {
		t.Fatalf("WorkTx = %v, state %s", r.err, r.stateAfterTx)
	}
	if len(r.holders) != 1 {
		t.Fatalf("pg_locks on the key inside fn = %+v, want the middleware's lock only", r.holders)
	}
	if job := waitJob(t, client, id, 20*time.Second); job.State != rivertype.JobStateCompleted {
		t.Fatalf("state %s, errors %+v", job.State, job.Errors)
	}
	pgtest.WaitFree(t, e.admin, e.key(t, lk, txArgs{}.Kind(), "same"))
}
