// Package echosuite is the acceptance suite that packages echolock (Echo
// v4) and echo5lock (Echo v5) both run, written once: serializing across
// replicas, busy answers with Retry-After, waiting, Transaction scope
// (commit, rollback, failed commit, held responses), lost locks, cancelled
// waits, keys and bad configuration, and the request benchmark. Each
// package's tests describe their Echo major in an [Adapter] and call [Run]
// (and [BenchmarkRequest]); what only one major has (Echo v5's own
// *echo.Response for the handler, its MiddlewareConfigurator, pointers
// read once) stays in that package's tests.
//
// It does not import Echo: a test's handler is a func(C) error over the
// adapter's context type, and makes its Echo calls through the Adapter.
// It is internal support, not an API; the PostgreSQL server comes from
// package pgtest, the replicas and counters from package locktest.
package echosuite
