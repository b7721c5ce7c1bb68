// Package pooler tells whether a connection's statements reach a server
// session of its own, or go through a transaction pooler that would let two
// clients hold one session lock at once; and, through a session pooler,
// proves that each statement runs on the session the connection claimed.
// pglock runs it before a connection's first session lock. It does not
// import pglock: pglock imports it, and its ErrTransactionPooler is this
// package's.
//
// A session lock belongs to a server session. Through a proxy that pools
// server sessions per transaction (PgBouncer's pool_mode = transaction or
// statement, and poolers like it), two clients' statements can reach the same
// server session, which stacks their locks: both would "hold" the key, with
// no error. So before its first session lock on a connection, the lock
// checks, once per connection, that the connection's statements reach a
// server session of their own:
//
//  1. One statement returns pg_backend_pid() and claims the session for this
//     client (a session-level setting, pglock.session, set to a random token
//     of the connection's, unless the session already carries another
//     client's). On a direct connection, or through a plain TCP proxy,
//     the pid equals the one the server gave the client at connect
//     (BackendKeyData): the session is the connection's own, and that is all.
//     A pooler hands the client a cancel key of its own, so the pids differ.
//  2. Through a pooler, a session that already carries another client's token
//     proves that clients share sessions: refused.
//  3. Else a probe: a second connection through the same pooler runs a few
//     statements at once. A transaction pooler hands it the session that the
//     first statement just freed (PgBouncer reuses the most recently freed
//     first), or a session claimed by another client, or moves it between
//     sessions from one statement to the next: refused. A session pooler
//     keeps the probe on one unclaimed session of its own. A session pooler
//     resets a session (DISCARD ALL) before it serves another client, which
//     drops the claim and the locks; one configured without that reset leaks
//     locks between clients and is refused too, rightly.
//
// The outcome is remembered on the connection (pgconn's CustomData), so the
// check costs one statement per connection, and through a pooler one probe
// connection more. A probe that proves nothing (it could not connect or
// answer within its bound: a pooler with no free server session) lets the
// lock go on but is not remembered for good: the connection's locks check
// again a minute later. Meanwhile the claim still refuses a second client
// that reaches the session.
package pooler

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// ErrTransactionPooler is pglock.ErrTransactionPooler (see its doc).
var ErrTransactionPooler = errors.New("pglock: session lock through a transaction pooler" +
	" (use Transaction scope, session pooling, or a direct connection)")

// Setting is the session-level setting that claims a server session
// for one client connection.
const Setting = "pglock.session"

// StatementPooler reports whether err is a pooler's refusal of a transaction
// block in statement pooling mode (PgBouncer: "transaction blocks not
// allowed in statement pooling mode", SQLSTATE 08P01, which ends the client
// connection).
func StatementPooler(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "08P01" && strings.Contains(pgErr.Message, "statement pooling")
}

// sessionDataKey is the key of the check's outcome in a connection's
// CustomData; tokenDataKey the key of the connection's token.
const (
	sessionDataKey = "pglock.session"
	tokenDataKey   = "pglock.session.token"
	retryDataKey   = "pglock.session.retry" // when an inconclusive probe may run again
	pidDataKey     = "pglock.session.pid"   // the server pid of the session claimed
)

// Proof is what a statement checks, on a connection that goes through
// a pooler, to prove that it runs on the server session the connection
// claimed: that session's pid and the claim's token. Through a session
// pooler it always does; through a transaction pooler that the probe did not
// catch (one that resets sessions after every transaction, say) it does not,
// and the statement takes nothing (see lockconn's Conn.exec).
type Proof struct {
	pid   uint32
	token string
}

// PID is the server pid of the session the connection claimed.
func (p *Proof) PID() uint32 { return p.pid }

// Token is the claim's token.
func (p *Proof) Token() string { return p.token }

// ProofOf returns the proof that conn's statements must carry: nil on a
// connection that reaches its own server session (no pooler), or when the
// check has not run on it.
func ProofOf(conn *pgx.Conn) *Proof {
	pc := conn.PgConn()
	data := pc.CustomData()
	pid, ok := data[pidDataKey].(uint32)
	if !ok || pid == pc.PID() {
		return nil
	}
	return &Proof{pid: pid, token: sessionToken(data)}
}

// ProvenSQL is stmt (a "SELECT expr" lock statement with nargs arguments)
// made to run its expression only on the claimed session: it answers NULL
// elsewhere, having taken nothing. With wrap, the expression may be of any
// type (a void function): it answers true once it ran.
func ProvenSQL(stmt string, nargs int, wrap bool) string {
	expr := strings.TrimPrefix(stmt, "SELECT ")
	if wrap {
		expr = "(SELECT true FROM (SELECT " + expr + ") AS granted)"
	}
	return fmt.Sprintf("SELECT CASE WHEN pg_backend_pid() = $%d::int8 AND current_setting('%s', true) IS NOT DISTINCT FROM $%d::text THEN (%s) END",
		nargs+1, Setting, nargs+2, expr)
}

// with returns args and the proof's own.
func (p *Proof) With(args []any) []any {
	return append(append(make([]any, 0, len(args)+2), args...), int64(p.pid), p.token)
}

// ProvenTry runs the try statement st on conn, which goes through a pooler,
// with the proof p (see ProvenSQL): ErrSessionMoved when it ran elsewhere.
func ProvenTry(ctx context.Context, conn *pgx.Conn, p *Proof, st string, args []any) (bool, error) {
	var ok *bool
	if err := conn.QueryRow(ctx, ProvenSQL(st, len(args), false), p.With(args)...).Scan(&ok); err != nil {
		return false, err
	}
	if ok == nil {
		return false, ErrSessionMoved
	}
	return *ok, nil
}

// ErrSessionMoved means a statement on a pooled connection did not run on
// the server session the connection claimed.
var ErrSessionMoved = fmt.Errorf("%w: a statement of this connection ran on another server session than the one it claimed"+
	" (or the pooler reset the session: server_reset_query_always), so the pooler moves clients between sessions", ErrTransactionPooler)

// probeRetry is how long a connection whose probe proved nothing goes
// without another: a full session pooler would otherwise cost every lock the
// probe's bound.
const probeRetry = time.Minute

// probeStatements is how many statements the probe runs.
const probeStatements = 3

// MaxProbeTime bounds the probe: through a session pooler whose server
// sessions are all taken, its statements wait for one.
const MaxProbeTime = time.Second

const (
	// The claim also asks whether the server is a primary (see
	// checkPrimary): the same round trip, once per connection.
	claimSQL = "SELECT pg_backend_pid(), coalesce(nullif(current_setting('" + Setting + "', true), ''), " +
		"set_config('" + Setting + "', $1, false)), pg_catalog.pg_is_in_recovery()"
	probeSQL = "SELECT pg_backend_pid(), coalesce(current_setting('" + Setting + "', true), '')"
)

// Check verifies, once per connection, that conn's statements reach a
// server session of conn's own (see the package documentation). It returns an error matching
// ErrTransactionPooler when they do not, and a database error when the check
// could not run (then it runs again on the next use). bound limits each
// statement.
func Check(ctx context.Context, conn *pgx.Conn, bound time.Duration, notePrimary func(conn *pgx.Conn, inRecovery bool) error) error {
	data := conn.PgConn().CustomData()
	if v, done := data[sessionDataKey]; done {
		err, _ := v.(error)
		return err
	}
	if until, ok := data[retryDataKey].(time.Time); ok && time.Now().Before(until) {
		return nil // a probe proved nothing a moment ago: not again yet
	}
	conclusive, err := verifySession(ctx, conn, bound, notePrimary)
	switch {
	case conclusive:
		data[sessionDataKey] = err
	case err == nil:
		data[retryDataKey] = time.Now().Add(probeRetry)
	}
	return err
}

// sessionToken returns the connection's claim token: random, made once per
// connection. (Not its cancel key: other clients of a pooler's session can
// read the setting.)
func sessionToken(data map[string]any) string {
	if t, ok := data[tokenDataKey].(string); ok {
		return t
	}
	var b [16]byte
	_, _ = rand.Read(b[:])
	t := hex.EncodeToString(b[:])
	data[tokenDataKey] = t
	return t
}

// verifySession runs the check; conclusive reports whether its outcome
// holds for the connection's life (a database error, or a probe that proved
// nothing, does not).
func verifySession(ctx context.Context, conn *pgx.Conn, bound time.Duration, notePrimary func(*pgx.Conn, bool) error) (conclusive bool, err error) {
	pc := conn.PgConn()
	token := sessionToken(pc.CustomData())
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), bound)
	defer cancel()
	var pid uint32
	var owner string
	var inRecovery bool
	// The simple protocol: a transaction pooler without prepared-statement
	// support would fail a prepared statement for reasons of its own.
	if err := conn.QueryRow(qctx, claimSQL, pgx.QueryExecModeSimpleProtocol, token).Scan(&pid, &owner, &inRecovery); err != nil {
		return false, fmt.Errorf("pglock: check the connection's server session: %w", err)
	}
	if err := notePrimary(conn, inRecovery); err != nil {
		return false, err // not kept: a standby can be promoted
	}
	pc.CustomData()[pidDataKey] = pid
	if pid == pc.PID() {
		return true, nil // the connection's own session
	}
	if owner != token {
		return true, fmt.Errorf("%w: the server session (pid %d) this connection reached serves another client too",
			ErrTransactionPooler, pid)
	}
	return probePooler(ctx, conn.Config(), pid, token)
}

// probePooler tells a session pooler from a transaction pooler (see the package documentation):
// pid and token are the session the first connection reached and its claim.
// A probe that cannot connect or answer in time proves nothing: the lock goes
// on, and conclusive is false.
func probePooler(ctx context.Context, cfg *pgx.ConnConfig, pid uint32, token string) (conclusive bool, err error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), MaxProbeTime)
	defer cancel()
	cfg.ConnectTimeout = MaxProbeTime
	probe, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return false, nil
	}
	defer probe.Close(context.Background())
	var first uint32
	for i := range probeStatements {
		var got uint32
		var owner string
		if err := probe.QueryRow(ctx, probeSQL, pgx.QueryExecModeSimpleProtocol).Scan(&got, &owner); err != nil {
			return false, nil
		}
		if i == 0 {
			first = got
		}
		if got == pid || owner != "" || got != first {
			why := "moves a client between server sessions"
			switch {
			case got == pid:
				why = fmt.Sprintf("handed another client the server session (pid %d) this connection had just used", pid)
			case owner == token:
				why = "handed another client a server session this connection had claimed"
			case owner != "":
				why = fmt.Sprintf("handed a new client a server session (pid %d) another client had used", got)
			}
			return true, fmt.Errorf("%w: the pooler %s", ErrTransactionPooler, why)
		}
	}
	return true, nil
}
