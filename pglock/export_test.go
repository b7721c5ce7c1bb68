package pglock

import "strings"

// TokenSQLOnYugabyte is the token statement (see nextTokenSQL) as the
// server takes it on YugabyteDB: with the engine's test answered yes, so
// that PostgreSQL runs YugabyteDB's branch. Its parameters are the key's
// space and value.
var TokenSQLOnYugabyte = func() string {
	const engine = "pg_catalog.current_setting('server_version')"
	if !strings.Contains(tokenSQL, engine) {
		panic("pglock: the token statement no longer asks the engine")
	}
	return strings.Replace(tokenSQL, engine, "'15.2-YB-2025.1.0.0-b0'", 1)
}()

// DeadlockChecks is the number of checks for cycles of waits made so far
// in the process (see deadlock.go).
func DeadlockChecks() int64 { return cycles.checks.Load() }

// LockStatements is the number of statements of lock requests that lk's
// lock connections have sent (0 for a Locker without them).
func LockStatements(lk *Locker) int64 {
	if lk.mux == nil {
		return 0
	}
	return lk.mux.lc.Statements()
}
