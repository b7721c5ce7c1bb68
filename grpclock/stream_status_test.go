package grpclock_test

import (
	"context"
	"errors"
	"io"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/pglockkit/kit/grpclock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// careless handlers: one wraps its first RecvMsg's error in
// codes.Internal, as handlers commonly do; the other ignores it and
// returns nil.
var carelessDesc = grpc.ServiceDesc{
	ServiceName: "grpclock.test.Careless",
	HandlerType: (*any)(nil),
	Streams: []grpc.StreamDesc{
		{
			StreamName: "Wrap",
			Handler: func(_ any, ss grpc.ServerStream) error {
				var req workRequest
				if err := ss.RecvMsg(&req); err != nil {
					return status.Errorf(codes.Internal, "recv: %v", err)
				}
				return ss.SendMsg(&workResponse{})
			},
			ServerStreams: true, ClientStreams: true,
		},
		{
			StreamName: "Ignore",
			Handler: func(_ any, ss grpc.ServerStream) error {
				var req workRequest
				_ = ss.RecvMsg(&req)
				return nil
			},
			ServerStreams: true, ClientStreams: true,
		},
	},
}

// carelessCall opens method, sends req, and returns the stream's final
// status (nil for OK).
func carelessCall(ctx context.Context, conn *grpc.ClientConn, method string, req *workRequest) error {
	desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
	cs, err := conn.NewStream(ctx, desc, "/grpclock.test.Careless/"+method)
	if err != nil {
		return err
	}
	if err := cs.SendMsg(req); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	if err := cs.CloseSend(); err != nil {
		return err
	}
	for {
		err := cs.RecvMsg(new(workResponse))
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// When the key is busy or the key function fails, the stream's status is
// the interceptor's (Aborted, InvalidArgument) even if the handler wraps
// its RecvMsg error in another code or ignores it and returns nil: the
// client's retry policy for ABORTED still fires, and a busy call never
// looks like a success.
func TestStreamLockStatusSurvivesHandler(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t, 4)
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = locker.Close() })
	errBadKey := errors.New("bad key")
	keyFunc := func(_ context.Context, _ string, req any) (string, bool, error) {
		if r, ok := req.(*workRequest); ok && r.Fail {
			return "", false, errBadKey
		}
		r := req.(*workRequest)
		return r.Key, r.Key != "", nil
	}
	stream, err := grpclock.StreamServerInterceptor(locker, grpclock.WithKeyFunc(keyFunc))
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.ChainStreamInterceptor(recoverStream, stream))
	srv.RegisterService(&carelessDesc, nil)
	conn := serve(t, srv)

	key := pgtest.UniqueKey(t)
	k, release := holdKey(t, key)
	for _, method := range []string{"Wrap", "Ignore"} {
		t.Run(method, func(t *testing.T) {
			if err := carelessCall(t.Context(), conn, method, &workRequest{Key: key}); codeOf(err) != codes.Aborted {
				t.Errorf("busy key, handler that %ss the error: status %v, want Aborted", method, err)
			}
			if err := carelessCall(t.Context(), conn, method, &workRequest{Key: key, Fail: true}); codeOf(err) != codes.InvalidArgument {
				t.Errorf("failing key function, handler that %ss the error: status %v, want InvalidArgument", method, err)
			}
		})
	}
	if hs := pgtest.Granted(t, pool, k); len(hs) != 1 {
		t.Fatalf("holders of %s = %+v, want only the test's own", k, hs)
	}
	release()
	// Free key: the handlers' own statuses go through.
	if err := carelessCall(t.Context(), conn, "Wrap", &workRequest{Key: key}); err != nil {
		t.Errorf("free key, Wrap: %v, want OK", err)
	}
	if err := carelessCall(t.Context(), conn, "Ignore", &workRequest{Key: key}); err != nil {
		t.Errorf("free key, Ignore: %v, want OK", err)
	}
	pgtest.WaitFree(t, pool, k)
}
