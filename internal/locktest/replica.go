package locktest

import (
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
// Locker; all are closed when the test ends (the server first).
func NewReplica(tb testing.TB, maxConns int32, handler func(lk *pglock.Locker) http.Handler, opts ...pglock.Option) *Replica {
	tb.Helper()
	pool := pgtest.Pool(tb, maxConns)
	lk, err := pglock.NewLocker(pool, opts...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = lk.Close() })
	srv := httptest.NewServer(handler(lk))
	tb.Cleanup(srv.Close)
	return &Replica{Pool: pool, Locker: lk, Server: srv}
}
