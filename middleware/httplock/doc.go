// Package httplock is net/http middleware that runs a request's handler
// while holding a PostgreSQL advisory lock named by the request: one request
// at a time per order, account, idempotency key or tenant, across every
// replica of a service that shares the database.
//
// It uses only the standard library and [pglock]: every lock decision is the
// [pglock.Locker]'s, and this package holds no SQL.
//
// # The model
//
// [Middleware] (or [Handler], for one handler) takes a Locker and a
// [KeyFunc]. For each request the KeyFunc names a key; the key, prefixed
// with the namespace ([DefaultNamespace], "http:", see [WithNamespace]), is
// locked through the Locker, the handler runs while the lock is held, and the
// lock is released when the handler returns. Ready-made key functions read a
// ServeMux path wildcard ([PathValue]), a header ([Header], for
// Idempotency-Key), a query parameter ([Query]), or the method and path
// ([MethodPath]).
//
//	orders, err := httplock.Middleware(locker, httplock.PathValue("id"),
//		httplock.WithNamespace("orders:"), httplock.WithWait(5*time.Second))
//	if err != nil { ... }
//	mux.Handle("POST /orders/{id}/pay", orders(pay))
//
// r.PathValue is set only for the handler a pattern matched, so wrap each
// route's handler, not the whole mux; [PathValue] answers 400 rather than
// pass a request through when its value is empty. Routers such as chi take
// the middleware as it is (r.With(orders).Post(...)) with a KeyFunc that
// reads their parameter.
//
// A KeyFunc that reports no key (ok false) passes the request through
// without a lock. A KeyFunc error is answered 400 Bad Request
// ([WithKeyErrorHandler]), never passed through.
//
// # Busy keys
//
// By default a request whose key is held elsewhere is answered at once with
// 409 Conflict and a Retry-After header ([WithOnBusy] replaces the answer).
// Retry-After is [DefaultRetryAfter] (one second) unless [WithRetryAfter]
// sets it, rounded up to whole seconds; WithRetryAfter(0) sends none, and
// with WithOnBusy the middleware sets none. Busy answers are logged with an
// error matching [ErrBusy]. With [WithWait] a request waits for the key up
// to a limit instead, then gets the same busy answer. A wait follows the
// request's context: when the client goes away, or a server timeout (an
// outer context.WithTimeout, http.TimeoutHandler) ends the request, the
// wait stops at once, the request is answered 503 Service Unavailable (a
// client still connected sees it; one that left does not read it) and
// logged as [ErrRequestEnded], and no lock, waiting session or pool
// connection is left behind.
//
// In Session scope a held or waited-for lock costs no pool connection: the
// Locker holds its session locks on a few lock connections of its own (see
// pglock's "Lock connections"), so handlers can use the same pool freely. In
// Transaction scope the lock's transaction is a connection from the pool for
// the whole request; when the pool is exhausted, taking it waits as pgxpool
// does, bounded by the wait limit (and answered busy when it passes) or,
// failing fast, by the request's context only. Size the pool above the
// number of requests you expect to hold or wait for locks at once in that
// scope.
//
// A database error (the pool is closed, the server is down, a connection
// broke while taking the lock) is answered 503 Service Unavailable
// ([WithErrorHandler]): a request never runs unlocked because the lock
// failed.
//
// # More than one at a time
//
// [WithLimit](n) lets up to n requests for one key run at once across every
// replica, rather than one: at most three exports per tenant, say. The key
// then names a [pglock.Semaphore] of n slots, and each request holds a slot
// while its handler runs. A request that finds the n slots taken is busy:
// answered at once, or with [WithWait] queued for a slot (first come, first
// served across replicas, in PostgreSQL's queue) up to the wait limit, as a
// request for a held lock is.
//
//	exports, err := httplock.Middleware(locker, httplock.PathValue("tenant"),
//		httplock.WithNamespace("exports:"), httplock.WithLimit(3))
//	if err != nil { ... }
//	mux.Handle("POST /tenants/{tenant}/exports", exports(export))
//
// Semaphores are Session scope with exclusive slots: Middleware refuses a
// limit above 1 with Transaction scope, with a mode func or Shared mode (see
// [WithLimit]). WithLimit(1) is the default, a plain lock.
//
// # Scopes
//
// The scope is the Locker's unless [WithScope] says otherwise.
//
// In Session scope ([pglock.Session]) the lock is held around the handler on
// one of the Locker's lock connections (on a pool connection of its own with
// [pglock.WithMultiplexing](false), or on the connection the Locker was made
// with). If that connection dies while the handler runs, the request's
// context is cancelled with cause [pglock.ErrLockLost]
// (see [pglock.Lock.Lost]); the response is the handler's, and the failed
// release is logged. Work that must never run twice even then belongs in
// Transaction scope.
//
// In Transaction scope ([pglock.Transaction]) the middleware begins a
// transaction, takes the lock in it, and gives the transaction to the handler
// in the request's context: [pglock.TxFromContext] (pgx) or
// [pglock.SQLTxFromContext] (database/sql). When the handler returns without
// panicking and the commit rule agrees (the default: status below 500, see
// [WithCommitRule]) the transaction commits, otherwise it rolls back; either
// way the lock ends with it. A panic rolls back, releases and is raised again
// with the same value, after the held response (and the headers the handler
// set) is dropped, so that a recovering middleware outside answers the panic
// rather than the handler's response. The handler's writes and the lock commit together, so
// work is fenced even if the connection dies.
//
// In Transaction scope the response is held back until the transaction has
// ended, so that a client never sees a success for writes that did not
// commit: if the commit fails, the held response (status, body, and the
// headers the handler set; those set before it, by outer middleware, stay) is
// dropped and the error answered (503). A handler that flushes
// (http.Flusher, [net/http.ResponseController]) or hijacks the connection
// sends what is held at that moment and streams from then on; a commit that
// fails after that can only be logged. The writer keeps http.Flusher,
// http.Hijacker and http.ResponseController working (it implements Unwrap).
// In Session scope the handler gets the ResponseWriter unwrapped.
//
// With a Locker made [pglock.WithToken], the request's context carries the
// lock's fencing token in either scope: [pglock.TokenFromContext] returns it,
// to pass to outside systems with the request's writes or to
// [pglock.CheckFence] in the work's transaction.
//
// # Modes
//
// Requests take the key in the Locker's mode unless [WithMode] or
// [WithModeFunc] say otherwise. [SharedForSafeMethods] lets GET, HEAD and
// OPTIONS requests for one key run together while every other method runs
// alone. A mode func that returns another value is a programming error:
// logged as [ErrInvalidOption] and answered 500; the handler does not run.
//
// # What it deliberately does not do
//
// It does not rate-limit ([WithLimit] bounds how many requests of a key run
// at once, not how many arrive per second), does not choose keys from client
// addresses (X-Forwarded-For can be forged), does not retry busy requests
// itself, and does not queue requests in memory: waiting is PostgreSQL's
// queue, so it is shared by every replica.
// A waiting request holds a pool connection only in Transaction scope; size
// the pool (and the wait limit) for the waiters you accept there. Session locks need a
// session: behind PgBouncer in transaction pooling mode use Transaction
// scope.
package httplock
