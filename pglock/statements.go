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
	// cleanup (args: the key's, then its LockTag) unlocks the key only if pg_locks shows this session holding it:
	// run after a wait that was interrupted, since the server may have granted
	// the lock as the cancel arrived. Unlike a bare unlock it raises no
	// WARNING when the lock is not held.
	cleanup string
	args    []any
	argv    [2]any
}

// fixed holds the statements that do not depend on the key's value, per
// [scope][mode][pair], built once.
var fixed = func() (t [2][2][2]statements) {
	for scope := range 2 {
		for mode := range 2 {
			for pair := range 2 {
				t[scope][mode][pair] = buildFixed(Scope(scope), Mode(mode), pair == 1)
			}
		}
	}
	return t
}()

func fnNames(scope Scope, mode Mode) (xact, shared, pgMode string) {
	pgMode = "ExclusiveLock"
	if scope == Transaction {
		xact = "xact_"
	}
	if mode == Shared {
		shared, pgMode = "_shared", "ShareLock"
	}
	return xact, shared, pgMode
}

func buildFixed(scope Scope, mode Mode, pair bool) statements {
	xact, shared, pgMode := fnNames(scope, mode)
	params, n := "($1::bigint)", 1
	if pair {
		params, n = "($1::integer, $2::integer)", 2
	}
	p := func(i int) string { return "$" + strconv.Itoa(n+i) }
	return statements{
		try:    "SELECT pg_try_advisory_" + xact + "lock" + shared + params,
		lock:   "SELECT pg_advisory_" + xact + "lock" + shared + params,
		unlock: "SELECT pg_advisory_unlock" + shared + params,
		cleanup: "SELECT pg_advisory_unlock" + shared + params + " FROM pg_catalog.pg_locks" +
			" WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted" +
			" AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())" +
			" AND classid = " + p(1) + "::oid AND objid = " + p(2) + "::oid AND objsubid = " + p(3) + "::smallint" +
			" AND mode = '" + pgMode + "'",
	}
}

// set makes st the statements of key k in scope and mode. The arguments live
// in st itself (argv), so that a Lock's statements cost no allocation of
// their own but the key's boxing.
func (st *statements) set(k Key, scope Scope, mode Mode) {
	pair := 0
	if k.pair {
		pair = 1
	}
	*st = fixed[scope][mode][pair]
	if k.pair {
		a, b := k.halves()
		st.argv[0], st.argv[1] = a, b
		st.args = st.argv[:2]
		return
	}
	st.argv[0] = k.v
	st.args = st.argv[:1]
}

// lockLiteral is the blocking lock statement with the key as a literal, for
// the simple protocol (where it can share a round trip with BEGIN).
func (l *Lock) lockLiteral() string {
	xact, shared, _ := fnNames(l.cfg.scope, l.cfg.mode)
	return "SELECT pg_advisory_" + xact + "lock" + shared + l.key.literal()
}

// cleanupArgs returns the arguments of the cleanup statement.
func (l *Lock) cleanupArgs() []any {
	classid, objid, objsubid := l.key.LockTag()
	return append(l.key.args(), int64(classid), int64(objid), objsubid)
}
