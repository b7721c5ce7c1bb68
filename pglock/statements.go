package pglock

import (
	"strconv"
	"strings"
	"time"
)

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
	// bound is the server-side bound (in ms) the statements set for a hold
	// on a pool's connection, "" for the plain ones; txSet is the
	// expression that sets it in the lock's own transaction (see
	// buildBounded).
	bound string
	txSet string
	// begin is ownTxBegin's statement, made at its first use ("" until
	// then, and again when bindPool changes the statements), for the
	// session's bound beginFor (see ownTxBegin).
	begin    string
	beginFor txBoundKnown
}

// txBoundKnown is what is known of a session's own
// idle_in_transaction_session_timeout, when the lock's own transaction
// opens (see ownTxBegin).
type txBoundKnown uint8

const (
	txBoundUnknown txBoundKnown = iota // not read: the lock statement asks
	txBoundNone                        // 0: the transaction sets the bound
	txBoundOwn                         // not 0 when read: the lock statement asks again
)

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

// pairIndex is the index of k's form in fixed: 1 for a pair key, 0 for a
// bigint key.
func pairIndex(k Key) int {
	if k.pair {
		return 1
	}
	return 0
}

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

// Server-side bounds of a hold on a pool's connection (issue 20, item 5). A
// process that freezes (SIGSTOP, a paused VM) keeps its sessions open: its
// kernel still answers TCP keepalives, so only the server's idle timeouts end
// them. The statements that take a lock on a connection of the lock's own
// (NewLock or a Locker without multiplexing on a pool) also set the bound, in
// the same round trip, and the ones that end the hold restore it:
//
//   - Session scope: idle_session_timeout (PostgreSQL 14 and later) is the
//     bound while the lock is held. The value it had is kept in the session
//     setting pglock.idle_session_timeout, and the unlock puts it back (and
//     empties the kept value), so that the connection goes back to the pool
//     as it came (but for that empty pglock setting). A live holder is
//     never cut: its watch pings every check interval.
//   - Transaction scope (the lock's own transaction): SET LOCAL
//     idle_in_transaction_session_timeout, which the transaction's end
//     undoes; a value the server, role, database or pool already sets (not 0)
//     is kept.

// AbandonedTransactionTimeout bounds how long the server keeps a lock held in
// Transaction scope on a pool (the lock's own transaction) when its holder
// froze or vanished: the lock sets idle_in_transaction_session_timeout to it
// (or to four lost-check intervals, if longer) for the transaction, unless
// the session already has a bound of its own (a nonzero
// idle_in_transaction_session_timeout from the server, role, database or the
// pool's settings), which is kept. It also ends a transaction whose own work
// stays idle in it for that long between two statements: work that needs
// more can say so in its transaction (SET LOCAL
// idle_in_transaction_session_timeout = '10min', or 0 for none).
const AbandonedTransactionTimeout = time.Minute

// sessionBound and txBound are the server-side bounds of a hold, in
// milliseconds, for the lost-check interval d.
func sessionBound(d time.Duration) string {
	if b := max(AbandonedSessionTimeout, 4*d); b != AbandonedSessionTimeout {
		return strconv.FormatInt(b.Milliseconds(), 10)
	}
	return defaultSessionBound
}

func txBound(d time.Duration) string {
	if b := max(AbandonedTransactionTimeout, 4*d); b != AbandonedTransactionTimeout {
		return strconv.FormatInt(b.Milliseconds(), 10)
	}
	return defaultTxBound
}

var (
	defaultSessionBound = strconv.FormatInt(AbandonedSessionTimeout.Milliseconds(), 10)
	defaultTxBound      = strconv.FormatInt(AbandonedTransactionTimeout.Milliseconds(), 10)
)

// boundedFixed holds the bounded statements for the default bounds, per
// [scope][mode][pair], built once; other bounds are built per Lock.
var boundedFixed = func() (t [2][2][2]statements) {
	for scope := range 2 {
		for mode := range 2 {
			for pair := range 2 {
				ms := defaultSessionBound
				if Scope(scope) == Transaction {
					ms = defaultTxBound
				}
				t[scope][mode][pair] = buildBounded(Scope(scope), Mode(mode), pair == 1, ms)
			}
		}
	}
	return t
}()

const (
	// stashIdle keeps the session's idle_session_timeout for the unlock.
	stashIdle = "set_config('pglock.idle_session_timeout', current_setting('idle_session_timeout'), false) IS NOT NULL"
	// restoreIdle puts it back (evaluated before the unlock, which may say
	// false: an AND stops at the first false), and empties the kept value,
	// so that a later hold cannot find a stale one. Without a value kept
	// (an interrupted wait, where the grant and the setting may not have
	// happened; a session a pooler reset) it changes nothing.
	restoreIdle = "set_config('idle_session_timeout', coalesce(nullif(current_setting('pglock.idle_session_timeout', true), ''), current_setting('idle_session_timeout')), false) IS NOT NULL" +
		" AND set_config('pglock.idle_session_timeout', '', false) IS NOT NULL"
)

// setIdle sets idle_session_timeout to ms for the hold.
func setIdle(ms string) string {
	return "set_config('idle_session_timeout', '" + ms + "', false) IS NOT NULL"
}

// setIdleInTx sets idle_in_transaction_session_timeout to ms for the
// transaction, unless the session has a bound already.
func setIdleInTx(ms string) string {
	return "(current_setting('idle_in_transaction_session_timeout') <> '0' OR" +
		" set_config('idle_in_transaction_session_timeout', '" + ms + "', true) IS NOT NULL)"
}

// buildBounded returns the statements of a hold on a pool's connection with
// the server-side bound ms (see above). Each returns one value, as the plain
// ones do.
func buildBounded(scope Scope, mode Mode, pair bool, ms string) statements {
	st := buildFixed(scope, mode, pair)
	xact, shared, _ := fnNames(scope, mode)
	params := "($1::bigint)"
	if pair {
		params = "($1::integer, $2::integer)"
	}
	st.bound = ms
	if scope == Transaction {
		// The setting first: a wait that follows a failed try (database/sql)
		// keeps it, and the transaction's end undoes it whatever happens.
		st.txSet = setIdleInTx(ms)
		st.try = "SELECT " + st.txSet + " AND pg_try_advisory_" + xact + "lock" + shared + params
		return st
	}
	// The setting only once the lock is granted: a busy try changes nothing.
	st.try = "SELECT pg_try_advisory_lock" + shared + params + " AND " + stashIdle + " AND " + setIdle(ms)
	// The lock first in the text too: pglock locks shows a waiter's query,
	// cut short. The void result of the lock is NOT NULL once granted; a
	// scalar subquery around it would do the same at the price of a
	// function scan and its tuplestore on every lock.
	st.lock = "SELECT pg_advisory_lock" + shared + params + " IS NOT NULL AND " + stashIdle + " AND " + setIdle(ms)
	st.unlock = "SELECT " + restoreIdle + " AND pg_advisory_unlock" + shared + params
	st.cleanup = strings.Replace(st.cleanup, "SELECT pg_advisory_unlock", "SELECT "+restoreIdle+" AND pg_advisory_unlock", 1)
	return st
}

// bindPool makes the statements those of a hold on a pool's connection
// (bounded true: with the server-side bound of the Lock's check interval),
// or the plain ones. The key's arguments are kept.
func (l *Lock) bindPool(bounded bool) {
	st := &l.st
	pair := 0
	if len(st.args) == 2 {
		pair = 1
	}
	var want statements
	switch {
	case !bounded:
		if st.bound == "" {
			return
		}
		want = fixed[l.cfg.scope][l.cfg.mode][pair]
	default:
		ms := sessionBound(l.cfg.lostCheck)
		if l.cfg.scope == Transaction {
			ms = txBound(l.cfg.lostCheck)
		}
		if st.bound == ms {
			return
		}
		want = boundedFixed[l.cfg.scope][l.cfg.mode][pair]
		if want.bound != ms {
			want = buildBounded(l.cfg.scope, l.cfg.mode, pair == 1, ms)
		}
	}
	st.try, st.lock, st.unlock, st.cleanup = want.try, want.lock, want.unlock, want.cleanup
	st.bound, st.txSet, st.begin = want.bound, want.txSet, ""
}

// ownTxBegin is the statement that opens the lock's own transaction and
// waits for the lock in it, in one round trip (the simple protocol), with
// the transaction's server-side bound when the statements have one. What
// the session's own bound is (sess) is read once per connection (see
// primaryTxSQL): one without gets SET LOCAL first (the cheapest form
// measured: the server plans every simple-protocol statement, and an
// expression costs it more than a SET); with one, or unknown, the lock
// statement asks (see setIdleInTx). A session found with a bound of its
// own is asked again each time, not trusted: a plain SET (by the work of an
// earlier hold, or any other user of the pool's connection) can turn it off
// for the session since, and the plain lock would then leave the
// transaction with no bound at all (TestReview27TxBoundStaleAfterSessionSET).
// It is built once per Lock and session kind (l.mu held).
func (l *Lock) ownTxBegin(sess txBoundKnown) string {
	if l.st.begin != "" && l.st.beginFor == sess {
		return l.st.begin
	}
	l.st.beginFor = sess
	// lockLiteral's text, made in one allocation: a Locker's Do makes a
	// Lock per call.
	xact, shared, _ := fnNames(l.cfg.scope, l.cfg.mode)
	var b strings.Builder
	var num [20]byte
	b.Grow(96 + len(l.st.txSet) + len(l.st.bound))
	b.WriteString("BEGIN; ")
	if l.st.txSet != "" && sess == txBoundNone {
		b.WriteString("SET LOCAL idle_in_transaction_session_timeout = ")
		b.WriteString(l.st.bound)
		b.WriteString("; ")
	}
	b.WriteString("SELECT pg_advisory_")
	b.WriteString(xact)
	b.WriteString("lock")
	b.WriteString(shared)
	b.WriteByte('(')
	if l.key.pair {
		x, y := l.key.halves()
		b.Write(strconv.AppendInt(num[:0], int64(x), 10))
		b.WriteString(", ")
		b.Write(strconv.AppendInt(num[:0], int64(y), 10))
		b.WriteByte(')')
	} else {
		b.Write(strconv.AppendInt(num[:0], l.key.v, 10))
		b.WriteString("::bigint)")
	}
	if l.st.txSet != "" && sess != txBoundNone {
		b.WriteString(" IS NOT NULL AND ")
		b.WriteString(l.st.txSet)
	}
	l.st.begin = b.String()
	return l.st.begin
}

// AbandonedSessionTimeout bounds how long the server keeps the session of a
// multiplexing Locker's lock connection whose client has gone silent, and so
// its locks: it ends it within this time of silence (by server-side TCP
// keepalives from half of it, tcp_user_timeout, or idle_session_timeout),
// and never before the client has seen the loss (twice the lost-check
// interval). With a lost-check interval above a quarter of it, the bound is
// four intervals. The bound holds on PostgreSQL 14 and later; before 14
// there is no idle_session_timeout, and behind a proxy or middlebox that
// answers TCP for a vanished client (so that keepalives never fail), the
// server keeps the session until the proxy closes it.
const AbandonedSessionTimeout = 6 * time.Second
