package grpclock_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/pglockkit/kit/grpclock"
	"github.com/pglockkit/kit/pglock"
)

// TransferRequest stands for a generated request message. LockKey makes it
// a grpclock.Keyer: with protoc, put the method in a file of your own next
// to the generated one.
type TransferRequest struct {
	Account string `json:"account"`
	Amount  int    `json:"amount"`
}

// LockKey locks the account the transfer debits.
func (r *TransferRequest) LockKey() string { return "account:" + r.Account }

type TransferReply struct {
	Message string `json:"message"`
}

// transfer is the method's handler.
func transfer(ctx context.Context, req *TransferRequest) (*TransferReply, error) {
	if tx, ok := pglock.TxFromContext(ctx); ok {
		// Transaction scope: work done in tx commits with the lock.
		var one int
		if err := tx.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
			return nil, err
		}
		return &TransferReply{Message: fmt.Sprintf("moved %d from %s in the lock's transaction", req.Amount, req.Account)}, nil
	}
	return &TransferReply{Message: fmt.Sprintf("moved %d from %s", req.Amount, req.Account)}, nil
}

// accountsDesc is what protoc would generate for service bank.Accounts
// { rpc Transfer(TransferRequest) returns (TransferReply); }.
var accountsDesc = grpc.ServiceDesc{
	ServiceName: "bank.Accounts",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Transfer",
		Handler: func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
			req := new(TransferRequest)
			if err := dec(req); err != nil {
				return nil, err
			}
			h := func(ctx context.Context, req any) (any, error) { return transfer(ctx, req.(*TransferRequest)) }
			if ic == nil {
				return h(ctx, req)
			}
			return ic(ctx, req, &grpc.UnaryServerInfo{Server: srv, FullMethod: "/bank.Accounts/Transfer"}, h)
		},
	}},
}

func ExampleUnaryServerInterceptor() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer locker.Close()
	lockCalls, err := grpclock.UnaryServerInterceptor(locker)
	if err != nil {
		fmt.Println(err) // a nil locker or a bad option
		return
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(lockCalls))
	srv.RegisterService(&accountsDesc, nil)
	conn, stop := exampleServe(srv)
	defer stop()

	// Another replica is busy with the account.
	other, _ := pglock.NewLock(pool, grpclock.DefaultNamespace+"account:"+exampleAccount)
	if err := other.Acquire(ctx); err != nil {
		fmt.Println(err)
		return
	}
	reply := new(TransferReply)
	err = conn.Invoke(ctx, "/bank.Accounts/Transfer", &TransferRequest{Account: exampleAccount, Amount: 10}, reply)
	fmt.Println("while busy:", status.Code(err))

	_ = other.Release(ctx)
	err = conn.Invoke(ctx, "/bank.Accounts/Transfer", &TransferRequest{Account: exampleAccount, Amount: 10}, reply)
	fmt.Println("when free:", status.Code(err), strings.ReplaceAll(reply.Message, exampleAccount, "A"))
	// Output:
	// while busy: Aborted
	// when free: OK moved 10 from A
}

// Transaction scope: the handler finds the lock's transaction in its
// context; it commits when the handler returns nil.
func ExampleWithScope() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	locker, _ := pglock.NewLocker(pool)
	defer locker.Close()
	lockCalls, err := grpclock.UnaryServerInterceptor(locker,
		grpclock.WithScope(pglock.Transaction),
		grpclock.WithWait(5*time.Second), // wait for a busy account, up to 5s or the call's deadline
	)
	if err != nil {
		fmt.Println(err)
		return
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(lockCalls))
	srv.RegisterService(&accountsDesc, nil)
	conn, stop := exampleServe(srv)
	defer stop()

	reply := new(TransferReply)
	err = conn.Invoke(ctx, "/bank.Accounts/Transfer", &TransferRequest{Account: exampleAccount, Amount: 5}, reply)
	fmt.Println(status.Code(err), strings.ReplaceAll(reply.Message, exampleAccount, "A"))
	// Output:
	// OK moved 5 from A in the lock's transaction
}

// Method filtering by composition: any selector that decides per method
// can wrap the interceptor. go-grpc-middleware's selector package does
// this (see the package documentation); here, a hand-written one.
func ExampleWithMethods() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	locker, _ := pglock.NewLocker(pool)
	defer locker.Close()

	// Either the allow-list option...
	_, err = grpclock.UnaryServerInterceptor(locker, grpclock.WithMethods("/bank.Accounts/Transfer"))
	fmt.Println("WithMethods:", err)

	// ...or composition with a selector of your own.
	lockCalls, _ := grpclock.UnaryServerInterceptor(locker)
	onlyMutations := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if strings.HasPrefix(info.FullMethod, "/bank.Accounts/Get") {
			return h(ctx, req) // reads take no lock
		}
		return lockCalls(ctx, req, info, h)
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(onlyMutations))
	srv.RegisterService(&accountsDesc, nil)
	conn, stop := exampleServe(srv)
	defer stop()
	reply := new(TransferReply)
	err = conn.Invoke(ctx, "/bank.Accounts/Transfer", &TransferRequest{Account: exampleAccount, Amount: 1}, reply)
	fmt.Println("Transfer:", status.Code(err))
	// Output:
	// WithMethods: <nil>
	// Transfer: OK
}

// A server-streaming method keyed by its request message: the lock is
// taken when the handler receives the request and held until it returns.
func ExampleStreamServerInterceptor() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	locker, _ := pglock.NewLocker(pool)
	defer locker.Close()
	lockStreams, err := grpclock.StreamServerInterceptor(locker, grpclock.WithWait(5*time.Second))
	if err != nil {
		fmt.Println(err)
		return
	}
	desc := grpc.ServiceDesc{
		ServiceName: "bank.Statements",
		HandlerType: (*any)(nil),
		Streams: []grpc.StreamDesc{{
			StreamName:    "Replay",
			ServerStreams: true,
			Handler: func(_ any, ss grpc.ServerStream) error {
				// As generated code does: receive the request, then serve it.
				req := new(TransferRequest)
				if err := ss.RecvMsg(req); err != nil {
					return err // a busy key when not waiting, a failed key function
				}
				for i := range 2 {
					if err := ss.SendMsg(&TransferReply{Message: fmt.Sprintf("entry %d", i+1)}); err != nil {
						return err
					}
				}
				return nil
			},
		}},
	}
	srv := grpc.NewServer(grpc.ChainStreamInterceptor(lockStreams))
	srv.RegisterService(&desc, nil)
	conn, stop := exampleServe(srv)
	defer stop()

	cs, err := conn.NewStream(ctx, &desc.Streams[0], "/bank.Statements/Replay")
	if err != nil {
		fmt.Println(err)
		return
	}
	_ = cs.SendMsg(&TransferRequest{Account: exampleAccount})
	_ = cs.CloseSend()
	for {
		reply := new(TransferReply)
		if err := cs.RecvMsg(reply); err != nil {
			fmt.Println("end:", err)
			break
		}
		fmt.Println(reply.Message)
	}
	// Output:
	// entry 1
	// entry 2
	// end: EOF
}

// A stream keyed by a metadata header, locked before its handler runs.
func ExampleMetadataKey() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	locker, _ := pglock.NewLocker(pool)
	defer locker.Close()
	lockStreams, err := grpclock.StreamServerInterceptor(locker,
		grpclock.WithStreamKeyFunc(grpclock.MetadataKey("x-lock-key")))
	if err != nil {
		fmt.Println(err)
		return
	}
	desc := grpc.ServiceDesc{
		ServiceName: "bank.Exports",
		HandlerType: (*any)(nil),
		Streams: []grpc.StreamDesc{{
			StreamName:    "Export",
			ServerStreams: true,
			Handler: func(_ any, ss grpc.ServerStream) error {
				// The lock is held for the whole handler.
				return ss.SendMsg(&TransferReply{Message: "exported"})
			},
		}},
	}
	srv := grpc.NewServer(grpc.ChainStreamInterceptor(lockStreams))
	srv.RegisterService(&desc, nil)
	conn, stop := exampleServe(srv)
	defer stop()

	ctx = metadata.AppendToOutgoingContext(ctx, "x-lock-key", "export:"+exampleAccount)
	cs, err := conn.NewStream(ctx, &desc.Streams[0], "/bank.Exports/Export")
	if err != nil {
		fmt.Println(err)
		return
	}
	_ = cs.SendMsg(&TransferRequest{})
	_ = cs.CloseSend()
	reply := new(TransferReply)
	fmt.Println(cs.RecvMsg(reply), reply.Message)
	// Output:
	// <nil> exported
}

// A nil Locker is an error at construction, not a panic at the first call.
func ExampleErrNilLocker() {
	_, err := grpclock.UnaryServerInterceptor(nil)
	fmt.Println(errors.Is(err, grpclock.ErrNilLocker))
	_, err = grpclock.StreamServerInterceptor(nil, grpclock.WithWait(-1))
	fmt.Println(errors.Is(err, grpclock.ErrNilLocker))
	// Output:
	// true
	// true
}

// exampleAccount is unique per run: advisory locks are database-wide, and
// another run of these examples may share the database.
var exampleAccount = fmt.Sprintf("%d-%d", os.Getpid(), time.Now().UnixNano())

// exampleServe runs srv on an in-memory listener and returns a client that
// speaks the JSON codec of this package's tests, and a stop function.
func exampleServe(srv *grpc.Server) (*grpc.ClientConn, func()) {
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
		panic(err)
	}
	return conn, func() {
		conn.Close()
		srv.Stop()
		<-done
	}
}
