// Package grpclock provides gRPC server interceptors that run one call per
// key at a time across replicas, with PostgreSQL advisory locks taken
// through a [pglock.Locker]. Two calls that name the same entity (an
// account, an order) never run at the same time on any server that locks
// through the same database; calls that name different entities run in
// parallel. By default a call whose key is busy fails at once with
// codes.Aborted; [WithWait] makes it wait its turn.
//
// It follows the shape of go-grpc-middleware v2's interceptors, without
// depending on it:
//
//	locker, err := pglock.NewLocker(pool)
//	defer locker.Close()
//	lockUnary, err := grpclock.UnaryServerInterceptor(locker)
//	lockStream, err := grpclock.StreamServerInterceptor(locker)
//	srv := grpc.NewServer(
//		grpc.ChainUnaryInterceptor(recovery, lockUnary),
//		grpc.ChainStreamInterceptor(recovery, lockStream),
//	)
//
// The constructors return an error, not a panic and not an interceptor, for
// a nil Locker ([ErrNilLocker]) or an invalid option ([ErrInvalidOption]).
// Check it once at startup. Put the interceptors after authentication and
// recovery, so that a rejected call takes no lock and a panic is turned
// into a status after the lock has been cleaned up.
//
// # Keys
//
// By default a call's key is its request message's LockKey method (see
// [Keyer]); add it to a generated message in a separate file of the same
// package. [WithKeyFunc] replaces this with any function of the context,
// method and request. A call without a key (a message that is not a Keyer,
// an empty LockKey, a key function that returns ok false) runs as if the
// interceptor were not there. A key function that fails is the client's
// error: codes.InvalidArgument, never a silent pass.
//
// Keys come from what the client sends, so a client that may name any key
// may hold any key for as long as its call runs: authorize the call (in an
// interceptor before this one) before it takes a lock.
//
// Keys are prefixed with [DefaultNamespace], "grpc:", before they reach the
// Locker (see [WithNamespace]), so the lock of key "account:42" is the
// Locker's key for "grpc:account:42": what pglock.Locker.Key returns for that
// string, to look it up in pg_locks.
//
// # Busy keys and waiting
//
// A call whose key is held by another call fails at once with
// codes.Aborted: a concurrency conflict that the client may retry. Set
// another code with [WithBusyCode] (codes.ResourceExhausted,
// codes.Unavailable...). With [WithWait] the call waits for the lock up to
// a limit instead, and gets the busy code when the limit passes; the
// call's deadline bounds the wait too. The status codes a call can get from
// the interceptor are:
//
//	InvalidArgument    the key function failed
//	Aborted            the key is busy (at once, or after the WithWait limit)
//	DeadlineExceeded   the call's deadline passed while it waited for the lock
//	Canceled           the client cancelled while the call waited for the lock
//	Unavailable        the database failed while taking the lock, or the
//	                   commit of a Transaction-scope call failed
//	Internal           the lock could not be made for a reason that is the
//	                   server's, not the database's or the client's (the
//	                   Locker rejected the namespaced key or the options):
//	                   a bug or a misconfiguration, which retrying will not
//	                   cure; it is logged at Warn
//
// Any other status is the handler's own.
//
// # Retrying Aborted calls
//
// Nothing is needed on the client beyond gRPC's own retry policy, set in
// the service config. A call rejected as busy never ran its handler, so
// retrying it is safe:
//
//	conn, err := grpc.NewClient(target, grpc.WithDefaultServiceConfig(`{
//	  "methodConfig": [{
//	    "name": [{"service": "bank.v1.Accounts"}],
//	    "retryPolicy": {
//	      "maxAttempts": 5,
//	      "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
//	      "retryableStatusCodes": ["ABORTED"]
//	    }
//	  }]}`))
//
// # Scopes
//
// The scope is the Locker's, or [WithScope]'s.
//
// In pglock.Session scope the lock is held around the handler, on one of the
// Locker's lock connections: it costs no connection of the pool, which the
// handler uses as it likes; its work is not tied to the lock.
//
// In pglock.Transaction scope the lock is taken inside a transaction that
// the handler finds with pglock.TxFromContext (pglock.SQLTxFromContext on
// database/sql). The transaction commits when the handler returns a nil
// error and rolls back when it returns an error or panics (the panic goes
// on up, to a recovery interceptor); the lock ends with it. This holds
// whatever the Locker's WithRollbackOnError says; the handler must not
// commit or roll back the transaction itself. If the commit fails, the
// client gets codes.Unavailable instead of the handler's response. Use this
// scope for work that must be fenced by the lock, and behind a PgBouncer in
// transaction pooling mode, which breaks session locks.
//
// With a Locker made [pglock.WithToken], the call's context (a stream's
// Context) carries the lock's fencing token in either scope:
// [pglock.TokenFromContext] returns it, to pass to outside systems with the
// call's writes or to [pglock.CheckFence] in the work's transaction.
//
// # Streams
//
// The stream interceptor holds the lock while the handler runs. By default
// the key comes from the first message the handler receives, by the same
// key function as for unary calls: the lock is taken inside the handler's
// first RecvMsg, after the message arrives and before it is handed over,
// and it is held until the handler returns. For a server-streaming method
// (one request, then responses) that is the whole method. When the key
// function fails or the key is busy, that RecvMsg (and every later RecvMsg
// and SendMsg) returns the status error, and that status is the call's
// whatever the handler returns: a handler that wraps the error in another
// code, or ignores it and returns nil, cannot turn a busy key's Aborted into
// Internal or OK, so the client's retry policy still applies. Messages a handler sends before its first receive are not
// covered, and a handler that never receives takes no lock. The stream's
// Context carries the lock's transaction (and fencing token) once the lock
// is held, even if the handler took the context earlier.
//
// In Transaction scope a stream commits when its handler returns nil; the
// messages it sent are already on their way, so a failed commit reaches the
// client as the stream's final status (codes.Unavailable), after them.
//
// With [WithStreamKeyFunc] the key comes from the stream's context instead,
// typically a metadata header (see [MetadataKey]), and the lock is taken
// before the handler starts, as for a unary call.
//
// # Cancellation and lost connections
//
// A call that waits for a lock stops waiting when the client cancels or
// the deadline passes: the lock is then certainly not held and the pool
// connection is back in the pool (pglock.Lock.Acquire's guarantee). The
// handler never ran.
//
// A session lock lives as long as its connection. When the Locker notices
// that a held lock's connection died (see pglock.WithLostCheckInterval),
// the handler's context is cancelled with cause pglock.ErrLockLost
// (context.Cause tells it apart from the client cancelling). In Session
// scope a handler that returned a response stands, and the lost lock is
// only logged; in Transaction scope the work cannot commit without the
// lock.
//
// # Method filtering
//
// [WithMethods] is a plain allow-list of methods or services. For anything
// richer, compose: any interceptor that decides per call can wrap this one.
// With go-grpc-middleware v2's selector package:
//
//	lockUnary, err := grpclock.UnaryServerInterceptor(locker)
//	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(
//		selector.UnaryServerInterceptor(lockUnary, selector.MatchFunc(
//			func(ctx context.Context, c interceptors.CallMeta) bool {
//				return c.Service == "bank.v1.Accounts" && !strings.HasPrefix(c.Method, "Get")
//			})),
//	))
//
// # What this package does not do
//
//   - It has no client interceptor: retries belong to gRPC's retry policy.
//   - It is not re-entrant: a handler that calls, over the network, a method
//     that locks the same key finds it busy (or waits for itself until its
//     wait limit or deadline).
//   - It runs no SQL of its own and opens no connections: everything goes
//     through the Locker, whose logger logs each lock.
//   - It does not order waiting calls: PostgreSQL grants a freed lock to a
//     waiter, not necessarily the first one.
package grpclock
