// Package riverlock serializes and dedupes River background jobs by key,
// across every node, with PostgreSQL advisory locks taken through a
// [pglock.Locker].
//
// River's unique jobs work at insert time: they stop a second job from being
// inserted. riverlock works at run time: two jobs with the same key (the same
// customer, say) never run at once, whichever clients fetched them, and a
// duplicate of a job that is running can be cancelled.
//
// # The middleware
//
// [Middleware] is a rivertype.WorkerMiddleware. Register it in
// river.Config.Middleware:
//
//	mw, err := riverlock.NewMiddleware(locker, &riverlock.Config{
//		Kinds: map[string]riverlock.KindConfig{
//			ChargeArgs{}.Kind(): {Key: riverlock.ArgsKey[ChargeArgs]()},
//			EmailArgs{}.Kind():  {Key: riverlock.ArgsKey[EmailArgs](), Busy: riverlock.Cancel()},
//		},
//	})
//	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{
//		Middleware: []rivertype.Middleware{mw},
//		...
//	})
//
// For each job it finds the key: the kind's [KeyFunc] (in [Config.Kinds]),
// else [Config.Key]. [ArgsKey] is the KeyFunc for args types that implement
// LockKey() string ([JobArgsWithLockKey]); it has to be registered per kind
// because River decodes a job's args only after the middleware has run. A
// job without a key runs untouched. A KeyFunc that fails fails the job's
// attempt with its error (matching [ErrKey]): a job is never run without
// the lock it asked for.
//
// The key is prefixed with "river:" + kind + ":" (see [Config.Namespace] to
// share keys between kinds) and with the Locker's namespace. Then the
// middleware takes the key's exclusive session lock, runs the worker, and
// releases the lock when the worker returns or panics. When another job
// holds the lock, the busy [Policy] decides:
//
//   - [Snooze] (the default): the job is snoozed with River's snooze error, so
//     it runs later without counting an attempt. Jobs of one key run one
//     after the other.
//   - [Cancel]: the job is a duplicate; it is cancelled with River's cancel
//     error, and River records the reason in its errors.
//   - [Wait]: the middleware waits for the lock, up to a limit of its own
//     (River's job timeout covers only Work, not the middleware around it),
//     then fails the attempt.
//
// # More than one job per key
//
// [Config.Limit] (or [KindConfig.Limit]) lets up to n jobs of one key run at
// once across every node, rather than one: at most 3 exports per tenant, say.
// The key then names a [pglock.Semaphore] of n slots, and each job holds a
// slot while it runs. A job that finds every slot taken is busy, and its
// Policy decides as for a held lock: Snooze snoozes it, Cancel cancels it
// (load shedding rather than dedupe), Wait queues it for a slot (first come,
// first served across nodes, in PostgreSQL's queue) up to the wait limit.
//
//	Kinds: map[string]riverlock.KindConfig{
//		ExportArgs{}.Kind(): {Key: riverlock.ArgsKey[ExportArgs](), Limit: 3},
//	},
//
// Every node must give a key the same limit. A limit above 1 needs a Locker
// in Session scope, and the worker's context then carries no fencing token.
//
// # Why worker middleware and not hooks
//
// River offers two ways to run code around a job: hooks (HookWorkBegin,
// HookWorkEnd), which run at a point in the job's life and return, and
// worker middleware, which wraps the work and stays on the call stack while
// it runs. A lock taken in WorkBegin would have to be released in WorkEnd,
// and River does not always call WorkEnd: it is skipped when the worker
// panics and when an earlier WorkBegin hook returns an error, which would
// leave the lock held until the process ends. Hooks
// also cannot hand a context to the work, so a lost lock could not cancel
// the job. Middleware releases the lock with a defer on every path and gives
// the worker a context that is cancelled when the lock is lost; so every lock
// is held in middleware, and riverlock defines no hooks. (River's snooze and
// cancel errors returned from middleware are honoured as if the worker had
// returned them.)
//
// # Scopes
//
// The middleware holds a session lock while the job runs, on one of the
// Locker's lock connections: it costs no connection of the pool. For work
// that must commit together with its lock, use [WorkTx] inside Work: it runs
// the work, the transaction-scoped lock and river.JobCompleteTx in one
// transaction, so they commit or roll back as one.
//
// With a Locker made [pglock.WithToken], the job's context carries the lock's
// fencing token: the worker's context under the middleware (not under a
// Limit above 1: a semaphore's slots take no token), and the context WorkTx
// gives fn. [pglock.TokenFromContext] returns it, to pass to outside
// systems with the job's writes or to [pglock.CheckFence] in the work's
// transaction.
//
// # Cancellation and lost connections
//
// The job's context (River's, with its job timeout) bounds the work as usual.
// A lock is lost when its connection dies or its backend is terminated;
// pglock notices at once for a closed connection, within twice the Locker's
// lost-check interval for a silent one. The worker's context is then
// cancelled with cause pglock.ErrLockLost, the job's error matches
// pglock.ErrLockLost, and River retries it. Until the worker returns, another
// job of the key may already run: that window is the price of session locks,
// and WorkTx is the answer where it matters, since its work cannot commit
// without its lock. A job that returns nil after its lock was lost is
// counted done (failing it would run it twice), and the loss is logged.
//
// River's Stop lets running jobs finish and StopAndCancel cancels their
// contexts; either way the lock is released when the worker returns, and a
// Wait in progress ends with the job's context. A worker that panics releases
// its lock too: the middleware's defer runs before River recovers the panic.
//
// # PgBouncer
//
// Session locks need a session: behind PgBouncer in transaction pooling mode
// they do not hold. Point the Locker at PostgreSQL (or a session-pooled
// PgBouncer); WorkTx's transaction-scoped locks work through either.
//
// # What it does not do
//
// Its limits count the jobs of a key that run, not those fetched: a busy job
// is fetched, then snoozed, cancelled or kept waiting, where River Pro's
// concurrency limits leave it unfetched. It does not dedupe at insert time
// (River's unique jobs do). It does not order jobs of one key: a snoozed job may run
// after a job inserted later. It does not fence work done under a session
// lock against a lost connection; WorkTx does.
package riverlock
