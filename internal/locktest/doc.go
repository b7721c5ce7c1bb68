// Package locktest is the scaffolding that the adapters' tests share: a
// replica of a service (its own pool, Locker and HTTP server on the test
// database), concurrent requests spread over replicas, a counter of
// handlers running at once, the waiters of a key in pg_locks, a key held by
// another session, a table for transaction-scope tests, a goroutine-safe
// log buffer, and a slog recorder. It holds nothing that knows a web
// framework: the adapters' tests (echolock's and echo5lock's through package
// echosuite) build their handlers and use these. It is internal support, not an API; the
// PostgreSQL server itself comes from package pgtest.
package locktest
