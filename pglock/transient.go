package pglock

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pglockkit/kit/pglock/internal/lockconn"
)

// unavailable reports whether err means the database could not be reached or
// the connection failed, rather than anything about the lock: a connect
// error, a dead or reset connection, the server shutting down or not yet
// accepting connections (SQLSTATE 57P01, 57P02, 57P03), a connection
// exception (class 08), or too many connections (53300). A deadline that
// cut a statement off counts too: a server that does not answer is
// unavailable. The caller's own context ending does not (see
// Lock.notAcquired, which checks it first).
func unavailable(err error) bool {
	if err == nil || errors.Is(err, ErrTransactionPooler) ||
		errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		// A context's end is a bound of ours or the caller's, not the
		// database's failure (context.DeadlineExceeded is a net.Error too).
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return strings.HasPrefix(pgErr.Code, "08") || strings.HasPrefix(pgErr.Code, "57P") || pgErr.Code == "53300"
	}
	var connectErr *pgconn.ConnectError
	var netErr net.Error
	return errors.As(err, &connectErr) || errors.As(err, &netErr) || pgconn.SafeToRetry(err) ||
		errors.Is(err, errConnGone) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, driver.ErrBadConn) || errors.Is(err, sql.ErrConnDone) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, pgconn.ErrConnClosed)
}

// retryable reports whether an acquire that failed with err certainly took
// no lock and may run again at once on a new connection: nothing was sent
// (pgconn's SafeToRetry), or the server had already ended the session
// (SQLSTATE 57P01, 57P02: an idle pool connection that a restart killed, whose
// first statement reads the server's farewell).
func retryable(err error) bool {
	if pgconn.SafeToRetry(err) {
		return true
	}
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && (pgErr.Code == "57P01" || pgErr.Code == "57P02") &&
		pgErr.Severity == "FATAL"
}

// retrier is a source whose failed acquire may run again on a new
// connection: one that takes a connection of a pool per hold. retries says
// how many times: once for each idle connection of the pool, which a restart
// killed as it did the one that failed (each failed one is destroyed), and
// once more for a new connection; 0 when the source has no pool.
type retrier interface{ retries() int }

// maxRetries bounds retries whatever the pool's size.
const maxRetries = 64

func (s *pgxSource) retries() int {
	if s.pool == nil {
		return 0
	}
	return min(int(s.pool.Stat().IdleConns())+1, maxRetries)
}

func (s *sqlSource) retries() int {
	if s.db == nil {
		return 0
	}
	return min(s.db.Stats().Idle+1, maxRetries)
}

// connectErr is the error of a connection that could not be had from the
// caller's pool (pgxpool.Pool.Acquire, sql.DB.Conn) under ctx. A deadline
// that cut the connect while ctx is still alive was the pool's own bound
// (its ConnectTimeout, or connect_timeout), not the caller's: the server did
// not answer in time. That is ErrUnavailable, and does not match
// context.DeadlineExceeded, which would read as the caller's budget spent
// (or a busy key); the error's text keeps the deadline, and errors.As still
// reaches the connect error (*pgconn.ConnectError). Other errors are
// returned as they are.
func connectErr(ctx context.Context, err error) error {
	if err == nil || !errors.Is(err, context.DeadlineExceeded) || lockconn.ContextEnded(ctx) != nil {
		return err
	}
	return &connectTimeout{err: err}
}

// connectTimeout is connectErr's error: it matches ErrUnavailable with
// errors.Is, and the connect error only with errors.As.
type connectTimeout struct{ err error }

func (e *connectTimeout) Error() string {
	return fmt.Sprintf("%v: no answer from the server within the pool's connect timeout: %v", ErrUnavailable, e.err)
}

func (e *connectTimeout) Unwrap() error { return ErrUnavailable }

func (e *connectTimeout) As(target any) bool { return errors.As(e.err, target) }
