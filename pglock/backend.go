package pglock

import (
	"context"
	"database/sql"
	"fmt"
	"reflect"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock/internal/memlock"
)

// A source is what the caller gave NewLock: it opens one backend per hold.
type source interface {
	open(ctx context.Context, l *Lock) (backend, error)
	// owned reports whether the lock takes connections of its own (a pool):
	// only those are watched for loss and destroyed on doubt.
	owned() bool
	// callerTx reports whether the source is the caller's transaction.
	callerTx() bool
	kind() string
}

// A backend is one hold's connection and, in Transaction scope, transaction.
type backend interface {
	// acquire takes the lock, at once (wait false) or blocking until ctx
	// ends. When it returns false or an error the lock is not held and the
	// backend is closed.
	acquire(ctx context.Context, wait bool) (bool, error)
	// release ends the hold and closes the backend: a session lock is
	// unlocked; the lock's own transaction is committed (commit) or rolled
	// back; the caller's transaction is rolled back when !commit and left
	// alone otherwise.
	release(ctx context.Context, commit bool) error
	// discard ends a hold whose connection was lost: a connection of the
	// lock's own is destroyed without another statement.
	discard()
	// watch starts watching the connection of a held lock and calls lost
	// (once) if it dies. The returned stop ends the watch and waits for it.
	// A backend that cannot be watched returns nil.
	watch(interval time.Duration, lost func(error)) (stop func())
	pgxTx() pgx.Tx
	sqlTx() *sql.Tx
	// token takes the next fencing token of the held key on the lock's own
	// session or transaction (see WithToken).
	token(ctx context.Context) (int64, error)
	// guarded is the lock-table guard that counts the hold (see
	// callerGuard); nil for a multiplexed hold, which its Locker's counts.
	guarded() *callerGuard
}

// newSource checks the connection value and the options against each other.
// A pgx source is made in into when it is not nil (NewLock's Lock holds it).
func newSource(conn any, cfg *config, into *pgxSource) (source, error) {
	var s source
	pgxSrc := func() *pgxSource {
		if into != nil {
			return into
		}
		return new(pgxSource)
	}
	switch c := conn.(type) {
	case *pgxpool.Pool:
		if c == nil {
			return nil, fmt.Errorf("%w: nil *pgxpool.Pool", ErrUnsupportedConn)
		}
		if zeroPool(c) {
			return nil, fmt.Errorf("%w: a zero pgxpool.Pool: make it with pgxpool.New or pgxpool.NewWithConfig", ErrUnsupportedConn)
		}
		ps := pgxSrc()
		ps.pool = c
		s = ps
	case *pgxpool.Conn:
		if c == nil {
			return nil, fmt.Errorf("%w: nil *pgxpool.Conn", ErrUnsupportedConn)
		}
		pc := poolConn(c)
		if pc == nil {
			return nil, fmt.Errorf("%w: a zero or released pgxpool.Conn: take it with pgxpool.Pool.Acquire, and give it before its Release", ErrUnsupportedConn)
		}
		if pc.PgConn() == nil {
			return nil, fmt.Errorf("%w: a pgxpool.Conn on a zero pgx.Conn", ErrUnsupportedConn)
		}
		ps := pgxSrc()
		ps.conn = pc
		s = ps
	case *pgx.Conn:
		if c == nil {
			return nil, fmt.Errorf("%w: nil *pgx.Conn", ErrUnsupportedConn)
		}
		if c.PgConn() == nil {
			return nil, fmt.Errorf("%w: a zero pgx.Conn: make it with pgx.Connect or pgx.ConnectConfig", ErrUnsupportedConn)
		}
		ps := pgxSrc()
		ps.conn = c
		s = ps
	case pgx.Tx:
		if isNilTx(c) {
			return nil, fmt.Errorf("%w: nil pgx.Tx", ErrUnsupportedConn)
		}
		ps := pgxSrc()
		ps.tx = c
		s = ps
	case *sql.DB:
		if c == nil {
			return nil, fmt.Errorf("%w: nil *sql.DB", ErrUnsupportedConn)
		}
		if zeroDB(c) {
			return nil, fmt.Errorf("%w: a zero sql.DB: make it with sql.Open or sql.OpenDB", ErrUnsupportedConn)
		}
		s = &sqlSource{db: c}
	case *sql.Conn:
		if c == nil {
			return nil, fmt.Errorf("%w: nil *sql.Conn", ErrUnsupportedConn)
		}
		if noDB(c) {
			return nil, fmt.Errorf("%w: a zero sql.Conn: take it with sql.DB.Conn", ErrUnsupportedConn)
		}
		s = &sqlSource{conn: c}
	case *sql.Tx:
		if c == nil {
			return nil, fmt.Errorf("%w: nil *sql.Tx", ErrUnsupportedConn)
		}
		if noDB(c) {
			return nil, fmt.Errorf("%w: a zero sql.Tx: begin it with sql.DB.BeginTx or sql.Conn.BeginTx", ErrUnsupportedConn)
		}
		s = &sqlSource{tx: c}
	case *memlock.Session:
		// The in-memory test double (package pglocktest): see backend_mem.go.
		if c == nil {
			return nil, fmt.Errorf("%w: nil in-memory session", ErrUnsupportedConn)
		}
		s = &memSource{sess: c}
	case nil:
		return nil, fmt.Errorf("%w: nil (want *pgxpool.Pool, *pgxpool.Conn, *pgx.Conn, pgx.Tx, *sql.DB, *sql.Conn or *sql.Tx)", ErrUnsupportedConn)
	default:
		return nil, fmt.Errorf("%w: %T (want *pgxpool.Pool, *pgxpool.Conn, *pgx.Conn, pgx.Tx, *sql.DB, *sql.Conn or *sql.Tx)", ErrUnsupportedConn, conn)
	}
	if err := settleScope(s, cfg); err != nil {
		return nil, err
	}
	return s, nil
}

// settleScope checks the scope against the source: on a caller's
// transaction it is Transaction, and asking for Session there is an error.
func settleScope(s source, cfg *config) error {
	if _, mem := s.(*memSource); mem && cfg.scope == Transaction {
		return errMemTransaction // the in-memory double: Session scope only
	}
	if s.callerTx() {
		if cfg.scopeSet && cfg.scope == Session {
			return fmt.Errorf("%w: Session scope on a transaction (%s): the lock would outlive it; use pglock.Transaction, or pass the pool or connection", ErrInvalidOption, s.kind())
		}
		cfg.scope = Transaction
	}
	return nil
}

// zeroPool reports whether p is a zero pgxpool.Pool, which pgxpool.New did
// not make: it has no config. The field is read by reflection, as noDB does
// (set when the pool is made and never written again, so the read races
// with nothing): Config would copy the whole configuration, at every NewLock.
// Where a later pgx renames the field, Config tells: it panics on a zero
// pool (copying a nil config) and touches nothing else on a pool made by NewLock.
func zeroPool(p *pgxpool.Pool) (zero bool) {
	if i := poolConfigField(); i >= 0 {
		return reflect.ValueOf(p).Elem().Field(i).IsNil()
	}
	defer func() {
		if recover() != nil {
			zero = true
		}
	}()
	return p.Config() == nil
}

// poolConfigField is the index of pgxpool.Pool's config field (a pointer),
// or -1.
var poolConfigField = sync.OnceValue(func() int {
	f, ok := reflect.TypeFor[pgxpool.Pool]().FieldByName("config")
	if !ok || len(f.Index) != 1 || f.Type.Kind() != reflect.Pointer {
		return -1
	}
	return f.Index[0]
})

// poolConn returns the connection of c, or nil when c is a zero or released
// pgxpool.Conn: it has no pool resource, so Conn panics.
func poolConn(c *pgxpool.Conn) (conn *pgx.Conn) {
	defer func() {
		if recover() != nil {
			conn = nil
		}
	}()
	return c.Conn()
}

// zeroDB reports whether db is a zero sql.DB, which sql.Open did not make:
// it has no connector, so Driver panics. Driver of a DB made by Open returns
// its connector's driver and touches nothing else.
func zeroDB(db *sql.DB) (zero bool) {
	defer func() {
		if recover() != nil {
			zero = true
		}
	}()
	return db.Driver() == nil
}

// noDB reports whether c, a *sql.Conn or *sql.Tx, is a zero value, which
// database/sql did not make: its db field is nil. database/sql has no
// method that tells without using the connection (on a live one, Raw waits
// for a statement running on it), so the field is read by reflection: it is
// set when the value is made and never written again, so the read races
// with nothing. A field that a later Go renames is not checked.
func noDB(c any) bool {
	v := reflect.ValueOf(c).Elem().FieldByName("db")
	return v.IsValid() && v.Kind() == reflect.Pointer && v.IsNil()
}

func isNilTx(tx pgx.Tx) (isNil bool) {
	defer func() {
		if recover() != nil {
			isNil = true
		}
	}()
	return tx == nil || tx.Conn() == nil
}

// bounded returns a context for statements that must run even when ctx has
// ended (unlock, commit, rollback, cleanup), bounded by d.
func bounded(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), d)
}
