// Package echo5lock is Echo v5 middleware that runs a request's handler
// while holding a PostgreSQL advisory lock named by the request: one request
// at a time per order, account, idempotency key or tenant, across every
// replica of a service that shares the database.
//
// It is package echolock (Echo v4) for Echo v5, with the same behaviour,
// options and sentinels, in v5's idiom: handlers and extractors take
// *echo.Context, errors are *echo.HTTPError values that wrap the cause
// (HTTPError.Wrap), and [Config] is an echo.MiddlewareConfigurator whose
// [Config.ToMiddleware] returns an error instead of panicking. It uses the
// same key namespace ([DefaultNamespace], "http:") as echolock and httplock,
// so Echo v5, Echo v4 and net/http services that name a key contend on the
// same lock (during a migration from v4 to v5, for example). The package
// names differ, so a program can import both.
//
//	orders, err := echo5lock.Config{
//		Locker:       locker,
//		KeyExtractor: echo5lock.Param("id"),
//		Namespace:    "orders:",
//		Wait:         5 * time.Second,
//	}.ToMiddleware()
//	if err != nil { ... }
//	e.POST("/orders/:id/pay", pay, orders)
//
// Every lock decision is the [pglock.Locker]'s; this package holds no SQL.
// The middleware returns its answers as errors for Echo's HTTPErrorHandler
// to write; it writes nothing itself.
//
// # Construction
//
// [New], [WithConfig] and [Config.ToMiddleware] return an error for a bad
// configuration ([ErrNilLocker], [ErrNilKeyExtractor], [ErrInvalidConfig]:
// a negative Wait, a Scope or Mode out of range, a Locker on one connection
// rather than a pool), never a panic, so a service fails at start-up with a
// message, not with a stack trace. Echo's own XxxWithConfig functions panic
// here; WithConfig keeps echolock's signature instead.
//
// # Keys
//
// The KeyExtractor names each request's key; [Param], [Header],
// [QueryParam] and [MethodPath] are ready-made. ok false passes the request
// through unlocked and untouched. An extractor error goes to the
// ErrorHandler as [ErrKey] (400 Bad Request by default), never passed
// through. Never key by c.RealIP(): it trusts X-Forwarded-For, which a
// client can forge.
//
// # Busy keys, cancellation, database errors
//
// With Wait zero (the default) a request whose key is held elsewhere goes to
// the DenyHandler at once (err matches [ErrBusy]): 409 Conflict by default.
// With Wait > 0 it waits up to Wait first, in PostgreSQL's queue. Every busy
// answer gets a Retry-After header, set before the DenyHandler runs:
// Config.RetryAfter rounded up to whole seconds; zero means
// [DefaultRetryAfter] (one second), negative means no header. A wait follows
// the request's context: when the client goes away the wait stops at once
// and leaves no lock, waiting session or pool connection behind (the
// middleware returns a 503 *echo.HTTPError matching [ErrRequestEnded] that
// nobody reads). Taking the lock first takes a connection from the Locker's
// pool: when the pool is exhausted that waits too, bounded by Wait (or, with
// Wait zero, by the request's context only). A lock that cannot be taken for
// any other reason goes to the ErrorHandler as [ErrDatabase]: 503 Service
// Unavailable by default. The DenyHandler and the ErrorHandler may return
// an error (the default) or write an answer themselves.
//
// # Scopes
//
// The scope is the Locker's ([pglock.Locker.Scope]) unless Config.Scope
// says otherwise (Scope: new(pglock.Transaction)). In [pglock.Session] scope
// the lock is held around the handler on one of the Locker's lock
// connections (a held lock costs no pool connection); if that connection
// dies the request's context is cancelled with cause [pglock.ErrLockLost].
//
// In [pglock.Transaction] scope the middleware begins a transaction, takes
// the lock in it, and puts it in the request's context:
// pglock.TxFromContext(c.Request().Context()) (or pglock.SQLTxFromContext on
// database/sql). It commits when Config.Commit agrees (the default,
// [DefaultCommit]: the handler returned no error and the status is below
// 500) and rolls back otherwise: on a returned error, a 5xx, or a panic,
// which is raised again after the rollback (put Echo's Recover middleware
// outside this one). The response is held back until the transaction has
// ended, so that a client never sees a success for writes that did not
// commit: the handler writes to an *echo.Response of its own (c.Response()
// and echo.UnwrapResponse work as usual) over the request's, which sees
// only what is finally sent. If the commit fails, the held response
// (status, body, and the headers the handler set; those set by outer
// middleware stay) is dropped and the ErrorHandler answers (503). If the
// handler returns an error, or panics, after writing a response, the
// transaction rolls back and the held response is dropped the same way:
// Echo's HTTPErrorHandler writes the error (or Recover's) instead. A
// response the handler wrote without returning an error is sent as written
// even when Commit rolls back (by default only a 5xx does). Flush and Hijack
// (c.Response().(http.Flusher), http.ResponseController) send what is held
// and stream from then on.
//
// With a Locker made [pglock.WithToken], the request's context carries the
// lock's fencing token in either scope:
// pglock.TokenFromContext(c.Request().Context()) returns it, to pass to
// outside systems with the request's writes or to [pglock.CheckFence] in the
// work's transaction.
//
// # Modes
//
// The mode is the Locker's ([pglock.Locker.Mode]) unless Config.Mode
// (Mode: new(pglock.Shared)) or Config.ModeFunc say otherwise;
// [SharedForSafeMethods] lets GET, HEAD and OPTIONS requests share a key
// while other methods run alone. A ModeFunc that returns another value is a
// programming error: logged, and answered 500 with an error matching
// [ErrInvalidConfig]; the handler does not run.
//
// # What it deliberately does not do
//
// It does not retry busy requests and does not queue them in memory
// (waiting is PostgreSQL's queue, shared by every replica). In Transaction
// scope a waiting request holds a pool connection; size the pool for the
// waiters you accept. Session locks need a session: behind PgBouncer in
// transaction pooling mode use Transaction scope.
package echo5lock
