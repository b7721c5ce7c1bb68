package locktest

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Replica is one instance of a service under test: a pool of its own on
// the test database, a Locker on it and an HTTP server. Two replicas
// contend for keys only through PostgreSQL, as two processes would.
type Replica struct {
	Pool   *pgxpool.Pool
	Locker *pglock.Locker
	Server *httptest.Server
}

// NewReplica makes a pool of maxConns connections, a Locker on it with
// opts, and an HTTP server for the handler that handler builds from that
// Locker; all are closed when the test ends (the server first). The Locker
// is started (its first lock opens its connection and tests the server), as
// a running service's is: otherwise a test's first request would pay for
// that within its wait limit, and on a loaded machine be answered 503.
func NewReplica(tb testing.TB, maxConns int32, handler func(lk *pglock.Locker) http.Handler, opts ...pglock.Option) *Replica {
	tb.Helper()
	pool := pgtest.Pool(tb, maxConns)
	lk, err := pglock.NewLocker(pool, opts...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = lk.Close() })
	if lk.Pooled() {
		warm, err := lk.NewLock(pgtest.UniqueKey(tb)+":warm", pglock.WithScope(pglock.Session), pglock.WithWait(0))
		if err != nil {
			tb.Fatal(err)
		}
		if _, err := warm.TryDo(context.Background(), func(context.Context) error { return nil }); err != nil {
			tb.Fatal(err)
		}
	}
	srv := httptest.NewServer(handler(lk))
	tb.Cleanup(srv.Close)
	return &Replica{Pool: pool, Locker: lk, Server: srv}
}
