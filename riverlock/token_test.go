package riverlock_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/rivertype"

	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/riverlock"
)

// tokenArgs jobs report the fencing token in their context: the worker's
// (under the middleware), or WorkTx's fn's when Tx is set.
type tokenArgs struct {
	Key string `json:"key"`
	Tx  bool   `json:"tx"`
}

func (tokenArgs) Kind() string      { return "riverlock_token" }
func (a tokenArgs) LockKey() string { return a.Key }

type tokenResult struct {
	token int64
	ok    bool
	fence error // WorkTx: pglock.CheckFence of the token in fn's transaction
	err   error // WorkTx's
}

type tokenWorker struct {
	river.WorkerDefaults[tokenArgs]
	e       *riverEnv
	t       *testing.T
	lk      *pglock.Locker // WorkTx's
	results chan tokenResult
}

func (w *tokenWorker) Work(ctx context.Context, job *river.Job[tokenArgs]) error {
	var r tokenResult
	if !job.Args.Tx {
		r.token, r.ok = pglock.TokenFromContext(ctx)
		w.results <- r
		return nil
	}
	key := w.e.key(w.t, w.lk, job.Kind, job.Args.Key)
	r.err = riverlock.WorkTx(ctx, w.lk, job, func(ctx context.Context, tx pgx.Tx) error {
		r.token, r.ok = pglock.TokenFromContext(ctx)
		if r.ok {
			r.fence = pglock.CheckFence(ctx, tx, key, r.token)
		}
		return nil
	})
	w.results <- r
	return r.err
}

// With a Locker made WithToken, the job's context carries the lock's fencing
// token (pglock.TokenFromContext): the worker's under the middleware, and
// WorkTx's fn's (where pglock.CheckFence in its transaction accepts it);
// non-zero and strictly increasing from one job of a key to the next.
// Without WithToken it carries none.
func TestToken(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		token bool // the Locker is made WithToken
		mw    bool // the middleware locks the jobs
		tx    bool // the jobs run WorkTx
	}{
		{"middleware", true, true, false},
		{"WorkTx", true, false, true},
		{"middleware without WithToken", false, true, false},
		{"WorkTx without WithToken", false, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newRiverEnv(t)
			var opts []pglock.Option
			if tc.token {
				opts = append(opts, pglock.WithToken())
				if _, err := pglock.Migrate(context.Background(), e.admin); err != nil {
					t.Fatal(err)
				}
			}
			lk := e.locker(t, 4, opts...)
			w := &tokenWorker{e: e, t: t, lk: lk, results: make(chan tokenResult, 2)}
			workers := river.NewWorkers()
			river.AddWorker(workers, w)
			var mw []rivertype.Middleware
			if tc.mw {
				mw = append(mw, newMiddleware(t, lk, &riverlock.Config{Key: riverlock.ArgsKey[tokenArgs]()}))
			}
			client := e.client(t, workers, 1, mw...)

			var tokens []int64
			for range 2 {
				id := insert(t, client, tokenArgs{Key: "k", Tx: tc.tx}, &river.InsertOpts{MaxAttempts: 1})
				r := recv(t, w.results, 20*time.Second, "the job")
				if r.err != nil {
					t.Fatalf("WorkTx = %v", r.err)
				}
				if job := waitJob(t, client, id, 20*time.Second); job.State != rivertype.JobStateCompleted {
					t.Fatalf("job %d: state %s, errors %+v", id, job.State, job.Errors)
				}
				if !tc.token {
					if r.ok {
						t.Fatalf("job's context: token %d; want none without WithToken", r.token)
					}
					continue
				}
				if !r.ok || r.token == 0 {
					t.Fatalf("job's context: token %d, %v; want a token", r.token, r.ok)
				}
				if r.fence != nil {
					t.Fatalf("CheckFence of the job's token in WorkTx's transaction: %v", r.fence)
				}
				tokens = append(tokens, r.token)
			}
			if tc.token && tokens[1] <= tokens[0] {
				t.Fatalf("tokens %v, want strictly increasing", tokens)
			}
		})
	}
}
