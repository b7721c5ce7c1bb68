package pglock

import "strconv"

// statements is the SQL one lock runs, built once per Lock. Keys travel as
// bind parameters in the extended protocol (one prepared statement per
// function, whatever the key); the simple-protocol forms carry the key as an
// integer literal, which needs no quoting.
type statements struct {
	try    string // SELECT pg_try_advisory[_xact]_lock[_shared](...): bool
	lock   string // SELECT pg_advisory[_xact]_lock[_shared](...): void
	unlock string // SELECT pg_advisory_unlock[_shared](...): bool (session scope)
	// cleanup unlocks the key only if pg_locks shows this session holding it:
	// run after a wait that was interrupted, since the server may have granted
	// the lock as the cancel arrived. Unlike a bare unlock it raises no
	// WARNING when the lock is not held.
	cleanup string
	// lockLiteral is lock with the key as a literal, for the simple protocol.
	lockLiteral string
	args        []any
	cleanupArgs []any
}

func newStatements(k Key, scope Scope, mode Mode) *statements {
	xact, shared := "", ""
	if scope == Transaction {
		xact = "xact_"
	}
	pgMode := "ExclusiveLock"
	if mode == Shared {
		shared = "_shared"
		pgMode = "ShareLock"
	}
	params := "($1::bigint)"
	if k.pair {
		params = "($1::integer, $2::integer)"
	}
	args := k.args()
	n := len(args)
	classid, objid, objsubid := k.LockTag()
	p := func(i int) string { return "$" + strconv.Itoa(n+i) }
	return &statements{
		try:         "SELECT pg_try_advisory_" + xact + "lock" + shared + params,
		lock:        "SELECT pg_advisory_" + xact + "lock" + shared + params,
		unlock:      "SELECT pg_advisory_unlock" + shared + params,
		lockLiteral: "SELECT pg_advisory_" + xact + "lock" + shared + k.literal(),
		cleanup: "SELECT pg_advisory_unlock" + shared + params + " FROM pg_catalog.pg_locks" +
			" WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted" +
			" AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())" +
			" AND classid = " + p(1) + "::oid AND objid = " + p(2) + "::oid AND objsubid = " + p(3) + "::smallint" +
			" AND mode = '" + pgMode + "'",
		args:        args,
		cleanupArgs: append(append([]any{}, args...), int64(classid), int64(objid), objsubid),
	}
}
