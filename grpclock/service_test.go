package grpclock_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/pglockkit/kit/grpclock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// The test service has no .proto: a hand-written grpc.ServiceDesc and a
// JSON codec, registered under the content-subtype "json".

type jsonCodec struct{}

func (jsonCodec) Marshal(v any) ([]byte, error)      { return json.Marshal(v) }
func (jsonCodec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }
func (jsonCodec) Name() string                       { return "json" }

func init() { encoding.RegisterCodec(jsonCodec{}) }

// workRequest is the request of every test method; it is a grpclock.Keyer.
type workRequest struct {
	Key   string        `json:"key"`
	Sleep time.Duration `json:"sleep"`
	Fail  bool          `json:"fail"`
	Panic bool          `json:"panic"`
	Row   string        `json:"row"` // inserted in the lock's transaction
	// Dup inserts Row twice: the table's deferred unique constraint then
	// fails the commit.
	Dup bool `json:"dup"`
	// UntilDone makes the handler wait for its context to end, and fail
	// with the context's cause.
	UntilDone bool `json:"until_done"`
	// Nested makes the handler call the worker's nest with the request's
	// key (a nested Do of it).
	Nested bool `json:"nested"`
}

func (r *workRequest) LockKey() string { return r.Key }

type workResponse struct {
	HasTx bool `json:"has_tx"`
	// Token is the fencing token in the handler's context (HasToken: there
	// is one).
	Token    int64 `json:"token"`
	HasToken bool  `json:"has_token"`
}

const (
	methodWork   = "/grpclock.test.Worker/Work"
	methodStream = "/grpclock.test.Worker/Stream"
	rowsTable    = "grpclock_test_tx_rows"
)

// worker is the service; servers that share a worker share its counters,
// so that overlap across two replicas is seen.
type worker struct {
	mu       sync.Mutex
	inFlight map[string]int
	maxByKey map[string]int
	all      atomic.Int32
	maxAll   atomic.Int32
	ran      atomic.Int32
	// nest, set by a test before its calls, is what a Nested request runs.
	nest func(ctx context.Context, key string) error
}

func newWorker() *worker {
	return &worker{inFlight: map[string]int{}, maxByKey: map[string]int{}}
}

func (w *worker) enter(key string) {
	w.ran.Add(1)
	w.mu.Lock()
	w.inFlight[key]++
	if n := w.inFlight[key]; n > w.maxByKey[key] {
		w.maxByKey[key] = n
	}
	w.mu.Unlock()
	n := w.all.Add(1)
	for {
		m := w.maxAll.Load()
		if n <= m || w.maxAll.CompareAndSwap(m, n) {
			break
		}
	}
}

func (w *worker) leave(key string) {
	w.all.Add(-1)
	w.mu.Lock()
	w.inFlight[key]--
	w.mu.Unlock()
}

// maxOverlap is the most calls that ran at once with key.
func (w *worker) maxOverlap(key string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.maxByKey[key]
}

func (w *worker) work(ctx context.Context, req *workRequest) (*workResponse, error) {
	w.enter(req.Key)
	defer w.leave(req.Key)
	tx, hasTx := pglock.TxFromContext(ctx)
	if req.Row != "" {
		if !hasTx {
			return nil, status.Error(codes.FailedPrecondition, "no transaction in context")
		}
		n := 1
		if req.Dup {
			n = 2
		}
		for range n {
			if _, err := tx.Exec(ctx, "INSERT INTO "+rowsTable+" (v) VALUES ($1)", req.Row); err != nil {
				return nil, status.Errorf(codes.Internal, "insert: %v", err)
			}
		}
	}
	if req.Sleep > 0 {
		select {
		case <-time.After(req.Sleep):
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	if req.UntilDone {
		select {
		case <-ctx.Done():
			return nil, status.Errorf(codes.Unknown, "handler context ended: %v", context.Cause(ctx))
		case <-time.After(10 * time.Second):
			return nil, status.Error(codes.DeadlineExceeded, "handler context never ended")
		}
	}
	if req.Nested {
		if err := w.nest(ctx, req.Key); err != nil {
			return nil, status.Errorf(codes.Internal, "nested Do: %v", err)
		}
	}
	if req.Panic {
		panic("worker: asked to panic")
	}
	if req.Fail {
		return nil, status.Error(codes.FailedPrecondition, "worker: asked to fail")
	}
	token, hasToken := pglock.TokenFromContext(ctx)
	return &workResponse{HasTx: hasTx, Token: token, HasToken: hasToken}, nil
}

// stream receives requests until the client closes its side; the first one
// names the work, which runs as for a unary call. It takes the context
// before the first receive, to show that the transaction appears in it.
func (w *worker) stream(ss grpc.ServerStream) error {
	ctx := ss.Context()
	var req workRequest
	if err := ss.RecvMsg(&req); err != nil {
		return err
	}
	resp, err := w.work(ctx, &req)
	if err != nil {
		return err
	}
	for {
		var more workRequest
		if err := ss.RecvMsg(&more); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return err
		}
	}
	return ss.SendMsg(resp)
}

var workerDesc = grpc.ServiceDesc{
	ServiceName: "grpclock.test.Worker",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Work",
		Handler: func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
			req := new(workRequest)
			if err := dec(req); err != nil {
				return nil, err
			}
			h := func(ctx context.Context, req any) (any, error) { return srv.(*worker).work(ctx, req.(*workRequest)) }
			if ic == nil {
				return h(ctx, req)
			}
			return ic(ctx, req, &grpc.UnaryServerInfo{Server: srv, FullMethod: methodWork}, h)
		},
	}},
	Streams: []grpc.StreamDesc{{
		StreamName:    "Stream",
		Handler:       func(srv any, ss grpc.ServerStream) error { return srv.(*worker).stream(ss) },
		ServerStreams: true,
		ClientStreams: true,
	}},
}

// recoverUnary and recoverStream turn a panic into codes.Internal, as
// go-grpc-middleware's recovery interceptor does. They are the outermost.
func recoverUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if v := recover(); v != nil {
			err = status.Errorf(codes.Internal, "panic: %v", v)
		}
	}()
	return h(ctx, req)
}

func recoverStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = status.Errorf(codes.Internal, "panic: %v", v)
		}
	}()
	return h(srv, ss)
}

// replica is one server: its own pool and Locker, the interceptors, the
// shared worker, and a client connected over bufconn.
type replica struct {
	pool   *pgxpool.Pool
	locker *pglock.Locker
	conn   *grpc.ClientConn
}

// startReplica starts a server for w on a pool of its own. lockerOpts
// configure its Locker, opts both interceptors.
func startReplica(t testing.TB, w *worker, lockerOpts []pglock.Option, opts ...grpclock.Option) *replica {
	t.Helper()
	return startReplicaOn(t, pgtest.Pool(t, 8), w, lockerOpts, opts...)
}

// startReplicaOn is startReplica on pool.
func startReplicaOn(t testing.TB, pool *pgxpool.Pool, w *worker, lockerOpts []pglock.Option, opts ...grpclock.Option) *replica {
	t.Helper()
	locker, err := pglock.NewLocker(pool, lockerOpts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = locker.Close() })
	unary, err := grpclock.UnaryServerInterceptor(locker, opts...)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := grpclock.StreamServerInterceptor(locker, opts...)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(
		grpc.ChainUnaryInterceptor(recoverUnary, unary),
		grpc.ChainStreamInterceptor(recoverStream, stream),
	)
	srv.RegisterService(&workerDesc, w)
	return &replica{pool: pool, locker: locker, conn: serve(t, srv)}
}

// serve runs srv on a bufconn listener until the test ends and returns a
// client for it.
func serve(t testing.TB, srv *grpc.Server) *grpc.ClientConn {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(lis)
	}()
	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.CallContentSubtype("json")),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		srv.Stop()
		<-done
	})
	return conn
}

func (r *replica) work(ctx context.Context, req *workRequest) (*workResponse, error) {
	resp := new(workResponse)
	err := r.conn.Invoke(ctx, methodWork, req, resp)
	return resp, err
}

// stream sends req and then more messages, and returns the response.
func (r *replica) stream(ctx context.Context, req *workRequest, md ...string) (*workResponse, error) {
	desc := &workerDesc.Streams[0]
	if len(md) > 0 {
		ctx = metadataContext(ctx, md...)
	}
	cs, err := r.conn.NewStream(ctx, desc, methodStream)
	if err != nil {
		return nil, err
	}
	if err := cs.SendMsg(req); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	if err := cs.SendMsg(&workRequest{}); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	if err := cs.CloseSend(); err != nil {
		return nil, err
	}
	resp := new(workResponse)
	if err := cs.RecvMsg(resp); err != nil {
		return nil, err
	}
	// The stream's final status: a failed commit shows here, after the
	// response the handler had sent.
	if err := cs.RecvMsg(new(workResponse)); err == nil {
		return nil, errors.New("a second response, want the end of the stream")
	} else if !errors.Is(err, io.EOF) {
		return resp, err
	}
	return resp, nil
}

// lockKey is the pglock.Key the interceptors lock for key.
func lockKey(t testing.TB, r *replica, key string) pglock.Key {
	t.Helper()
	k, err := r.locker.Key(grpclock.DefaultNamespace + key)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func codeOf(err error) codes.Code { return status.Code(err) }

func metadataContext(ctx context.Context, kv ...string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, kv...)
}
