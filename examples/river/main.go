// Command river shows riverlock serializing River jobs by key across two
// nodes. It migrates River's schema (in a schema of its own, dropped at the
// end) with rivermigrate, starts two worker clients, each with its own pools
// as two nodes would have, inserts jobs for three accounts from a producer
// client, and prints the order in which each account's jobs ran: one at a
// time per account, whichever node ran them. It runs against DATABASE_URL
// (from the repository root, go run ./internal/pgtest/withpg -- go run
// ./examples/river finds or starts a server) and exits by itself within a
// few seconds.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"strings"
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

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	url := os.Getenv("DATABASE_URL")
	if url == "" {
		log.Fatal("set DATABASE_URL, or run: go run ./internal/pgtest/withpg -- go run ./examples/river")
	}
	if err := run(ctx, os.Stdout, url); err != nil {
		log.Fatal(err)
	}
}

// PostingArgs posts an entry to an account; two postings of one account must
// not run at once. LockKey names the account.
type PostingArgs struct {
	Account string `json:"account"`
	Seq     int    `json:"seq"`
}

func (PostingArgs) Kind() string      { return "example_posting" }
func (a PostingArgs) LockKey() string { return a.Account }

// journal records what the two nodes did.
type journal struct {
	mu      sync.Mutex
	w       io.Writer
	running map[string]int
	most    int
	order   map[string][]string
}

type postingWorker struct {
	river.WorkerDefaults[PostingArgs]
	node string
	j    *journal
}

func (w *postingWorker) Work(ctx context.Context, job *river.Job[PostingArgs]) error {
	j := w.j
	j.mu.Lock()
	j.running[job.Args.Account]++
	j.most = max(j.most, j.running[job.Args.Account])
	j.order[job.Args.Account] = append(j.order[job.Args.Account], fmt.Sprintf("#%d@%s", job.Args.Seq, w.node))
	fmt.Fprintf(j.w, "%s  %s  posting #%-2d start\n", w.node, job.Args.Account, job.Args.Seq)
	j.mu.Unlock()

	time.Sleep(30 * time.Millisecond) // the posting

	j.mu.Lock()
	j.running[job.Args.Account]--
	j.mu.Unlock()
	return nil
}

func run(ctx context.Context, w io.Writer, url string) error {
	admin, err := pgxpool.New(ctx, url)
	if err != nil {
		return err
	}
	defer admin.Close()

	// River's tables, in a schema of their own.
	schema := fmt.Sprintf("riverlock_demo_%d", os.Getpid())
	if _, err := admin.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize()); err != nil {
		return err
	}
	defer admin.Exec(context.WithoutCancel(ctx), "DROP SCHEMA "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
	quiet := slog.New(slog.DiscardHandler)
	migrator, err := rivermigrate.New(riverpgxv5.New(admin), &rivermigrate.Config{Schema: schema, Logger: quiet})
	if err != nil {
		return err
	}
	if _, err := migrator.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		return err
	}

	j := &journal{w: w, running: map[string]int{}, order: map[string][]string{}}
	for _, node := range []string{"node-1", "node-2"} {
		// Each node has its own pools: one for River, one for its locks.
		riverPool, err := newPool(ctx, url, 4)
		if err != nil {
			return err
		}
		defer riverPool.Close()
		lockPool, err := newPool(ctx, url, 5)
		if err != nil {
			return err
		}
		defer lockPool.Close()
		locker, err := pglock.NewLocker(lockPool)
		if err != nil {
			return err
		}
		defer locker.Close()
		mw, err := riverlock.NewMiddleware(locker, &riverlock.Config{
			Busy: riverlock.Snooze(25 * time.Millisecond),
			Kinds: map[string]riverlock.KindConfig{
				PostingArgs{}.Kind(): {Key: riverlock.ArgsKey[PostingArgs]()},
			},
		})
		if err != nil {
			return err
		}
		workers := river.NewWorkers()
		river.AddWorker(workers, &postingWorker{node: node, j: j})
		client, err := river.NewClient(riverpgxv5.New(riverPool), &river.Config{
			ID:                node,
			Schema:            schema,
			Queues:            map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: 4}},
			Workers:           workers,
			Middleware:        []rivertype.Middleware{mw},
			FetchCooldown:     5 * time.Millisecond,
			FetchPollInterval: 20 * time.Millisecond,
			Logger:            quiet,
		})
		if err != nil {
			return err
		}
		if err := client.Start(ctx); err != nil {
			return err
		}
		// Stop before the node's pools close (defers run last first).
		defer client.Stop(context.WithoutCancel(ctx))
	}

	// The producer: an insert-only client.
	producer, err := river.NewClient(riverpgxv5.New(admin), &river.Config{Schema: schema, Logger: quiet})
	if err != nil {
		return err
	}
	accounts := []string{"acct-A", "acct-B", "acct-C"}
	var params []river.InsertManyParams
	for i := range 12 {
		params = append(params, river.InsertManyParams{Args: PostingArgs{Account: accounts[i%len(accounts)], Seq: i + 1}})
	}
	res, err := producer.InsertMany(ctx, params)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "producer: inserted %d postings for %d accounts; two nodes with 4 workers each\n\n", len(res), len(accounts))

	snoozed, err := waitAll(ctx, producer, res)
	if err != nil {
		return err
	}

	j.mu.Lock()
	defer j.mu.Unlock()
	fmt.Fprintln(w, "\norder per account (posting@node):")
	for _, a := range accounts {
		fmt.Fprintf(w, "  %s: %s\n", a, strings.Join(j.order[a], " "))
	}
	fmt.Fprintf(w, "most postings of one account at once: %d\n", j.most)
	fmt.Fprintf(w, "%d of %d postings were snoozed at least once while their account was busy; none used up an attempt\n", snoozed, len(res))
	return nil
}

func newPool(ctx context.Context, url string, maxConns int32) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = maxConns
	return pgxpool.NewWithConfig(ctx, cfg)
}

// waitAll waits until every job has completed, and counts the jobs that were
// snoozed on the way.
func waitAll(ctx context.Context, client *river.Client[pgx.Tx], res []*rivertype.JobInsertResult) (snoozed int, err error) {
	for _, r := range res {
		for {
			job, err := client.JobGet(ctx, r.Job.ID)
			if err != nil {
				return 0, err
			}
			if job.State == rivertype.JobStateCompleted {
				if job.Attempt != 1 {
					return 0, fmt.Errorf("job %d completed on attempt %d", job.ID, job.Attempt)
				}
				if strings.Contains(string(job.Metadata), `"snoozes"`) {
					snoozed++
				}
				break
			}
			if job.State == rivertype.JobStateCancelled || job.State == rivertype.JobStateDiscarded {
				return 0, fmt.Errorf("job %d: %s: %+v", job.ID, job.State, job.Errors)
			}
			select {
			case <-ctx.Done():
				return 0, errors.Join(fmt.Errorf("job %d still %s", job.ID, job.State), ctx.Err())
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	return snoozed, nil
}
