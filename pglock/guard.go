package pglock

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// The lock-table guard. Advisory locks live in the server's shared lock
// table, which every session of the server (every database, every client)
// shares; a full table fails everyone's statements with "out of shared
// memory" (53200). A cap per Locker cannot see the others, so before a lock
// is taken the guard compares the server's advisory locks, as last counted
// plus what its users took since, with serverLimitOf (3/4 of the table). The
// count (pg_locks, which reads the whole table) is taken rarely: only once its
// users hold a share of the table themselves (guardFromShare), then now and
// then (see guardEvery), by one goroutine at a time.
//
// A multiplexing Locker has a guard of its own (mux.guard). The Locks that
// NewLock makes, and the Locks of a Locker that does not multiplex, share one
// guard per server per process (callerGuard): on a caller's connection or
// transaction they stack on one session, without the cap of a Locker.
type tableGuard struct {
	mu       sync.Mutex
	capacity int // the server's lock table, as configured; 0 until known
	// The last count: the server's advisory locks, and what the guard's users
	// held, when it was taken (at); whether one is under way.
	count, countHeld int
	at               time.Time
	busy             bool
	counted          chan struct{} // closed when the count under way ends
}

// serverShare is the share, in quarters, of the server's lock table that the
// advisory locks of every session together may take before the guard refuses
// more: PostgreSQL fits about twice the nominal table before it runs out of
// shared memory, and the rest is left to the other locks of every session.
const serverShare = 3

// The guard counts once its users hold a 1/guardFromShare of the table
// (guardFirst before the table's size is known), then again after
// guardEvery (guardEveryFar while the last count was below half the limit),
// or after its users took 1/guardGrantsShare of the table more, or an eighth
// more than they held at the last count, whichever is more: a count reads
// every lock of the server, so with a step that grows with the locks held,
// taking N locks costs O(N) rows read in all, not O(N^2), and what the
// Lockers of a fleet can take between their counts stays within an eighth
// of what they hold.
const (
	guardFromShare   = 32
	guardGrantsShare = 64
	guardGrowth      = 8
	guardFirst       = 64
	guardEvery       = time.Second
	guardEveryFar    = 10 * time.Second
)

// serverLimitOf is the cap on the advisory locks of every session of a
// server whose lock table has capacity slots.
func serverLimitOf(capacity int) int { return max(capacity*serverShare/4, 1) }

// capacitySQL is the server's lock table size, as configured.
const capacitySQL = `current_setting('max_locks_per_transaction')::int *
	(current_setting('max_connections')::int + current_setting('max_prepared_transactions')::int)`

// guardCountSQL counts the server's advisory locks (held or waited for, of
// every session and database) and reads its lock table size. It waits for no
// lock.
const guardCountSQL = `SELECT count(*) FILTER (WHERE locktype = 'advisory'), ` + capacitySQL + ` FROM pg_catalog.pg_locks`

// admit returns ErrTooManyLocks, with the server's figures, when taking key
// k would bring the server's advisory locks to the limit. held reports what
// the guard's users hold now; count counts the server's advisory locks and
// reads its table size (called when a count is due). A count that fails is
// not a refusal: the lock statement then says what is wrong.
//
// While one caller counts, the others go on with the last count, unless
// their users took a step (or everything, before the first count) since it:
// they wait for the count under way, so what a guard lets through between
// two counts stays within its step however slow a count is (a count queues
// behind the lock statements of a busy lock connection).
func (g *tableGuard) admit(ctx context.Context, k Key, heldNow func() int, count func() (n, capacity int, err error)) error {
	var held int
	for {
		held = heldNow() // before g.mu: heldNow may take its users' lock
		g.mu.Lock()
		from := guardFirst
		if g.capacity > 0 {
			from = max(g.capacity/guardFromShare, 1)
		}
		if held < from {
			g.mu.Unlock()
			return nil
		}
		every := guardEvery
		if limit := serverLimitOf(g.capacity); g.capacity > 0 && g.count+held-g.countHeld < limit/2 {
			every = guardEveryFar
		}
		step := max(g.capacity/guardGrantsShare, g.countHeld/guardGrowth, 1)
		stepped := g.at.IsZero() || held-g.countHeld >= step
		if g.busy {
			if !stepped {
				break
			}
			// A caller whose context ends stops waiting; its lock statement
			// then fails as it would have.
			done := g.counted
			g.mu.Unlock()
			select {
			case <-done:
				continue
			case <-ctx.Done():
			}
			g.mu.Lock()
			break
		}
		if !stepped && time.Since(g.at) < every {
			break
		}
		g.busy, g.counted = true, make(chan struct{})
		g.mu.Unlock()
		n, capacity, err := count()
		g.mu.Lock()
		g.busy = false
		close(g.counted)
		if err == nil {
			g.count, g.countHeld, g.at = n, held, time.Now()
			if capacity > 0 {
				g.capacity = capacity
			}
		}
		break
	}
	est := g.count + held - g.countHeld
	capacity := g.capacity
	over := !g.at.IsZero() && capacity > 0 && est >= serverLimitOf(capacity)
	g.mu.Unlock()
	if !over {
		return nil
	}
	return fmt.Errorf("%w: key %s: the server holds about %d advisory locks of every session, %d at most for them all"+
		" (3/4 of the server's lock table of %d slots, max_locks_per_transaction * (max_connections + max_prepared_transactions))",
		ErrTooManyLocks, k, est, serverLimitOf(capacity), capacity)
}

// callerGuard is the guard of the Locks of one server that no multiplexing
// Locker holds, with what they hold now.
type callerGuard struct {
	tableGuard
	held atomic.Int64
}

// callerGuards holds the callerGuard of each server, by its address.
var callerGuards sync.Map // string -> *callerGuard

// guardFor returns the callerGuard of the server at addr ("" when it is not
// known: database/sql drivers other than pgx's, whose Locks share one).
func guardFor(addr string) *callerGuard {
	if g, ok := callerGuards.Load(addr); ok {
		return g.(*callerGuard)
	}
	g, _ := callerGuards.LoadOrStore(addr, &callerGuard{})
	return g.(*callerGuard)
}

// serverAddr is the address of the server conn talks to: the key of its
// callerGuard (pg_locks shows the locks of every database of the server).
func serverAddr(conn *pgx.Conn) string {
	if conn == nil || conn.PgConn() == nil {
		return ""
	}
	if nc := conn.PgConn().Conn(); nc != nil {
		if a := nc.RemoteAddr(); a != nil {
			return addrString(a)
		}
	}
	return ""
}

func addrString(a net.Addr) string { return a.Network() + ":" + a.String() }

// admitCaller is the guard's check for a hold of l that no multiplexing
// Locker takes, with count run on the hold's session; on nil, the caller
// counts the hold in g once it is granted (Lock.acquire).
func (l *Lock) admitCaller(ctx context.Context, g *callerGuard, q func(ctx context.Context, sql string) rowScanner) error {
	return g.admit(ctx, l.key, func() int { return int(g.held.Load()) }, func() (n, capacity int, err error) {
		// The caller's context: a count cut short ends the statement as the
		// lock's own would (on a caller's transaction, it fails it).
		cctx, cancel := bounded(ctx, l.cfg.releaseTimeout)
		defer cancel()
		err = q(cctx, guardCountSQL).Scan(&n, &capacity)
		return n, capacity, err
	})
}

// rowScanner is a row of pgx or database/sql.
type rowScanner interface{ Scan(dest ...any) error }
