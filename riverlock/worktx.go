package riverlock

import (
	"context"
	"fmt"
	"strconv"

	"github.com/jackc/pgx/v5"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"

	"github.com/pglockkit/kit/pglock"
)

// WorkTx runs fn as one atomic unit with the job's lock and its completion,
// for a worker on River's pgx driver (riverpgxv5). It opens a transaction on
// locker's database, takes the job key's transaction-scoped advisory lock in
// it (pg_advisory_xact_lock, waiting for it as long as ctx allows: inside
// Work, River's job timeout bounds the wait), runs fn with the transaction,
// marks the job completed in the same transaction with river.JobCompleteTx,
// and commits. The lock, fn's work and the completion commit together or not
// at all: a job whose connection dies before the commit neither completes
// nor keeps its work, so nothing done under a lost lock is ever committed.
//
// When fn fails (or panics, or the completion or the commit fails) the
// transaction is rolled back, which undoes fn's work and the completion and
// releases the lock, and WorkTx returns the error: return it from Work and
// River retries the job as usual. When WorkTx returns nil the job is
// completed already; Work should return nil too.
//
// The key is the args' LockKey (see [JobArgsWithLockKey]) in the default
// namespace ([DefaultNamespace]), under the Locker's own namespace. Args
// without a LockKey, or with an empty one, lock the job itself (the key
// "riverjob:" + its ID). When the [Middleware] already holds the same key for
// this job (the same namespace), or a slot of its semaphore under a Limit
// above 1, WorkTx locks the job itself as well, rather than wait for its own
// job's lock or serialize the jobs that the limit lets run together: the
// middleware's lock (or slot) keeps the other jobs of the key out.
//
// ctx must be the context River gave Work (JobCompleteTx finds the client in
// it); locker must be on a pgx pool or connection of River's database.
func WorkTx[T river.JobArgs](ctx context.Context, locker *pglock.Locker, job *river.Job[T], fn func(ctx context.Context, tx pgx.Tx) error) error {
	switch {
	case locker == nil:
		return fmt.Errorf("%w: WorkTx: %w", ErrInvalidConfig, ErrNilLocker)
	case job == nil || job.JobRow == nil:
		return fmt.Errorf("%w: WorkTx: nil job", ErrInvalidConfig)
	case fn == nil:
		return fmt.Errorf("%w: WorkTx: nil function", ErrInvalidConfig)
	}
	opts := []pglock.Option{
		pglock.WithScope(pglock.Transaction),
		pglock.WithMode(pglock.Exclusive),
		pglock.WithRollbackOnError(true),
	}
	jobKey := "riverjob:" + strconv.FormatInt(job.ID, 10)
	name := jobKey
	if a, ok := any(job.Args).(interface{ LockKey() string }); ok {
		if k := a.LockKey(); k != "" {
			name = DefaultNamespace(job.Kind) + k
		}
	}
	lock, err := locker.NewLock(name, opts...)
	if err != nil {
		return fmt.Errorf("riverlock: WorkTx job %d: %w", job.ID, err)
	}
	if held, ok := heldFromContext(ctx); ok && held == lock.Key() && name != jobKey {
		if lock, err = locker.NewLock(jobKey, opts...); err != nil {
			return fmt.Errorf("riverlock: WorkTx job %d: %w", job.ID, err)
		}
	}
	err = lock.Do(ctx, func(ctx context.Context) error {
		tx, ok := pglock.TxFromContext(ctx)
		if !ok {
			return fmt.Errorf("%w: WorkTx needs a Locker on a pgx pool or connection (got no pgx transaction)", ErrInvalidConfig)
		}
		if err := fn(ctx, tx); err != nil {
			return err
		}
		if _, err := river.JobCompleteTx[*riverpgxv5.Driver](ctx, tx, job); err != nil {
			return fmt.Errorf("riverlock: WorkTx: complete job %d: %w", job.ID, err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("riverlock: WorkTx job %d (kind %q) key %q: %w", job.ID, job.Kind, name, err)
	}
	return nil
}
