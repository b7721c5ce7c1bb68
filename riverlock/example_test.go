package riverlock_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
	"github.com/riverqueue/river/rivertype"

	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/riverlock"
)

// ChargeArgs charges a customer. Two charges of one customer must not run at
// once: LockKey names the customer.
type ChargeArgs struct {
	Customer string `json:"customer"`
	Cents    int    `json:"cents"`
}

func (ChargeArgs) Kind() string      { return "example_charge" }
func (a ChargeArgs) LockKey() string { return a.Customer }

type ChargeWorker struct {
	river.WorkerDefaults[ChargeArgs]
	mu      sync.Mutex
	running map[string]int
	most    int
}

func (w *ChargeWorker) Work(ctx context.Context, job *river.Job[ChargeArgs]) error {
	w.mu.Lock()
	w.running[job.Args.Customer]++
	w.most = max(w.most, w.running[job.Args.Customer])
	w.mu.Unlock()
	time.Sleep(10 * time.Millisecond) // the charge
	w.mu.Lock()
	w.running[job.Args.Customer]--
	w.mu.Unlock()
	return nil
}

// Charges of one customer run one at a time: a charge whose customer is busy
// is snoozed (no attempt is counted) and runs when the other is done.
func ExampleNewMiddleware() {
	ctx := context.Background()
	db, schema, done := exampleDatabase(ctx)
	defer done()

	lockPool, _ := pgxpool.New(ctx, os.Getenv("DATABASE_URL")) // the locker's own pool
	defer lockPool.Close()
	locker, err := pglock.NewLocker(lockPool)
	if err != nil {
		panic(err)
	}
	defer locker.Close()
	mw, err := riverlock.NewMiddleware(locker, &riverlock.Config{
		Busy: riverlock.Snooze(20 * time.Millisecond),
		Kinds: map[string]riverlock.KindConfig{
			ChargeArgs{}.Kind(): {Key: riverlock.ArgsKey[ChargeArgs]()},
		},
	})
	if err != nil {
		panic(err)
	}

	worker := &ChargeWorker{running: map[string]int{}}
	workers := river.NewWorkers()
	river.AddWorker(workers, worker)
	client, err := river.NewClient(riverpgxv5.New(db), &river.Config{
		Schema:            schema,
		Middleware:        []rivertype.Middleware{mw},
		Queues:            map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: 4}},
		Workers:           workers,
		FetchCooldown:     10 * time.Millisecond,
		FetchPollInterval: 20 * time.Millisecond,
		Logger:            slog.New(slog.DiscardHandler),
	})
	if err != nil {
		panic(err)
	}
	if err := client.Start(ctx); err != nil {
		panic(err)
	}
	defer client.Stop(ctx)

	var ids []int64
	for i := range 6 {
		res, err := client.Insert(ctx, ChargeArgs{Customer: fmt.Sprint("customer-", i%2), Cents: 100}, nil)
		if err != nil {
			panic(err)
		}
		ids = append(ids, res.Job.ID)
	}
	completed := waitCompleted(ctx, client, ids)

	worker.mu.Lock()
	defer worker.mu.Unlock()
	fmt.Printf("%d of %d charges completed; most charges of one customer at once: %d\n", completed, len(ids), worker.most)
	// Output:
	// 6 of 6 charges completed; most charges of one customer at once: 1
}

// ExportArgs exports a tenant's data. At most three exports of one tenant
// may run at once: LockKey names the tenant, Config.Limit says three.
type ExportArgs struct {
	Tenant string `json:"tenant"`
}

func (ExportArgs) Kind() string      { return "example_export" }
func (a ExportArgs) LockKey() string { return a.Tenant }

type ExportWorker struct {
	river.WorkerDefaults[ExportArgs]
	mu      sync.Mutex
	running int
	most    int
}

func (w *ExportWorker) Work(ctx context.Context, job *river.Job[ExportArgs]) error {
	w.mu.Lock()
	w.running++
	w.most = max(w.most, w.running)
	w.mu.Unlock()
	time.Sleep(200 * time.Millisecond) // the export
	w.mu.Lock()
	w.running--
	w.mu.Unlock()
	return nil
}

// Up to three exports of one tenant run at once, on every node together: the
// others wait for a slot (Wait), first come, first served.
func ExampleConfig_limit() {
	ctx := context.Background()
	db, schema, done := exampleDatabase(ctx)
	defer done()

	lockPool, _ := pgxpool.New(ctx, os.Getenv("DATABASE_URL")) // the locker's own pool
	defer lockPool.Close()
	locker, err := pglock.NewLocker(lockPool)
	if err != nil {
		panic(err)
	}
	defer locker.Close()
	mw, err := riverlock.NewMiddleware(locker, &riverlock.Config{
		Busy: riverlock.Wait(time.Minute),
		Kinds: map[string]riverlock.KindConfig{
			ExportArgs{}.Kind(): {Key: riverlock.ArgsKey[ExportArgs](), Limit: 3},
		},
	})
	if err != nil {
		panic(err)
	}

	worker := &ExportWorker{}
	workers := river.NewWorkers()
	river.AddWorker(workers, worker)
	client, err := river.NewClient(riverpgxv5.New(db), &river.Config{
		Schema:            schema,
		Middleware:        []rivertype.Middleware{mw},
		Queues:            map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: 8}},
		Workers:           workers,
		FetchCooldown:     10 * time.Millisecond,
		FetchPollInterval: 20 * time.Millisecond,
		Logger:            slog.New(slog.DiscardHandler),
	})
	if err != nil {
		panic(err)
	}
	if err := client.Start(ctx); err != nil {
		panic(err)
	}
	defer client.Stop(ctx)

	params := make([]river.InsertManyParams, 8)
	for i := range params {
		params[i] = river.InsertManyParams{Args: ExportArgs{Tenant: "acme"}}
	}
	res, err := client.InsertMany(ctx, params)
	if err != nil {
		panic(err)
	}
	var ids []int64
	for _, r := range res {
		ids = append(ids, r.Job.ID)
	}
	completed := waitCompleted(ctx, client, ids)

	worker.mu.Lock()
	defer worker.mu.Unlock()
	fmt.Printf("%d of %d exports completed; most exports of one tenant at once: %d\n", completed, len(ids), worker.most)
	// Output:
	// 8 of 8 exports completed; most exports of one tenant at once: 3
}

// LedgerArgs records an entry for an account.
type LedgerArgs struct {
	Account string `json:"account"`
}

func (LedgerArgs) Kind() string      { return "example_ledger" }
func (a LedgerArgs) LockKey() string { return a.Account }

type LedgerWorker struct {
	river.WorkerDefaults[LedgerArgs]
	locker *pglock.Locker
	table  string
}

// Work writes the entry, under the account's lock, and completes the job in
// the same transaction: all or nothing.
func (w *LedgerWorker) Work(ctx context.Context, job *river.Job[LedgerArgs]) error {
	return riverlock.WorkTx(ctx, w.locker, job, func(ctx context.Context, tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "INSERT INTO "+w.table+" (account, job_id) VALUES ($1, $2)", job.Args.Account, job.ID)
		return err
	})
}

// WorkTx commits the work, the lock and the job's completion together.
func ExampleWorkTx() {
	ctx := context.Background()
	db, schema, done := exampleDatabase(ctx)
	defer done()
	table := pgx.Identifier{schema, "ledger"}.Sanitize()
	if _, err := db.Exec(ctx, "CREATE TABLE "+table+" (account text, job_id bigint)"); err != nil {
		panic(err)
	}
	locker, err := pglock.NewLocker(db)
	if err != nil {
		panic(err)
	}
	defer locker.Close()

	workers := river.NewWorkers()
	river.AddWorker(workers, &LedgerWorker{locker: locker, table: table})
	client, err := river.NewClient(riverpgxv5.New(db), &river.Config{
		Schema:  schema,
		Queues:  map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: 2}},
		Workers: workers,
		Logger:  slog.New(slog.DiscardHandler),
	})
	if err != nil {
		panic(err)
	}
	if err := client.Start(ctx); err != nil {
		panic(err)
	}
	defer client.Stop(ctx)

	res, err := client.Insert(ctx, LedgerArgs{Account: "acct-1"}, nil)
	if err != nil {
		panic(err)
	}
	waitCompleted(ctx, client, []int64{res.Job.ID})
	var entries int
	if err := db.QueryRow(ctx, "SELECT count(*) FROM "+table+" WHERE job_id = $1", res.Job.ID).Scan(&entries); err != nil {
		panic(err)
	}
	fmt.Println("ledger entries:", entries)
	// Output:
	// ledger entries: 1
}

// exampleDatabase returns a pool on DATABASE_URL and a new schema with
// River's tables, migrated with rivermigrate; done drops the schema and
// closes the pool.
func exampleDatabase(ctx context.Context) (db *pgxpool.Pool, schema string, done func()) {
	db, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		panic(err)
	}
	schema = fmt.Sprintf("riverlock_example_%d_%d", os.Getpid(), schemaSeq.Add(1))
	if _, err := db.Exec(ctx, "CREATE SCHEMA "+schema); err != nil {
		panic(err)
	}
	migrator, err := rivermigrate.New(riverpgxv5.New(db), &rivermigrate.Config{Schema: schema, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		panic(err)
	}
	if _, err := migrator.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		panic(err)
	}
	return db, schema, func() {
		_, _ = db.Exec(context.Background(), "DROP SCHEMA "+schema+" CASCADE")
		db.Close()
	}
}

// waitCompleted waits (up to 30 s) for jobs to finish and counts the
// completed ones.
func waitCompleted(ctx context.Context, client *river.Client[pgx.Tx], ids []int64) int {
	deadline := time.Now().Add(30 * time.Second)
	for {
		completed, final := 0, 0
		for _, id := range ids {
			job, err := client.JobGet(ctx, id)
			if err != nil {
				panic(err)
			}
			switch job.State {
			case rivertype.JobStateCompleted:
				completed++
				final++
			case rivertype.JobStateCancelled, rivertype.JobStateDiscarded:
				final++
			}
		}
		if final == len(ids) || time.Now().After(deadline) {
			return completed
		}
		time.Sleep(10 * time.Millisecond)
	}
}
