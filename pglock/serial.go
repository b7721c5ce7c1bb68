package pglock

import (
	"context"
	"database/sql"
	"time"

	"github.com/jackc/pgx/v5"
)

// serial makes a Locker on one connection or transaction (*pgx.Conn,
// *pgxpool.Conn, pgx.Tx, *sql.Conn, *sql.Tx) safe for concurrent use. A
// connection runs one statement at a time, and PostgreSQL stacks a session's
// own locks instead of excluding, so the Locker keeps a key table (at most one
// holder of an exclusive key in the process) and lets one goroutine at a time
// use the connection: for each statement in Session scope and on a caller's
// transaction; for the whole hold when the lock opens its own transaction on
// the connection. A goroutine waiting in the server's queue holds the
// connection, so on one connection the others' statements wait behind it.
type serial struct {
	t    *keyTable
	conn chan struct{} // a place: the connection is in use
}

func newSerial() *serial {
	return &serial{t: newKeyTable(), conn: make(chan struct{}, 1)}
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
	return &serialBackend{s: s.s, inner: b, l: l}, nil
}

type serialBackend struct {
	s     *serial
	inner backend
	l     *Lock
	e     *keyEntry
	// whole: the connection is kept for the whole hold (the lock's own
	// transaction is open on it).
	whole bool
}

// take waits for the connection, until ctx ends.
func (b *serialBackend) take(ctx context.Context) error {
	select {
	case b.s.conn <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (b *serialBackend) give() { <-b.s.conn }

func (b *serialBackend) acquire(ctx context.Context, wait bool) (bool, error) {
	// Shared holders of the lock's own transaction cannot share it: they
	// queue like exclusive ones.
	mode := b.l.cfg.mode
	ownTx := b.l.cfg.scope == Transaction && !b.l.src.callerTx()
	if ownTx {
		mode = Exclusive
	}
	e, adm, err := b.s.t.enter(ctx, b.l.key, mode, wait)
	switch {
	case err != nil:
		return false, err
	case adm == admitBusy:
		return false, nil
	case adm == admitJoined:
		b.e = e
		return true, nil
	}
	if err := b.take(ctx); err != nil {
		b.s.t.passTurn(e)
		return false, err
	}
	ok, err := b.inner.acquire(ctx, wait)
	if !ok || !ownTx {
		b.give()
	}
	if !ok {
		b.s.t.passTurn(e)
		return false, err
	}
	b.whole = ownTx
	b.s.t.granted(e, mode, nil)
	b.e = e
	return true, nil
}

func (b *serialBackend) release(ctx context.Context, commit bool) error {
	e := b.e
	if e == nil {
		return nil
	}
	b.e = nil
	if !b.s.t.leave(e) {
		return nil
	}
	if !b.whole {
		b.s.conn <- struct{}{} // as long as it takes: a lock must not be left held
	}
	b.whole = false
	err := b.inner.release(ctx, commit)
	b.give()
	b.s.t.passTurn(e)
	return err
}

func (b *serialBackend) discard() {
	e := b.e
	if e == nil {
		return
	}
	b.e = nil
	if !b.s.t.leave(e) {
		return
	}
	if !b.whole {
		b.s.conn <- struct{}{} // as long as it takes: a lock must not be left held
	}
	b.whole = false
	b.inner.discard()
	b.give()
	b.s.t.passTurn(e)
}

func (b *serialBackend) watch(interval time.Duration, lost func(error)) func() {
	return b.inner.watch(interval, lost)
}

func (b *serialBackend) pgxTx() pgx.Tx  { return b.inner.pgxTx() }
func (b *serialBackend) sqlTx() *sql.Tx { return b.inner.sqlTx() }
