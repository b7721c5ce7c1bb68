package grpclock_test

import (
	"context"
	"testing"

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
// Both hash the request's key the same way. Report the ratio of ns/op.
func BenchmarkUnary(b *testing.B) {
	b.Run("grpclock", func(b *testing.B) {
		pool := pgtest.Pool(b, 4)
		locker, err := pglock.NewLocker(pool)
		if err != nil {
			b.Fatal(err)
		}
		ic, err := grpclock.UnaryServerInterceptor(locker)
		if err != nil {
			b.Fatal(err)
		}
		srv := grpc.NewServer(grpc.UnaryInterceptor(ic))
		srv.RegisterService(&benchDesc, benchHandler(func(context.Context, *workRequest) error { return nil }))
		runBench(b, serve(b, srv))
	})
	b.Run("rawpgx", func(b *testing.B) {
		pool := pgtest.Pool(b, 4)
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
		runBench(b, serve(b, srv))
	})
}

func runBench(b *testing.B, conn *grpc.ClientConn) {
	req := &workRequest{Key: pgtest.UniqueKey(b)}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if err := conn.Invoke(ctx, methodBench, req, new(workResponse)); err != nil {
			b.Fatal(err)
		}
	}
}
