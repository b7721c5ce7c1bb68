package pglock

import (
	"context"
	"database/sql"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// serial makes a Locker on one connection or transaction (*pgx.Conn,
// *pgxpool.Conn, pgx.Tx, *sql.Conn, *sql.Tx) safe for concurrent use. A
// connection runs one statement at a time, and PostgreSQL stacks a session's
// own locks instead of excluding; the protected work may use the connection
// too (Do's function may). So the Locker's holds take turns on it: a hold
// keeps the connection from the moment it starts taking its lock until it is
// released, and every other acquire waits for it (until its context ends),
// including one made while holding: a Locker on one connection holds one lock
// at a time. (Letting a holder nest a second lock would send a second BEGIN
// into the first's transaction, or wait outside a savepoint in it.)
type serial struct {
	conn    chan struct{} // a place: a hold has the connection
	closing chan struct{} // closed by Locker.Close
	holds   atomic.Int64
}

func newSerial() *serial {
	return &serial{conn: make(chan struct{}, 1), closing: make(chan struct{})}
}

// serialSource wraps the Locker's source with its serial.
type serialSource struct {
	s     *serial
	inner source
}

func (s *serialSource) owned() bool    { return s.inner.owned() }
func (s *serialSource) callerTx() bool { return s.inner.callerTx() }
func (s *serialSource) kind() string   { return s.inner.kind() }

func (s *serialSource) open(ctx context.Context, l *Lock) (backend, error) {
	b, err := s.inner.open(ctx, l)
	if err != nil {
		return nil, err
	}
	return &serialBackend{s: s.s, inner: b}, nil
}

type serialBackend struct {
	s     *serial
	inner backend
}

func (b *serialBackend) acquire(ctx context.Context, wait bool) (bool, error) {
	select {
	case b.s.conn <- struct{}{}:
	case <-ctx.Done():
		return false, ctx.Err()
	case <-b.s.closing:
		return false, ErrLockerClosed
	}
	ok, err := b.inner.acquire(ctx, wait)
	if !ok {
		<-b.s.conn
		return false, err
	}
	b.s.holds.Add(1)
	return true, nil
}

// end gives the connection back after the hold ended.
func (b *serialBackend) end() {
	b.s.holds.Add(-1)
	<-b.s.conn
}

func (b *serialBackend) release(ctx context.Context, commit bool) error {
	err := b.inner.release(ctx, commit)
	b.end()
	return err
}

func (b *serialBackend) discard() {
	b.inner.discard()
	b.end()
}

func (b *serialBackend) watch(interval time.Duration, lost func(error)) func() {
	return b.inner.watch(interval, lost)
}

func (b *serialBackend) pgxTx() pgx.Tx  { return b.inner.pgxTx() }
func (b *serialBackend) sqlTx() *sql.Tx { return b.inner.sqlTx() }

func (b *serialBackend) token(ctx context.Context) (int64, error) { return b.inner.token(ctx) }

func (b *serialBackend) guarded() *callerGuard { return b.inner.guarded() }
