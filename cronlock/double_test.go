package cronlock_test

import (
	"context"
	"errors"
	"testing"

	"github.com/pglockkit/kit/cronlock"
	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/pglock/pglocktest"
)

// cronlock on pglocktest's in-memory double, unchanged: a tick whose lock
// is held by another replica is skipped, a free one runs, and a loss during
// the run cancels the job's context.
func TestOnDouble(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	lk, err := pglocktest.NewLocker(srv)
	if err != nil {
		t.Fatal(err)
	}
	defer lk.Close()
	lose := false
	var cause error
	job, err := cronlock.Func(lk, "report", func(ctx context.Context) error {
		if lose {
			srv.Lose(pglocktestKey(t, lk))
			<-ctx.Done()
			cause = context.Cause(ctx)
		}
		return nil
	}, cronlock.WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	release := srv.HoldElsewhere(job.Key())
	if ran, err := job.RunContext(ctx); ran || err != nil {
		t.Fatalf("tick with the lock held elsewhere: ran %v, %v", ran, err)
	}
	release()
	if ran, err := job.RunContext(ctx); !ran || err != nil {
		t.Fatalf("tick with the lock free: ran %v, %v", ran, err)
	}
	lose = true
	ran, err := job.RunContext(ctx)
	if !ran || !errors.Is(err, pglock.ErrLockLost) || !errors.Is(cause, pglock.ErrLockLost) {
		t.Fatalf("tick lost halfway: ran %v, err %v, cause %v", ran, err, cause)
	}
}

func pglocktestKey(t *testing.T, lk *pglock.Locker) pglock.Key {
	k, err := lk.Key(cronlock.DefaultNamespace + "report")
	if err != nil {
		t.Fatal(err)
	}
	return k
}
