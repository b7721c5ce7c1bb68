package pglock

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Primaries only (issue 23). Advisory locks are not written to the WAL: a
// hot standby grants them as a primary does, but they live on the standby
// alone, so a lock taken there excludes no one who locks on the primary (a
// read-replica URL pasted by mistake, a host list that reached a standby
// after a failover). Every connection the library locks on is checked once,
// before its first lock: pg_is_in_recovery() is false. A session of a
// primary stays one (a primary cannot go back into recovery without a
// restart, which ends its sessions), so a connection found on a primary is
// not checked again; one found on a standby is checked again at its next
// use (a standby can be promoted), and a pool's connection is destroyed so
// that the pool connects again, perhaps to another host of its list.
//
// The check costs no round trip of its own where the library already sends
// a statement once per connection: it is a column of the claim statement of
// the pooler check (Session scope, see pooler.Check). Elsewhere (Transaction
// scope on a connection's first hold) it is one statement, once per
// connection.

// The same check refuses engines that speak the protocol without the locks
// (see checkEngine).

// primaryDataKey is the key, in a connection's CustomData, of the fact that
// its server was found to be a primary.
const primaryDataKey = "pglock.primary"

// primarySQL asks whether the server is in recovery (a standby).
const primarySQL = "SELECT pg_catalog.pg_is_in_recovery()"

// primaryTxSQL is primarySQL with a second column: whether the session has
// an idle_in_transaction_session_timeout of its own (not 0: the server's,
// role's, database's or the pool's), which the lock's own transaction
// then keeps (see AbandonedTransactionTimeout). It is read with the primary
// check, once per connection, rather than in every lock statement: asked
// there, it cost about 15 us of the server's planning per hold. A session
// with none at the check (the common case) then gets the bound by SET
// LOCAL. One with its own is still asked in the lock statement: a plain
// SET can change the setting during the session (see Lock.ownTxBegin).
const primaryTxSQL = "SELECT pg_catalog.pg_is_in_recovery(), current_setting('idle_in_transaction_session_timeout') <> '0'"

// txBoundDataKey is the key, in a connection's CustomData, of the second
// column of primaryTxSQL (absent when the connection was checked by
// another statement).
const txBoundDataKey = "pglock.ownTxBound"

// checkPrimary returns an error matching ErrNotPrimary when conn's server is
// a standby, checking once per connection (see above); bound limits the
// statement, which ctx does not interrupt (pgx would close the connection).
func checkPrimary(ctx context.Context, conn *pgx.Conn, bound time.Duration) error {
	data := conn.PgConn().CustomData()
	if data[primaryDataKey] == true {
		return nil
	}
	if err := checkEngine(conn.PgConn().ParameterStatus); err != nil {
		return err
	}
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), bound)
	defer cancel()
	var inRecovery, ownTxBound bool
	// The simple protocol: through a transaction pooler a prepared
	// statement could fail for reasons of the pooler's own.
	if err := conn.QueryRow(qctx, primaryTxSQL, pgx.QueryExecModeSimpleProtocol).Scan(&inRecovery, &ownTxBound); err != nil {
		return fmt.Errorf("pglock: check that the server is a primary: %w", err)
	}
	data[txBoundDataKey] = ownTxBound
	return notePrimary(conn, inRecovery)
}

// sessionTxBound reports what primaryTxSQL found of conn's session: own
// (it has an idle_in_transaction_session_timeout of its own) and known
// (false when the connection was checked by another statement).
func sessionTxBound(conn *pgx.Conn) (own, known bool) {
	own, known = conn.PgConn().CustomData()[txBoundDataKey].(bool)
	return own, known
}

// notePrimary records what a statement of conn found (pg_is_in_recovery()),
// and returns ErrNotPrimary for a standby.
func notePrimary(conn *pgx.Conn, inRecovery bool) error {
	if !inRecovery {
		conn.PgConn().CustomData()[primaryDataKey] = true
		return nil
	}
	return errStandby(conn.PgConn().Conn().RemoteAddr().String())
}

// errStandby is the error of a standby (at host, if known).
func errStandby(host string) error {
	at := ""
	if host != "" {
		at = " at " + host
	}
	return fmt.Errorf("%w: %w: the server%s is a standby (pg_is_in_recovery() is true):"+
		" point the Locker at the primary (with a host list, add target_session_attrs=primary)",
		ErrNotPrimary, ErrUnavailable, at)
}

// checkEngine refuses a server that speaks PostgreSQL's protocol without
// its advisory locks, from what it reported at connect (no round trip):
// CockroachDB (it reports crdb_version) has no pg_advisory_lock, and its
// pg_try_advisory_lock always returns true, so every replica would "hold"
// every key at once. (YugabyteDB 2025.1 and later has advisory locks with
// PostgreSQL's semantics, cluster-wide, and is accepted, untested: the
// README's "High availability and scaling out" says what to check there.)
func checkEngine(param func(string) string) error {
	if v := param("crdb_version"); v != "" {
		return fmt.Errorf("%w: the server is CockroachDB (%s), whose advisory lock functions lock nothing"+
			" (pg_try_advisory_lock always returns true): pglock needs PostgreSQL's advisory locks", ErrUnsupportedConn, v)
	}
	return nil
}
