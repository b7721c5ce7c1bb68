package grpclock_test

import (
	"context"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/grpclock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

var createRows sync.Once

// rowsPool returns a pool on which the test table exists.
func rowsPool(t *testing.T) *pgxpool.Pool {
	t.Helper()
	pool := pgtest.Pool(t, 2)
	var err error
	createRows.Do(func() {
		_, err = pool.Exec(context.Background(), "CREATE TABLE IF NOT EXISTS "+rowsTable+
			" (v text NOT NULL, UNIQUE (v) DEFERRABLE INITIALLY DEFERRED)")
	})
	if err != nil {
		t.Fatal(err)
	}
	return pool
}

func rowExists(t *testing.T, pool *pgxpool.Pool, v string) bool {
	t.Helper()
	var n int
	if err := pool.QueryRow(t.Context(), "SELECT count(*) FROM "+rowsTable+" WHERE v = $1", v).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n > 0
}

// Transaction scope: the handler's work, done in the lock's transaction,
// commits when the handler succeeds and rolls back when it fails or panics;
// the lock is free afterwards every time. Unary and stream alike.
func TestTransactionScope(t *testing.T) {
	t.Parallel()
	check := rowsPool(t)
	w := newWorker()
	viaLocker := startReplica(t, w, []pglock.Option{pglock.WithScope(pglock.Transaction)})
	viaOption := startReplica(t, w, nil, grpclock.WithScope(pglock.Transaction))

	type call func(ctx context.Context, req *workRequest) (*workResponse, error)
	for _, kind := range []struct {
		name string
		r    *replica
		call call
	}{
		{"unary/locker", viaLocker, viaLocker.work},
		{"unary/option", viaOption, viaOption.work},
		{"stream", viaLocker, func(ctx context.Context, req *workRequest) (*workResponse, error) {
			return viaLocker.stream(ctx, req)
		}},
	} {
		for _, tc := range []struct {
			name   string
			req    workRequest
			code   codes.Code
			commit bool
		}{
			{"success", workRequest{}, codes.OK, true},
			{"error", workRequest{Fail: true}, codes.FailedPrecondition, false},
			{"panic", workRequest{Panic: true}, codes.Internal, false},
			// The handler succeeds; the commit fails (a deferred unique
			// constraint): the client gets Unavailable, not the response.
			{"commit fails", workRequest{Dup: true}, codes.Unavailable, false},
		} {
			t.Run(kind.name+"/"+tc.name, func(t *testing.T) {
				req := tc.req
				req.Key = pgtest.UniqueKey(t)
				req.Row = req.Key
				_, err := kind.call(t.Context(), &req)
				if got := codeOf(err); got != tc.code {
					t.Fatalf("call: %v, want %v", err, tc.code)
				}
				if got := rowExists(t, check, req.Row); got != tc.commit {
					t.Errorf("row committed: %v, want %v", got, tc.commit)
				}
				pgtest.WaitFree(t, check, lockKey(t, kind.r, req.Key))
				if n := kind.r.pool.Stat().AcquiredConns(); n != 0 {
					t.Errorf("%d connections still acquired", n)
				}
			})
		}
	}
}
