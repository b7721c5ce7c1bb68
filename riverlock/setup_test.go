package riverlock_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
	"github.com/riverqueue/river/rivertype"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/riverlock"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

var schemaSeq atomic.Int64

// riverEnv is one test's River database: a schema of its own, migrated with
// rivermigrate and dropped when the test ends, so that tests running in
// parallel never fetch each other's jobs.
type riverEnv struct {
	schema string
	admin  *pgxpool.Pool // inserts, checks, pg_locks
	ns     string        // a namespace for this test's lock keys
}

func newRiverEnv(t *testing.T) *riverEnv {
	t.Helper()
	ctx := context.Background()
	admin := pgtest.Pool(t, 4)
	e := &riverEnv{
		schema: fmt.Sprintf("riverlock_test_%d_%d_%d", os.Getpid(), time.Now().UnixNano()%1e9, schemaSeq.Add(1)),
		admin:  admin,
		ns:     pgtest.UniqueKey(t) + "/",
	}
	if _, err := admin.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{e.schema}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, err := admin.Exec(context.Background(), "DROP SCHEMA "+pgx.Identifier{e.schema}.Sanitize()+" CASCADE")
		if err != nil {
			t.Errorf("drop schema: %v", err)
		}
	})
	migrator, err := rivermigrate.New(riverpgxv5.New(admin), &rivermigrate.Config{
		Schema: e.schema,
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := migrator.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		t.Fatalf("migrate River's schema: %v", err)
	}
	return e
}

// locker returns a Locker on a pool of its own (one node's), namespaced for
// this test so that its keys are unique across tests and runs.
func (e *riverEnv) locker(t *testing.T, maxConns int32, opts ...pglock.Option) *pglock.Locker {
	t.Helper()
	lk, err := pglock.NewLocker(pgtest.Pool(t, maxConns),
		append([]pglock.Option{pglock.WithNamespace(e.ns), pglock.WithLostCheckInterval(100 * time.Millisecond)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	return lk
}

// key returns the pglock.Key the middleware locks for a job of kind with key.
func (e *riverEnv) key(t *testing.T, lk *pglock.Locker, kind, key string) pglock.Key {
	t.Helper()
	k, err := lk.Key(riverlock.DefaultNamespace(kind) + key)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// client starts a River client (one node) on a pool of its own, with short
// fetch intervals so that snoozed jobs come back quickly, and stops it when
// the test ends. A client with no workers is insert-only.
func (e *riverEnv) client(t *testing.T, workers *river.Workers, maxWorkers int, mw ...rivertype.Middleware) *river.Client[pgx.Tx] {
	t.Helper()
	cfg := &river.Config{
		Schema:            e.schema,
		Logger:            slog.New(slog.DiscardHandler),
		FetchCooldown:     5 * time.Millisecond,
		FetchPollInterval: 20 * time.Millisecond,
		TestOnly:          true,
		Middleware:        mw,
		Workers:           workers,
	}
	if workers != nil {
		cfg.Queues = map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: maxWorkers}}
	}
	client, err := river.NewClient(riverpgxv5.New(pgtest.Pool(t, 6)), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if workers == nil {
		return client
	}
	if err := client.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := client.StopAndCancel(ctx); err != nil {
			t.Errorf("stop River client: %v", err)
		}
	})
	return client
}

// waitJob waits until job id reaches a final state (completed, cancelled,
// discarded) and returns its row.
func waitJob(t *testing.T, client *river.Client[pgx.Tx], id int64, within time.Duration) *rivertype.JobRow {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		job, err := client.JobGet(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		switch job.State {
		case rivertype.JobStateCompleted, rivertype.JobStateCancelled, rivertype.JobStateDiscarded:
			return job
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %d still %s after %v (attempt %d, errors %+v)", id, job.State, within, job.Attempt, job.Errors)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func insert(t *testing.T, client *river.Client[pgx.Tx], args river.JobArgs, opts *river.InsertOpts) int64 {
	t.Helper()
	res, err := client.Insert(context.Background(), args, opts)
	if err != nil {
		t.Fatal(err)
	}
	return res.Job.ID
}

func newMiddleware(t *testing.T, lk *pglock.Locker, cfg *riverlock.Config) *riverlock.Middleware {
	t.Helper()
	mw, err := riverlock.NewMiddleware(lk, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return mw
}
