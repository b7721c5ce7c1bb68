package echosuite

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// BenchmarkRequest compares one request through a's middleware
// (uncontended key, Session scope, fail fast) with the same Echo handler
// taking and releasing the advisory lock itself with raw pgx on a pinned
// pool connection, in the same run and on the same pool. The ratio
// middleware/raw is the middleware's cost; the pglock sub-benchmark (the
// handler calling Locker.TryDo itself) splits it between the adapter and
// the core. Besides ns/op it reports cpu-ns/op, the process's CPU time per
// request, which swings less than wall time on a shared machine. The paired
// sub-benchmark alternates a middleware request and a raw one in one loop,
// on different keys, and reports middleware-ns/op, raw-ns/op and their
// ratio middleware/raw: both sides see the same noise, so on a shared or
// virtual machine that ratio is the figure to trust
// (scripts/benchratio.awk).
func BenchmarkRequest[C any](b *testing.B, a Adapter[C]) {
	s := &suite[C]{a: a}
	ctx := context.Background()
	pool := pgtest.Pool(b, 2)
	lk, err := pglock.NewLocker(pool)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = lk.Close() })
	// Open the pool's connections before timing, so that no sub-benchmark
	// pays for dialing.
	var warm []*pgxpool.Conn
	for range pool.Config().MaxConns {
		c, err := pool.Acquire(ctx)
		if err != nil {
			b.Fatal(err)
		}
		warm = append(warm, c)
	}
	for _, c := range warm {
		c.Release()
	}
	// The library side locks id, the raw side rid: in the paired
	// sub-benchmark they never contend.
	id, rid := pgtest.UniqueKey(b), pgtest.UniqueKey(b)
	key := locktest.Key(b, lk, a.Namespace+rid)
	work := func(c C) error { return a.NoContent(c, http.StatusNoContent) }
	// request returns one request through e for the key name, as a
	// function that fails b unless the handler answered 204. A server's
	// request context can be cancelled (the client may go away); give the
	// benchmark's requests one too, for both sides.
	request := func(b *testing.B, e http.Handler, name string) func() {
		rctx, cancel := context.WithCancel(ctx)
		b.Cleanup(cancel)
		req := httptest.NewRequestWithContext(rctx, http.MethodPost, "/orders/"+name, nil)
		return func() {
			rec := httptest.NewRecorder()
			e.ServeHTTP(rec, req)
			if rec.Code != http.StatusNoContent {
				b.Fatalf("status %d: %s", rec.Code, rec.Body)
			}
		}
	}
	run := func(b *testing.B, e http.Handler, name string) {
		do := request(b, e, name)
		b.ReportAllocs()
		cpu := locktest.CPUTime()
		for b.Loop() {
			do()
		}
		b.ReportMetric(float64(locktest.CPUTime()-cpu)/float64(b.N), "cpu-ns/op")
	}
	middleware := func(b *testing.B) http.Handler {
		mw, err := a.New(lk, a.ParamKey("id"))
		if err != nil {
			b.Fatal(err)
		}
		return s.echo(App{}, work, mw)
	}
	// raw is the handler taking the lock itself, on key (rid's key).
	raw := func() http.Handler {
		return s.echo(App{}, func(c C) error {
			if a.PathParam(c, "id") == "" {
				return a.HTTPError(http.StatusBadRequest, "", nil)
			}
			rctx := a.Request(c).Context()
			conn, err := pool.Acquire(rctx)
			if err != nil {
				return a.HTTPError(http.StatusServiceUnavailable, "", err)
			}
			defer conn.Release()
			var ok bool
			if err := conn.QueryRow(rctx, "SELECT pg_try_advisory_lock($1::bigint)", key.Int64()).Scan(&ok); err != nil || !ok {
				return a.HTTPError(http.StatusConflict, "", err)
			}
			werr := work(c)
			if err := conn.QueryRow(ctx, "SELECT pg_advisory_unlock($1::bigint)", key.Int64()).Scan(&ok); err != nil || !ok {
				b.Errorf("unlock: %v, %v", ok, err)
			}
			return werr
		}, nil)
	}

	b.Run("middleware", func(b *testing.B) {
		run(b, middleware(b), id)
	})

	// The same handler calling pglock itself: middleware/pglock is what the
	// adapter adds, pglock/raw-pgx what the core adds.
	b.Run("pglock", func(b *testing.B) {
		e := s.echo(App{}, func(c C) error {
			id := a.PathParam(c, "id")
			if id == "" {
				return a.HTTPError(http.StatusBadRequest, "", nil)
			}
			var werr error
			ran, err := lk.TryDo(a.Request(c).Context(), a.Namespace+id, func(context.Context) error {
				werr = work(c)
				return nil
			})
			if err != nil || !ran {
				return a.HTTPError(http.StatusConflict, "", err)
			}
			return werr
		}, nil)
		run(b, e, id)
	})

	b.Run("raw", func(b *testing.B) {
		run(b, raw(), rid)
	})

	b.Run("paired", func(b *testing.B) {
		lib, rw := request(b, middleware(b), id), request(b, raw(), rid)
		lib() // warm both sides' statement caches
		rw()
		pgtest.Paired(b, "middleware", lib, rw)
	})
}
