package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/pglock/internal/memlock"
)

// The in-memory test double (package pglocktest, issue 25). pglocktest makes
// a Locker on a *memlock.Session, one client of an in-memory lock table
// (memlock.Server), and newSource maps it to a memSource: each hold is a
// request in that table instead of a statement on a connection. Everything
// above the backend (Lock, Do, re-entrancy, key sets, Semaphores, Leaders,
// events) is the real code. Session scope only: there is no transaction to
// give the work.

// memKind names the double in errors.
const memKind = "pglocktest.Server"

// errMemTransaction refuses Transaction scope on the double.
var errMemTransaction = fmt.Errorf("%w: Transaction scope on the in-memory test double (%s):"+
	" it supports Session scope only (there is no transaction to run the work in); test Transaction scope against PostgreSQL",
	ErrUnsupportedConn, memKind)

// memSource is a Locker's client of the in-memory lock table.
type memSource struct {
	sess *memlock.Session
}

// owned: the double's holds are the Locker's own, as on a pool (Pooled
// reports true, and the adapters take it).
func (s *memSource) owned() bool    { return true }
func (s *memSource) callerTx() bool { return false }
func (s *memSource) kind() string   { return memKind }

func (s *memSource) open(_ context.Context, l *Lock) (backend, error) {
	return &memBackend{sess: s.sess, l: l}, nil
}

// close is Locker.Close: every hold of the Locker is lost, every wait ends.
func (s *memSource) close() { s.sess.Close() }

func (s *memSource) stats() LockerStats {
	held, queued := s.sess.Stats()
	return LockerStats{HeldKeys: held, Queued: queued}
}

func memKey(k Key) memlock.Key { return memlock.Key{V: k.v, Pair: k.pair} }

// memBackend is one hold in the in-memory table.
type memBackend struct {
	sess *memlock.Session
	l    *Lock
	h    *memlock.Hold
}

func (b *memBackend) acquire(ctx context.Context, wait bool) (bool, error) {
	if b.l.cfg.scope != Session {
		return false, errMemTransaction // settleScope refuses it first
	}
	h, err := b.sess.Acquire(ctx, memKey(b.l.key), memlock.Mode(b.l.cfg.mode), wait, b.l.cfg.identity)
	switch {
	case errors.Is(err, memlock.ErrClosed):
		return false, ErrLockerClosed
	case err != nil:
		return false, err
	case h == nil:
		return false, nil
	}
	b.h = h
	return true, nil
}

func (b *memBackend) release(context.Context, bool) error {
	if b.h == nil {
		return nil
	}
	if err := b.h.Release(); err != nil {
		return fmt.Errorf("%w: %w", ErrLockLost, err)
	}
	return nil
}

func (b *memBackend) discard() {
	if b.h != nil {
		_ = b.h.Release()
	}
}

// watch needs no goroutine: the table tells the hold's watcher when Lose or
// Close ends it, before any waiter is granted the key.
func (b *memBackend) watch(_ time.Duration, lost func(error)) func() {
	if b.h == nil {
		return nil
	}
	return b.h.Watch(lost)
}

func (b *memBackend) pgxTx() pgx.Tx         { return nil }
func (b *memBackend) sqlTx() *sql.Tx        { return nil }
func (b *memBackend) guarded() *callerGuard { return nil }
func (b *memBackend) token(context.Context) (int64, error) {
	return b.h.Token(), nil
}

// pid is the id of the hold's session (a Leader's term names it).
func (b *memBackend) pid() int64 {
	if b.h == nil {
		return 0
	}
	return b.h.Session().ID()
}

// memHolder reads who holds k exclusively in the table of sess: the
// holder's session id and its label (a Leader's identity, else the
// session's name).
func memHolder(sess *memlock.Session, k Key) (pid int64, app string, ok bool) {
	holds, _ := sess.Server().Holders(memKey(k))
	for _, h := range holds {
		if h.Mode == memlock.Exclusive {
			if h.Label == "" {
				return h.SessionID, h.Session, true
			}
			return h.SessionID, h.Label, true
		}
	}
	return 0, "", false
}
