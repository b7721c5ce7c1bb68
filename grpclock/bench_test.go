package grpclock_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"

	"github.com/pglockkit/kit/grpclock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// benchHandler is the method body of the benchmark service.
type benchHandler func(ctx context.Context, req *workRequest) error

const methodBench = "/grpclock.bench.Bench/Call"

var benchDesc = grpc.ServiceDesc{
	ServiceName: "grpclock.bench.Bench",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Call",
		Handler: func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
			req := new(workRequest)
			if err := dec(req); err != nil {
				return nil, err
			}
			h := func(ctx context.Context, req any) (any, error) {
				return &workResponse{}, srv.(benchHandler)(ctx, req.(*workRequest))
			}
			if ic == nil {
				return h(ctx, req)
			}
			return ic(ctx, req, &grpc.UnaryServerInfo{Server: srv, FullMethod: methodBench}, h)
		},
	}},
}

// BenchmarkUnary compares, over bufconn, one unary call through the
// interceptor (Session scope on a pool) with the same call whose handler
// takes the same lock itself with raw pgx: a pinned pool connection,
// pg_advisory_lock, pg_advisory_unlock (its boolean checked), release.
// Both hash the request's key the same way. The paired sub-benchmark
// alternates an interceptor call and a raw one in one loop, on the same
// pool and on different keys, and reports interceptor-ns/op, raw-ns/op and
// their ratio interceptor/raw: both sides see the same noise, so on a shared
// or virtual machine that ratio is the figure to trust
// (scripts/benchratio.awk).
func BenchmarkUnary(b *testing.B) {
	// interceptor serves the empty method behind the interceptor, on pool.
	interceptor := func(b *testing.B, pool *pgxpool.Pool) *grpc.ClientConn {
		locker, err := pglock.NewLocker(pool)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = locker.Close() })
		ic, err := grpclock.UnaryServerInterceptor(locker)
		if err != nil {
			b.Fatal(err)
		}
		srv := grpc.NewServer(grpc.UnaryInterceptor(ic))
		srv.RegisterService(&benchDesc, benchHandler(func(context.Context, *workRequest) error { return nil }))
		return serve(b, srv)
	}
	// raw serves the method whose handler takes the lock itself, on pool.
	raw := func(b *testing.B, pool *pgxpool.Pool) *grpc.ClientConn {
		srv := grpc.NewServer()
		srv.RegisterService(&benchDesc, benchHandler(func(ctx context.Context, req *workRequest) error {
			k, err := pglock.KeyOf(grpclock.DefaultNamespace + req.LockKey())
			if err != nil {
				return err
			}
			conn, err := pool.Acquire(ctx)
			if err != nil {
				return err
			}
			defer conn.Release()
			if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1::bigint)", k.Int64()); err != nil {
				return err
			}
			var ok bool
			if err := conn.QueryRow(ctx, "SELECT pg_advisory_unlock($1::bigint)", k.Int64()).Scan(&ok); err != nil || !ok {
				b.Errorf("unlock: %v, %v", ok, err)
			}
			return nil
		}))
		return serve(b, srv)
	}
	b.Run("interceptor", func(b *testing.B) {
		runBench(b, interceptor(b, pgtest.Pool(b, 4)))
	})
	b.Run("raw", func(b *testing.B) {
		runBench(b, raw(b, pgtest.Pool(b, 4)))
	})
	b.Run("paired", func(b *testing.B) {
		pool := pgtest.Pool(b, 4)
		lib, rw := call(b, interceptor(b, pool)), call(b, raw(b, pool))
		lib() // warm both sides' connections and statement caches
		rw()
		pgtest.Paired(b, "interceptor", lib, rw)
	})
}

// call returns one unary call on conn, on a key of its own, as a function
// that fails b if the call fails.
func call(b *testing.B, conn *grpc.ClientConn) func() {
	req := &workRequest{Key: pgtest.UniqueKey(b)}
	ctx := context.Background()
	return func() {
		if err := conn.Invoke(ctx, methodBench, req, new(workResponse)); err != nil {
			b.Fatal(err)
		}
	}
}

func runBench(b *testing.B, conn *grpc.ClientConn) {
	do := call(b, conn)
	b.ReportAllocs()
	for b.Loop() {
		do()
	}
}
