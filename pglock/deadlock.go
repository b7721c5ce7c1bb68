package pglock

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock/internal/memlock"
	"github.com/pglockkit/kit/pglock/internal/pooler"
	"github.com/pglockkit/kit/pglock/internal/waitgraph"
)

// Deadlocks between holders (issue 24). PostgreSQL ends a cycle of waits
// between sessions that each hold what the next waits for. With lock
// connections, and with a pool connection per hold, a holder's hold lives
// on one session and its next wait on another, which holds nothing: the
// server sees waits, never a cycle, and the waits would last until their
// contexts ended. So the library finds such cycles itself.
//
// A wait made inside a hold (its context carries the hold: a Do's function,
// or ContextWithHold) is a wait of that holder. Such a wait, and only such a
// wait, is recorded (cycleRec): in the process, and, while it waits in the
// server, in the text of its statement (a comment naming the keys of the
// holds it waits for, which pg_stat_activity shows). While it waits, every
// deadlock_timeout it reads pg_locks and pg_stat_activity (one statement, on
// a connection of the Lock's pool or *sql.DB) and looks for a cycle through
// itself: a wait for a key leads to the sessions that hold it and are
// waiting themselves, and to the waits made on behalf of a hold of that key
// (by their comment, or by the process's own records, which also covers the
// waits in a Locker's key table that no server sees). A wait found in a
// cycle ends with ErrDeadlock.
//
// The graph itself, and who waits for whom in it, is package
// internal/waitgraph's; this file records the waits and feeds it.
//
// One wait of a cycle ends, not all: within the process the checks take
// turns (cycles.mu) and a wait that was ended no longer counts; across
// processes, of a cycle made only of waits in the server the one with the
// highest process ID ends, and another ends itself only if the cycle is
// still there two checks later (a victim that does not check).

// maxCycleTags bounds the holds a waiting statement names (its text is cut
// at track_activity_query_size, 1 kB by default, in pg_stat_activity).
const maxCycleTags = 24

// defaultCycleCheck is the first check's delay, until the server's
// deadlock_timeout is known (its default is 1 s).
const defaultCycleCheck = time.Second

// withoutHolds returns ctx without the holds it carries, for waits that are
// not to be checked for cycles (see Semaphore.waitAny); nested Do in it is
// not re-entrant either.
func withoutHolds(ctx context.Context) context.Context {
	if ctx.Value(holdsKey{}) == nil {
		return ctx
	}
	return noHoldsCtx{ctx}
}

// noHoldsCtx hides the holds of its parent.
type noHoldsCtx struct{ context.Context }

func (c noHoldsCtx) Value(key any) any {
	if key == (holdsKey{}) {
		return nil
	}
	return c.Context.Value(key)
}

// tagOf is k as pg_locks shows it.
func tagOf(k Key) waitgraph.Key {
	c, o, sub := k.LockTag()
	return waitgraph.Key{C: c, O: o, S: sub}
}

// cycleRec is a wait made inside a hold (see above). Its fields but pid are
// fixed once it is made, or guarded by cycles.mu.
type cycleRec struct {
	key       waitgraph.Key
	name      string // the key, as errors show it
	exclusive bool
	// tags are the holds of the wait's context (all of them: the comment
	// names maxCycleTags at most), and holds the contexts they came from,
	// to leave out those that end while the wait goes on (liveTags).
	tags    []waitgraph.Hold
	holds   []*holdCtx
	comment string // the statement's comment, from tags
	// pid is the server session that the wait waits on, 0 while none.
	pid    atomic.Int32
	cancel context.CancelCauseFunc
	rows   func(ctx context.Context, extra string) ([]waitgraph.Row, error)
	log    *slog.Logger
	// space is the lock table of the wait: nil for PostgreSQL, the
	// *memlock.Server of the in-memory double (whose waits are all in the
	// process, and never meet PostgreSQL's).
	space any

	// Guarded by cycles.mu.
	ended bool  // the wait ended a cycle (err says which)
	err   error // ErrDeadlock, with the cycle
	seen  int   // checks in a row that saw a cycle whose victim was another wait

	mu      sync.Mutex // guards timer, stopped and cctx
	timer   *time.Timer
	stopped bool
	cctx    context.CancelFunc // ends the check under way
	running sync.WaitGroup
}

// cycles is the process's record of waits made inside holds.
var cycles struct {
	mu   sync.Mutex
	recs map[*cycleRec]struct{}
	// every is the server's deadlock_timeout, as last read (0: not yet).
	every atomic.Int64
	// checks counts the checks made (tests wait for them).
	checks atomic.Int64
}

// cycleKey is the context key of a wait's cycleRec.
type cycleKey struct{}

// cycleRecOf returns the record of the wait that ctx is the context of.
func cycleRecOf(ctx context.Context) *cycleRec {
	r, _ := ctx.Value(cycleKey{}).(*cycleRec)
	return r
}

// spaceOf is the lock table of a Lock's domain (see cycleRec.space).
func spaceOf(domain any) any {
	if s, ok := domain.(*memlock.Session); ok {
		return s.Server()
	}
	return nil
}

// holdTags returns the holds that ctx carries (see holdCtx), live ones only,
// in the lock table space, innermost first, and the contexts they come
// from. A holdCtx of a Lock that was not held (ContextWithHold) carries no
// hold.
func holdTags(ctx context.Context, space any) ([]waitgraph.Hold, []*holdCtx) {
	var tags []waitgraph.Hold
	var holds []*holdCtx
	h, _ := ctx.Value(holdsKey{}).(*holdCtx)
	for h != nil {
		if h.live() && spaceOf(h.domain) == space {
			tags = append(tags, waitgraph.Hold{Key: tagOf(h.key), Exclusive: h.mode == Exclusive})
			holds = append(holds, h)
		}
		h, _ = h.Context.Value(holdsKey{}).(*holdCtx)
	}
	return tags, holds
}

// live reports whether h's hold is still held (not released, not lost).
func (h *holdCtx) live() bool { return h.gen != noHold && h.l.holdGen() == h.gen }

// liveTags returns r's tags whose holds are still held: a hold released or
// lost while r waits (ContextWithHold's context does not end with it) no
// longer closes a cycle.
func (r *cycleRec) liveTags() []waitgraph.Hold {
	var tags []waitgraph.Hold
	for i, h := range r.holds {
		if h.live() {
			tags = append(tags, r.tags[i])
		}
	}
	return tags
}

// watchCycles records a blocking acquire of l made inside a hold, and
// starts checking it for cycles; it returns ctx unchanged and a nil record
// for any other acquire (at the price of one context lookup). The acquire
// runs in the returned context, and calls stop when it returns.
func (l *Lock) watchCycles(ctx context.Context) (context.Context, *cycleRec) {
	if _, ok := ctx.Value(holdsKey{}).(*holdCtx); !ok {
		return ctx, nil
	}
	space := spaceOf(l.domain)
	tags, holds := holdTags(ctx, space)
	if len(tags) == 0 {
		return ctx, nil
	}
	r := &cycleRec{key: tagOf(l.key), name: l.key.String(), exclusive: l.cfg.mode == Exclusive, tags: tags, holds: holds, log: l.log, space: space}
	// The statement's text is cut at track_activity_query_size: it names
	// the innermost holds only.
	r.comment = waitgraph.Comment(tags[:min(len(tags), maxCycleTags)])
	r.rows = rowsOf(l.src)
	ctx, r.cancel = context.WithCancelCause(ctx)
	ctx = context.WithValue(ctx, cycleKey{}, r)
	cycles.mu.Lock()
	if cycles.recs == nil {
		cycles.recs = make(map[*cycleRec]struct{})
	}
	cycles.recs[r] = struct{}{}
	cycles.mu.Unlock()
	r.schedule()
	return ctx, r
}

// tagged returns sql with r's comment (when r is not nil), and the mode of
// execution that keeps such a statement out of pgx's statement cache (its
// text is made for one wait) with args after it.
func (r *cycleRec) tagged(sql string, args []any) (string, []any) {
	if r == nil {
		return sql, args
	}
	return sql + r.comment, append([]any{pgx.QueryExecModeExec}, args...)
}

// waitsOn records the server session that r's wait waits on now: its
// server pid, as pg_locks shows it (through a pooler, the pid of the
// session the connection claimed, not the pooler's).
func (r *cycleRec) waitsOn(conn *pgx.Conn) {
	if r == nil {
		return
	}
	pid := conn.PgConn().PID()
	if p := pooler.ProofOf(conn); p != nil {
		pid = p.PID()
	}
	r.pid.Store(int32(pid))
}

// schedule arms the next check.
func (r *cycleRec) schedule() {
	every := time.Duration(cycles.every.Load())
	if every <= 0 {
		every = defaultCycleCheck
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stopped {
		return
	}
	if r.timer == nil {
		r.timer = time.AfterFunc(every, r.check)
	} else {
		r.timer.Reset(every)
	}
}

// stop ends r's checks (waiting for one under way) and forgets r; it
// returns r's ErrDeadlock when r's wait was ended for a cycle.
func (r *cycleRec) stop() error {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	r.stopped = true
	if r.timer != nil {
		r.timer.Stop()
	}
	if r.cctx != nil {
		r.cctx()
	}
	r.mu.Unlock()
	r.running.Wait()
	r.cancel(nil)
	cycles.mu.Lock()
	defer cycles.mu.Unlock()
	delete(cycles.recs, r)
	return r.err
}

// check looks for a cycle through r's wait, ends the wait if it is the one
// to end (see above), and arms the next check otherwise.
func (r *cycleRec) check() {
	r.mu.Lock()
	if r.stopped {
		r.mu.Unlock()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	r.cctx = cancel
	r.running.Add(1)
	r.mu.Unlock()
	defer r.running.Done()
	defer cancel()
	cycles.checks.Add(1)

	var rows []waitgraph.Row
	if r.rows != nil {
		var err error
		if rows, err = r.rows(ctx, r.localKeys()); err != nil {
			if r.log != nil && ctx.Err() == nil {
				r.log.Debug("pglock: could not read pg_locks to look for a deadlock", slog.String("key", r.name), slog.Any("error", err))
			}
			r.schedule()
			return
		}
	}
	cycles.mu.Lock()
	g := newWaitGraph(rows, r.space, r.rows != nil)
	path := g.CycleThrough(r)
	end := false
	if path != nil {
		switch victim := waitgraph.Victim(path); {
		case victim == 0, victim == int64(r.pid.Load()), r.seen >= 2:
			// A cycle with a wait of this process that no server sees
			// (victim 0: only this process can end it, and its checks
			// take turns), or this wait is the victim, or the victim did
			// not end its wait in two checks of this one (it checked
			// once at least in that time, unless it does not check).
			end = true
		default:
			r.seen++
		}
	} else {
		r.seen = 0
	}
	if end {
		r.ended = true
		r.err = fmt.Errorf("%w: %s", ErrDeadlock, describeCycle(path))
	}
	cycles.mu.Unlock()
	if end {
		r.cancel(r.err)
		return
	}
	r.schedule()
}

// localKeys lists, for the query, the keys that the process's waits not in
// the server want ("c.o.s,..."), so that their holders are read too.
func (r *cycleRec) localKeys() string {
	cycles.mu.Lock()
	defer cycles.mu.Unlock()
	var b strings.Builder
	for w := range cycles.recs {
		if w.ended || w.pid.Load() != 0 || w.space != r.space {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%d.%d.%d", w.key.C, w.key.O, w.key.S)
	}
	return b.String()
}

// cycleSQL reads the advisory locks of the database that matter to a
// cycle: the requests that wait, the holds of keys that a request waits for
// or that a wait of the process wants ($1, "c.o.s,..."), and the text of
// each waiting statement; then one row (pid 0) with deadlock_timeout in ms.
// The holds of prepared transactions (pid NULL) are left out: they never
// wait.
const cycleSQL = `SELECT l.pid, l.classid::bigint, l.objid::bigint, l.objsubid::integer, l.mode = 'ExclusiveLock', l.granted,` +
	` CASE WHEN l.granted THEN '' ELSE coalesce(a.query, '') END` +
	` FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid AND NOT l.granted` +
	` WHERE l.locktype = 'advisory' AND l.pid IS NOT NULL AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())` +
	` AND (NOT l.granted OR (l.classid, l.objid, l.objsubid) IN (SELECT classid, objid, objsubid FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND NOT granted)` +
	` OR concat_ws('.', l.classid, l.objid, l.objsubid) = ANY (string_to_array($1::text, ',')))` +
	` UNION ALL SELECT 0, 0, 0, 0, false, false, (extract(epoch FROM current_setting('deadlock_timeout')::interval) * 1000)::bigint::text`

// rowsOf returns the function that runs cycleSQL on a connection of src
// other than the waiting one, or nil where there is none (a caller's
// connection or transaction: its holds and waits share one session, whose
// cycles the server sees).
func rowsOf(src source) func(ctx context.Context, extra string) ([]waitgraph.Row, error) {
	switch s := src.(type) {
	case *mux:
		return s.cycleRows
	case *pgxSource:
		if s.pool != nil {
			return func(ctx context.Context, extra string) ([]waitgraph.Row, error) { return poolRows(ctx, s.pool, extra) }
		}
	case *sqlSource:
		if s.db != nil {
			return func(ctx context.Context, extra string) ([]waitgraph.Row, error) { return sqlRows(ctx, s.db, extra) }
		}
	}
	return nil
}

// cycleRows runs cycleSQL on one of m's lock connections (the statement
// waits for no lock), else on the pool or *sql.DB.
func (m *mux) cycleRows(ctx context.Context, extra string) (rows []waitgraph.Row, err error) {
	if c := m.openSlot(); c != nil {
		op := connOp{Ctx: ctx, Bounded: true, Fn: func(conn *pgx.Conn) {
			if conn == nil {
				err = errConnGone
				return
			}
			var r pgx.Rows
			if r, err = conn.Query(context.Background(), cycleSQL, extra); err == nil {
				// Closed on every path: rows left open would keep the lock
				// connection busy, and its next statement would lose it.
				defer r.Close()
				rows, err = scanLockRows(r)
			}
		}}
		c.Do(&op)
		if err == nil {
			err = op.Err
		}
		return rows, err
	}
	if m.pool != nil {
		return poolRows(ctx, m.pool, extra)
	}
	if m.db != nil {
		return sqlRows(ctx, m.db, extra)
	}
	return nil, errConnGone
}

// openSlot returns an open lock connection of m, or nil.
func (m *mux) openSlot() *lockConn { return m.lc.OpenSlot() }

// poolAcquireWait is how long a check waits for a pool's connection before
// it opens one of its own: waits made inside holds often hold every
// connection of a small pool (a hold and a wait each).
const poolAcquireWait = 100 * time.Millisecond

// poolRows runs cycleSQL on a connection of pool, or on a connection of its
// own when the pool has none to spare.
func poolRows(ctx context.Context, pool *pgxpool.Pool, extra string) ([]waitgraph.Row, error) {
	actx, cancel := context.WithTimeout(ctx, poolAcquireWait)
	pc, err := pool.Acquire(actx)
	cancel()
	if err == nil {
		defer pc.Release()
		r, err := pc.Query(ctx, cycleSQL, extra)
		if err != nil {
			return nil, err
		}
		defer r.Close()
		return scanLockRows(r)
	}
	if ctx.Err() != nil {
		return nil, err
	}
	conn, err := pgx.ConnectConfig(ctx, pool.Config().ConnConfig.Copy())
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	r, err := conn.Query(ctx, cycleSQL, extra)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return scanLockRows(r)
}

// rowsScanner is pgx.Rows and *sql.Rows, as scanLockRows uses them.
type rowsScanner interface {
	Next() bool
	Scan(dest ...any) error
	Err() error
}

func scanLockRows(rows rowsScanner) ([]waitgraph.Row, error) {
	var out []waitgraph.Row
	for rows.Next() {
		var row waitgraph.Row
		var c, o int64
		var sub int32
		if err := rows.Scan(&row.PID, &c, &o, &sub, &row.Exclusive, &row.Granted, &row.Query); err != nil {
			return nil, err
		}
		row.Key = waitgraph.Key{C: uint32(c), O: uint32(o), S: int16(sub)}
		out = append(out, row)
	}
	return out, rows.Err()
}

// sqlRows runs cycleSQL on db (a check waits for one of its connections).
func sqlRows(ctx context.Context, db *sql.DB, extra string) ([]waitgraph.Row, error) {
	r, err := db.QueryContext(ctx, cycleSQL, extra)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return scanLockRows(r)
}

// newWaitGraph builds the graph of the lock table space from rows and the
// process's records (cycles.mu held); read: rows were read from the server.
// It also takes the server's deadlock_timeout from rows (the row of pid 0).
func newWaitGraph(rows []waitgraph.Row, space any, read bool) *waitgraph.Graph {
	ignore := make(map[int32]bool)
	var locals []waitgraph.Local
	for w := range cycles.recs {
		if w.space != space {
			continue
		}
		pid := w.pid.Load()
		if w.ended {
			if pid != 0 {
				ignore[pid] = true
			}
			continue
		}
		locals = append(locals, waitgraph.Local{PID: pid, Key: w.key, Exclusive: w.exclusive, Holds: w.liveTags(), Ref: w})
	}
	server := rows[:0:0]
	for _, row := range rows {
		if row.PID != 0 {
			server = append(server, row)
			continue
		}
		if ms, err := strconv.ParseInt(row.Query, 10, 64); err == nil && ms > 0 {
			cycles.every.Store(int64(max(time.Duration(ms)*time.Millisecond, 10*time.Millisecond)))
		}
	}
	return waitgraph.New(server, locals, ignore, read)
}

// describeCycle says what cycle is, for ErrDeadlock's message.
func describeCycle(cycle []*waitgraph.Node) string {
	var b strings.Builder
	fmt.Fprintf(&b, "a cycle of %d waits of holders, each waiting for what the next holds: this wait for key %s", len(cycle), keyOfTag(cycle[0].Key))
	for _, n := range cycle[1:] {
		fmt.Fprintf(&b, ", then a wait for key %s", keyOfTag(n.Key))
		if n.ID > 0 {
			fmt.Fprintf(&b, " (server process %d)", n.ID)
		}
	}
	b.WriteString(", which waits for this one")
	return b.String()
}

// keyOfTag is the key that pg_locks shows as t (see Key.LockTag).
func keyOfTag(t waitgraph.Key) Key {
	return Key{v: int64(uint64(t.C)<<32 | uint64(t.O)), pair: t.S == 2}
}
