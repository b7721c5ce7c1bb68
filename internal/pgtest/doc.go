// Package pgtest finds or starts the PostgreSQL server that pglockkit's tests,
// examples and demo run against. It is internal support, not an API.
//
// The order is: DATABASE_URL when set; else a server answering at
// 127.0.0.1:5432 with trust authentication; else a throwaway cluster started
// from the machine's PostgreSQL binaries (initdb and pg_ctl on PATH or under
// /usr/lib/postgresql/*/bin) in a temporary directory on a free loopback
// port, stopped and removed afterwards. As root, the cluster runs as the
// "postgres" user (or "nobody"), since PostgreSQL refuses to run as root.
//
// Tests call [Main] from TestMain. The withpg command wraps a whole run
// (make test, make demo): it finds or starts the server once and exports
// DATABASE_URL to the command it runs.
package pgtest
