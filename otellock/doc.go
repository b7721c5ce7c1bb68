// Package otellock records pglock's locks with OpenTelemetry: metrics of
// every acquire, hold and loss, a Locker's connections and lock-table use,
// and a span of each blocking acquire, Do and TryDo, nested under the span of
// the request, job or call that took the lock.
//
//	inst, err := otellock.New() // the global MeterProvider and TracerProvider
//	locker, err := pglock.NewLocker(pool, inst.Options()...)
//	stats, err := inst.RecordStats(locker) // the Locker's gauges
//	defer stats.Unregister()
//
// It is a module of its own (github.com/pglockkit/kit/otellock), so that
// pglock does not depend on OpenTelemetry: pglock offers hooks
// (pglock.WithObserver for events, pglock.WithTracer for spans), and this
// package implements them.
//
// # Configuration
//
// [New] takes [WithMeterProvider] and [WithTracerProvider] (the global
// providers by default, as OpenTelemetry's instrumentation libraries do) and
// [WithAttributes], attributes added to every measurement and span. To record
// only metrics or only spans, give pglock only [Instrumentation.Observer] or
// [Instrumentation.Tracer] (or a no-op provider). The options of
// [Instrumentation.Options] are pglock.WithObserver and pglock.WithTracer: a
// pglock option given after them replaces them, so an observer of your own
// calls Observer itself (see the example).
//
// # Metrics
//
// Names follow OpenTelemetry's semantic conventions under the pglock
// namespace; durations are in seconds.
//
//	instrument                            kind                  unit           attributes
//	pglock.lock.acquisitions              Counter               {acquisition}  pglock.scope, pglock.mode, pglock.outcome, error.type
//	pglock.lock.wait.duration             Histogram             s              pglock.scope, pglock.mode, pglock.outcome, error.type
//	pglock.lock.hold.duration             Histogram             s              pglock.scope, pglock.mode, error.type
//	pglock.lock.lost                      Counter               {lock}         pglock.scope, pglock.mode
//	pglock.lock.held                      UpDownCounter         {lock}         pglock.scope, pglock.mode
//	pglock.locker.connection.count        async UpDownCounter   {connection}   pglock.connection.type (lock, wait), pglock.connection.state (of wait: waiting, holding, idle, leader)
//	pglock.locker.queued                  async UpDownCounter   {waiter}
//	pglock.locker.server_lock.usage       async UpDownCounter   {lock}
//	pglock.locker.server_lock.limit       async UpDownCounter   {lock}
//	pglock.locker.server_lock.utilization async Gauge           1
//
// pglock.outcome says how an attempt to take a lock ended: acquired, busy
// (TryAcquire or TryDo found it held elsewhere), cancelled (the context
// ended, or the wait timeout passed, before the lock was granted) or error.
// error.type, set only on failures, is a value of low cardinality: lock_lost,
// tx_ended, locker_closed, too_many_locks, transaction_pooler, unavailable,
// already_held, in_do, timeout, cancelled, not_held, a database error's
// SQLSTATE, or _OTHER. The attributes of WithAttributes are on every
// measurement.
//
// A lock's key is never a metric attribute (a series per key would be
// unbounded); it is on spans only. pglock.lock.held rises at each acquire and
// falls at each release, failed or not: a lost lock counts until its Lock is
// released (Release, or Do returning), which is also when its hold duration
// is recorded, with error.type lock_lost (a lost Lock acquired again
// without a Release ends its hold then, with an event). The pglock.locker.*
// figures come from pglock.Locker.Stats at each collection, for the Lockers
// given to [Instrumentation.RecordStats]; the pglock.server.* figures, the
// server's advisory locks against its lock table's size (what `pglock locks`
// prints), from one query at each collection, with
// [Instrumentation.RecordLockTable].
//
// # Spans
//
// A blocking Acquire is a span "pglock.acquire"; Do is "pglock.do", with its
// wait for the lock as a child "pglock.acquire"; TryDo is "pglock.trydo".
// TryAcquire, which never waits, makes no span (its outcome is in the
// metrics). The function given to Do or TryDo runs in the context of the
// operation's span, so the work's spans are its children, and the operation's
// span is a child of the span in the caller's context. The adapters take
// their locks with the context of the request (httplock, echolock,
// echo5lock), the call (grpclock) or the job (riverlock), so with an HTTP,
// gRPC or River instrumentation in front of them the tree reads: the
// request's span, pglock.do (or pglock.trydo, failing fast), then
// pglock.acquire and the handler's spans under it.
//
// A span has pglock.scope, pglock.mode, pglock.key (the key's int64, as
// pg_locks shows it split into classid and objid; pglock.key_pair true for
// an Int32PairKey) and, at its end, pglock.outcome. A failed operation sets
// error.type, records the error and has status Error; a busy TryDo is not an
// error (pglock.outcome busy).
//
// # Key names
//
// Key names can carry customer or tenant identifiers, so none is recorded
// by default: spans have the key's int64. [WithKeyNames] adds the name
// (pglock.Lock.Name, namespace included) to spans, as pglock.key_name, for
// those who decide their names may be in traces; metrics never get it.
//
// # What it does not do
//
// It records no SQL (use a pgx tracer such as otelpgx for the statements),
// and it does not link metrics to traces through exemplars: pglock's events
// carry no context. A Leader's lock is recorded as any other lock of its
// Locker: a replica that campaigns has a pglock.acquire span as long as its
// wait.
package otellock
