package httplock_test

import (
	"context"
	"errors"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

// overlap counts the handlers running at once and remembers the most.
type overlap struct {
	cur, max atomic.Int64
}

func (o *overlap) enter() {
	n := o.cur.Add(1)
	for {
		m := o.max.Load()
		if n <= m || o.max.CompareAndSwap(m, n) {
			return
		}
	}
}

func (o *overlap) leave() { o.cur.Add(-1) }

// replica is one "server instance": its own pool and Locker.
type replica struct {
	pool   *pgxpool.Pool
	locker *pglock.Locker
}

func newReplica(t *testing.T, maxConns int32, opts ...pglock.Option) replica {
	t.Helper()
	pool := pgtest.Pool(t, maxConns)
	lk, err := pglock.NewLocker(pool, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	return replica{pool: pool, locker: lk}
}

func mustMiddleware(t *testing.T, lk *pglock.Locker, key httplock.KeyFunc, opts ...httplock.Option) func(http.Handler) http.Handler {
	t.Helper()
	mw, err := httplock.Middleware(lk, key, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return mw
}

// lockKey is the pglock.Key the middleware locks for name with the default
// namespace.
func lockKey(t *testing.T, lk *pglock.Locker, name string) pglock.Key {
	t.Helper()
	k, err := lk.Key(httplock.DefaultNamespace + name)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waiters returns how many sessions wait (not granted) for key.
func waiters(t *testing.T, watch *pgxpool.Pool, key pglock.Key) int {
	t.Helper()
	hs, err := pgtest.Holders(context.Background(), watch, key)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, h := range hs {
		if !h.Granted {
			n++
		}
	}
	return n
}

// noConnsLeft fails unless every pool has given back all its connections.
func noConnsLeft(t *testing.T, pools ...*pgxpool.Pool) {
	t.Helper()
	for i, p := range pools {
		waitFor(t, "pool connections to be released", func() bool { return p.Stat().AcquiredConns() == 0 })
		_ = i
	}
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }
