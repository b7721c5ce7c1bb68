// Command grpc runs two replicas of a small gRPC service on loopback
// listeners, each with its own pool and *pglock.Locker, both locking
// through grpclock's interceptors:
//
//   - Transfer fails fast: a second transfer on an account that another
//     replica is busy with gets codes.Aborted (which a client may retry).
//   - Deposit waits for the account's lock (up to 3 s) and runs in the
//     lock's transaction: concurrent deposits on one account, sent to both
//     replicas, run one at a time, and none of their read-modify-write
//     updates is lost.
//
// The service has no .proto: a hand-written grpc.ServiceDesc and a JSON
// codec stand in for generated code. It stops by itself within a few
// seconds.
//
//	go run ./examples/grpc
//
// The database is DATABASE_URL, else a server at 127.0.0.1:5432, else a
// throwaway cluster started from the machine's PostgreSQL binaries.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"

	"github.com/pglockkit/kit/grpclock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	srv, err := pgtest.FindOrStart(ctx)
	if err != nil {
		log.Fatal(err)
	}
	err = run(ctx, os.Stdout, srv.URL)
	srv.Stop()
	if err != nil {
		log.Fatal(err)
	}
}

// jsonCodec lets the service run without protoc: messages are plain Go
// structs sent as JSON (content-subtype "json").
type jsonCodec struct{}

func (jsonCodec) Marshal(v any) ([]byte, error)      { return json.Marshal(v) }
func (jsonCodec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }
func (jsonCodec) Name() string                       { return "json" }

func init() { encoding.RegisterCodec(jsonCodec{}) }

// AccountRequest is the request of both methods. LockKey makes it a
// grpclock.Keyer: calls on one account are serialized.
type AccountRequest struct {
	Account string `json:"account"`
	Amount  int    `json:"amount"`
}

// LockKey returns the account's key.
func (r *AccountRequest) LockKey() string { return "account:" + r.Account }

// AccountReply is the reply of both methods.
type AccountReply struct {
	Replica string `json:"replica"`
	Balance int    `json:"balance"`
}

const (
	methodTransfer = "/demo.Accounts/Transfer"
	methodDeposit  = "/demo.Accounts/Deposit"
	table          = "grpclock_demo_accounts"
)

// accounts is the service as one replica runs it.
type accounts struct {
	name    string
	out     io.Writer
	started chan<- string   // told when a transfer starts (the lock is held)
	done    <-chan struct{} // closed when a transfer may end (the other has been answered)
	running *atomic.Int32   // deposits running now, over both replicas
	most    *atomic.Int32   // most deposits that ran at once
}

// Transfer pretends to be slow work on the account, 500 ms; the first one
// goes on until the demo has seen the other answered, however long that
// takes on a loaded machine.
func (s *accounts) Transfer(ctx context.Context, req *AccountRequest) (*AccountReply, error) {
	select {
	case s.started <- s.name: // the first transfer
		select {
		case <-s.done:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	default:
	}
	select {
	case <-time.After(500 * time.Millisecond):
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	return &AccountReply{Replica: s.name}, nil
}

// Deposit reads the balance, thinks, and writes it back, in the lock's
// transaction: without the lock, concurrent deposits would lose updates.
func (s *accounts) Deposit(ctx context.Context, req *AccountRequest) (*AccountReply, error) {
	n := s.running.Add(1)
	defer s.running.Add(-1)
	for m := s.most.Load(); n > m && !s.most.CompareAndSwap(m, n); m = s.most.Load() {
	}
	tx, ok := pglock.TxFromContext(ctx)
	if !ok {
		return nil, status.Error(codes.Internal, "no lock transaction")
	}
	var balance int
	err := tx.QueryRow(ctx, "SELECT balance FROM "+table+" WHERE id = $1", req.Account).Scan(&balance)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "read balance: %v", err)
	}
	time.Sleep(50 * time.Millisecond)
	balance += req.Amount
	if _, err := tx.Exec(ctx, "UPDATE "+table+" SET balance = $2 WHERE id = $1", req.Account, balance); err != nil {
		return nil, status.Errorf(codes.Internal, "write balance: %v", err)
	}
	fmt.Fprintf(s.out, "  deposit %d on %s -> balance %d\n", req.Amount, s.name, balance)
	return &AccountReply{Replica: s.name, Balance: balance}, nil
}

// unaryMethod builds what protoc would generate for one unary method.
func unaryMethod(name, fullMethod string, call func(*accounts, context.Context, *AccountRequest) (*AccountReply, error)) grpc.MethodDesc {
	return grpc.MethodDesc{
		MethodName: name,
		Handler: func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
			req := new(AccountRequest)
			if err := dec(req); err != nil {
				return nil, err
			}
			h := func(ctx context.Context, req any) (any, error) {
				return call(srv.(*accounts), ctx, req.(*AccountRequest))
			}
			if ic == nil {
				return h(ctx, req)
			}
			return ic(ctx, req, &grpc.UnaryServerInfo{Server: srv, FullMethod: fullMethod}, h)
		},
	}
}

var accountsDesc = grpc.ServiceDesc{
	ServiceName: "demo.Accounts",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{
		unaryMethod("Transfer", methodTransfer, (*accounts).Transfer),
		unaryMethod("Deposit", methodDeposit, (*accounts).Deposit),
	},
}

// replica is one running server and a client connected to it.
type replica struct {
	conn *grpc.ClientConn
	stop func()
}

// startReplica starts a server on a loopback port with its own pool and
// Locker, and the two lock interceptors: Transfer fails fast, Deposit waits
// and runs in the lock's transaction.
func startReplica(ctx context.Context, svc *accounts, dbURL string) (*replica, error) {
	cfg, err := pgxpool.ParseConfig(dbURL)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = 8
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		pool.Close()
		return nil, err
	}
	lockTransfer, err := grpclock.UnaryServerInterceptor(locker,
		grpclock.WithMethods(methodTransfer)) // busy: codes.Aborted at once
	if err != nil {
		locker.Close()
		pool.Close()
		return nil, err
	}
	lockDeposit, err := grpclock.UnaryServerInterceptor(locker,
		grpclock.WithMethods(methodDeposit),
		grpclock.WithWait(3*time.Second),
		grpclock.WithScope(pglock.Transaction))
	if err != nil {
		locker.Close()
		pool.Close()
		return nil, err
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(lockTransfer, lockDeposit))
	srv.RegisterService(&accountsDesc, svc)

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		locker.Close()
		pool.Close()
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(lis)
	}()
	conn, err := grpc.NewClient(lis.Addr().String(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.CallContentSubtype("json")))
	stop := func() {
		if conn != nil {
			conn.Close()
		}
		srv.GracefulStop()
		<-done
		locker.Close()
		pool.Close()
	}
	if err != nil {
		stop()
		return nil, err
	}
	return &replica{conn: conn, stop: stop}, nil
}

func (r *replica) call(ctx context.Context, method string, req *AccountRequest) (*AccountReply, error) {
	reply := new(AccountReply)
	err := r.conn.Invoke(ctx, method, req, reply)
	return reply, err
}

func run(ctx context.Context, out io.Writer, dbURL string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()

	// The account of this run (advisory locks and the table are shared by
	// every run on the database).
	account := fmt.Sprintf("acct-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6)
	admin, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		return err
	}
	defer admin.Close()
	if _, err := admin.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+table+" (id text PRIMARY KEY, balance int NOT NULL)"); err != nil {
		return err
	}
	if _, err := admin.Exec(ctx, "INSERT INTO "+table+" (id, balance) VALUES ($1, 0)", account); err != nil {
		return err
	}
	defer admin.Exec(context.WithoutCancel(ctx), "DELETE FROM "+table+" WHERE id = $1", account)

	var running, most atomic.Int32
	started := make(chan string, 1)
	done := make(chan struct{})
	var replicas []*replica
	defer func() {
		for _, r := range replicas {
			r.stop()
		}
	}()
	for _, name := range []string{"replica-1", "replica-2"} {
		r, err := startReplica(ctx, &accounts{name: name, out: out, started: started, done: done, running: &running, most: &most}, dbURL)
		if err != nil {
			return err
		}
		replicas = append(replicas, r)
	}

	// 1. Fail fast: a transfer on replica-1 holds the account; a transfer
	// on the same account sent to replica-2 meanwhile is rejected.
	fmt.Fprintln(out, "two transfers on one account at once, one per replica:")
	first := make(chan string, 1)
	go func() {
		first <- transferLine(ctx, replicas[0], 1, account)
	}()
	select {
	case <-started:
	case <-ctx.Done():
		return ctx.Err()
	}
	second := transferLine(ctx, replicas[1], 2, account)
	close(done)
	fmt.Fprintln(out, <-first)
	fmt.Fprintln(out, second)

	// 2. Serialized: six deposits on one account at once over both
	// replicas, each a read-modify-write in the lock's transaction.
	fmt.Fprintln(out, "six deposits of 10 on one account at once, over both replicas:")
	const deposits = 6
	errs := make([]error, deposits)
	var wg sync.WaitGroup
	for i := range deposits {
		r := replicas[i%2]
		wg.Go(func() {
			_, errs[i] = r.call(ctx, methodDeposit, &AccountRequest{Account: account, Amount: 10})
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	var balance int
	if err := admin.QueryRow(ctx, "SELECT balance FROM "+table+" WHERE id = $1", account).Scan(&balance); err != nil {
		return err
	}
	fmt.Fprintf(out, "balance %d (want %d); most deposits running at once: %d\n", balance, deposits*10, most.Load())
	if balance != deposits*10 || most.Load() != 1 {
		return errors.New("deposits overlapped")
	}
	return nil
}

// transferLine makes transfer number n on r and describes its outcome.
func transferLine(ctx context.Context, r *replica, n int, account string) string {
	reply, err := r.call(ctx, methodTransfer, &AccountRequest{Account: account, Amount: 10})
	if err != nil {
		return fmt.Sprintf("  transfer %d: %v (%s)", n, status.Code(err), status.Convert(err).Message())
	}
	return fmt.Sprintf("  transfer %d: OK on %s", n, reply.Replica)
}
