package pglock

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock/internal/memlock"
	"github.com/pglockkit/kit/pglock/internal/pooler"
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
// One wait of a cycle ends, not all: within the process the checks take
// turns (cycles.mu) and a wait that was ended no longer counts; across
// processes, of a cycle made only of waits in the server the one with the
// highest process ID ends, and another ends itself only if the cycle is
// still there two checks later (a victim that does not check).

// cycleMark starts the comment of a waiting statement that names the holds
// it waits on behalf of: "/*pglock-for:classid.objid.objsubid.m,...*/",
// m "e" for an exclusive hold and "s" for a shared one.
const cycleMark = "/*pglock-for:"

// maxCycleTags bounds the holds a waiting statement names (its text is cut
// at track_activity_query_size, 1 kB by default, in pg_stat_activity).
const maxCycleTags = 24

// defaultCycleCheck is the first check's delay, until the server's
// deadlock_timeout is known (its default is 1 s).
const defaultCycleCheck = time.Second

// lockTag is a key as pg_locks shows it.
type lockTag struct {
	c, o uint32
	s    int16
}

func tagOf(k Key) lockTag {
	c, o, s := k.LockTag()
	return lockTag{c, o, s}
}

// holdTag is a hold that a wait is made on behalf of.
type holdTag struct {
	key       lockTag
	exclusive bool
}

// conflicts reports whether a request in mode exclusive (or shared) must
// wait for a hold (or request) in mode other.
func conflicts(exclusive, other bool) bool { return exclusive || other }

// cycleRec is a wait made inside a hold (see above). Its fields but pid are
// fixed once it is made, or guarded by cycles.mu.
type cycleRec struct {
	key       lockTag
	name      string // the key, as errors show it
	exclusive bool
	// tags are the holds of the wait's context (all of them: the comment
	// names maxCycleTags at most), and holds the contexts they came from,
	// to leave out those that end while the wait goes on (liveTags).
	tags    []holdTag
	holds   []*holdCtx
	comment string // the statement's comment, from tags
	// pid is the server session that the wait waits on, 0 while none.
	pid    atomic.Int32
	cancel context.CancelCauseFunc
	rows   func(ctx context.Context, extra string) ([]lockRow, error)
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
func holdTags(ctx context.Context, space any) ([]holdTag, []*holdCtx) {
	var tags []holdTag
	var holds []*holdCtx
	h, _ := ctx.Value(holdsKey{}).(*holdCtx)
	for h != nil {
		if h.live() && spaceOf(h.l.domain) == space {
			tags = append(tags, holdTag{tagOf(h.l.key), h.l.cfg.mode == Exclusive})
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
func (r *cycleRec) liveTags() []holdTag {
	var tags []holdTag
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
	r.comment = cycleComment(tags[:min(len(tags), maxCycleTags)])
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

// cycleComment is the comment of a waiting statement made on behalf of tags.
func cycleComment(tags []holdTag) string {
	var b strings.Builder
	b.WriteString(" " + cycleMark)
	for i, t := range tags {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%d.%d.%d.", t.key.c, t.key.o, t.key.s)
		if t.exclusive {
			b.WriteByte('e')
		} else {
			b.WriteByte('s')
		}
	}
	b.WriteString("*/")
	return b.String()
}

// parseCycleComment returns the holds that a waiting statement's text names
// (see cycleComment).
func parseCycleComment(q string) []holdTag {
	i := strings.Index(q, cycleMark)
	if i < 0 {
		return nil
	}
	q = q[i+len(cycleMark):]
	end := strings.Index(q, "*/")
	if end < 0 {
		return nil // cut short
	}
	var tags []holdTag
	for f := range strings.SplitSeq(q[:end], ",") {
		p := strings.Split(f, ".")
		if len(p) != 4 {
			continue
		}
		c, err1 := strconv.ParseUint(p[0], 10, 32)
		o, err2 := strconv.ParseUint(p[1], 10, 32)
		s, err3 := strconv.ParseInt(p[2], 10, 16)
		if err1 != nil || err2 != nil || err3 != nil || (p[3] != "e" && p[3] != "s") {
			continue
		}
		tags = append(tags, holdTag{lockTag{uint32(c), uint32(o), int16(s)}, p[3] == "e"})
	}
	return tags
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

	var rows []lockRow
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
	path := g.cycleThrough(r)
	end := false
	if path != nil {
		switch victim := g.victim(path); {
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
		r.err = fmt.Errorf("%w: %s", ErrDeadlock, g.describe(path))
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
		fmt.Fprintf(&b, "%d.%d.%d", w.key.c, w.key.o, w.key.s)
	}
	return b.String()
}

// lockRow is a row of cycleSQL.
type lockRow struct {
	pid       int32
	key       lockTag
	exclusive bool
	granted   bool
	query     string
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
func rowsOf(src source) func(ctx context.Context, extra string) ([]lockRow, error) {
	switch s := src.(type) {
	case *mux:
		return s.cycleRows
	case *pgxSource:
		if s.pool != nil {
			return func(ctx context.Context, extra string) ([]lockRow, error) { return poolRows(ctx, s.pool, extra) }
		}
	case *sqlSource:
		if s.db != nil {
			return func(ctx context.Context, extra string) ([]lockRow, error) { return sqlRows(ctx, s.db, extra) }
		}
	}
	return nil
}

// cycleRows runs cycleSQL on one of m's lock connections (the statement
// waits for no lock), else on the pool or *sql.DB.
func (m *mux) cycleRows(ctx context.Context, extra string) (rows []lockRow, err error) {
	if c := m.openSlot(); c != nil {
		op := connOp{ctx: ctx, bounded: true, fn: func(conn *pgx.Conn) {
			if conn == nil {
				err = errConnGone
				return
			}
			var r pgx.Rows
			if r, err = conn.Query(context.Background(), cycleSQL, extra); err == nil {
				rows, err = scanLockRows(r)
			}
		}}
		c.do(&op)
		if err == nil {
			err = op.err
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
func (m *mux) openSlot() *lockConn {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range m.slots {
		if s != nil && !s.isDead() && s.hasConn() {
			return s
		}
	}
	return nil
}

// poolAcquireWait is how long a check waits for a pool's connection before
// it opens one of its own: waits made inside holds often hold every
// connection of a small pool (a hold and a wait each).
const poolAcquireWait = 100 * time.Millisecond

// poolRows runs cycleSQL on a connection of pool, or on a connection of its
// own when the pool has none to spare.
func poolRows(ctx context.Context, pool *pgxpool.Pool, extra string) ([]lockRow, error) {
	actx, cancel := context.WithTimeout(ctx, poolAcquireWait)
	pc, err := pool.Acquire(actx)
	cancel()
	if err == nil {
		defer pc.Release()
		r, err := pc.Query(ctx, cycleSQL, extra)
		if err != nil {
			return nil, err
		}
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
	return scanLockRows(r)
}

// rowsScanner is pgx.Rows and *sql.Rows, as scanLockRows uses them.
type rowsScanner interface {
	Next() bool
	Scan(dest ...any) error
	Err() error
}

func scanLockRows(rows rowsScanner) ([]lockRow, error) {
	var out []lockRow
	for rows.Next() {
		var row lockRow
		var c, o int64
		var s int32
		if err := rows.Scan(&row.pid, &c, &o, &s, &row.exclusive, &row.granted, &row.query); err != nil {
			return nil, err
		}
		row.key = lockTag{uint32(c), uint32(o), int16(s)}
		out = append(out, row)
	}
	return out, rows.Err()
}

// sqlRows runs cycleSQL on db (a check waits for one of its connections).
func sqlRows(ctx context.Context, db *sql.DB, extra string) ([]lockRow, error) {
	r, err := db.QueryContext(ctx, cycleSQL, extra)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return scanLockRows(r)
}

// waitNode is a wait of the graph: a session waiting in the server (id its
// process ID) or a wait of this process that no server sees (id < 0).
type waitNode struct {
	id        int64
	key       lockTag
	exclusive bool
	tags      []holdTag
	rec       *cycleRec // this process's record of it, if any
}

type holder struct {
	pid       int32
	exclusive bool
}

// waitGraph is who waits for whom, from cycleSQL's rows and the process's
// records. cycles.mu must be held while it is used.
type waitGraph struct {
	nodes   map[int64]*waitNode
	holders map[lockTag][]holder
}

// newWaitGraph builds the graph of the lock table space. It also takes
// the server's deadlock_timeout from rows. read says that rows were read
// from the server: then a record of a wait in the server (pid set) that
// rows do not show waits in another database or server (or its wait is
// over, or not yet sent), and is left out.
func newWaitGraph(rows []lockRow, space any, read bool) *waitGraph {
	g := &waitGraph{nodes: make(map[int64]*waitNode), holders: make(map[lockTag][]holder)}
	ended := make(map[int32]bool)
	for w := range cycles.recs {
		if w.ended && w.space == space {
			if pid := w.pid.Load(); pid != 0 {
				ended[pid] = true
			}
		}
	}
	for _, row := range rows {
		switch {
		case row.pid == 0:
			if ms, err := strconv.ParseInt(row.query, 10, 64); err == nil && ms > 0 {
				cycles.every.Store(int64(max(time.Duration(ms)*time.Millisecond, 10*time.Millisecond)))
			}
		case row.granted:
			g.holders[row.key] = append(g.holders[row.key], holder{row.pid, row.exclusive})
		case !ended[row.pid]:
			g.nodes[int64(row.pid)] = &waitNode{id: int64(row.pid), key: row.key, exclusive: row.exclusive, tags: parseCycleComment(row.query)}
		}
	}
	next := int64(-1)
	for w := range cycles.recs {
		if w.ended || w.space != space {
			continue
		}
		pid := w.pid.Load()
		if n, ok := g.nodes[int64(pid)]; ok && n.key == w.key {
			// The process's own record is the truth of its holds: the
			// comment may be cut, and names holds that may have ended.
			n.rec = w
			n.tags = w.liveTags()
			continue
		}
		if pid != 0 && read {
			continue
		}
		g.nodes[next] = &waitNode{id: next, key: w.key, exclusive: w.exclusive, tags: w.liveTags(), rec: w}
		next--
	}
	return g
}

// edges returns the waits that n waits for: sessions that hold n's key in a
// conflicting mode and wait themselves, and waits made on behalf of a
// conflicting hold of n's key.
func (g *waitGraph) edges(n *waitNode) []int64 {
	var out []int64
	for _, h := range g.holders[n.key] {
		if int64(h.pid) != n.id && conflicts(n.exclusive, h.exclusive) {
			if _, waits := g.nodes[int64(h.pid)]; waits {
				out = append(out, int64(h.pid))
			}
		}
	}
	for id, x := range g.nodes {
		if id == n.id {
			continue
		}
		for _, t := range x.tags {
			if t.key == n.key && conflicts(n.exclusive, t.exclusive) {
				out = append(out, id)
				break
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// nodeOf returns r's node, nil when r's wait is not in the graph.
func (g *waitGraph) nodeOf(r *cycleRec) *waitNode {
	for _, n := range g.nodes {
		if n.rec == r {
			return n
		}
	}
	return nil
}

// cycleThrough returns a cycle of waits through r's (r's node first), or
// nil.
func (g *waitGraph) cycleThrough(r *cycleRec) []*waitNode {
	start := g.nodeOf(r)
	if start == nil {
		return nil
	}
	// Depth first, each node once: a path back to start is a cycle.
	seen := map[int64]bool{start.id: true}
	var walk func(n *waitNode, path []*waitNode) []*waitNode
	walk = func(n *waitNode, path []*waitNode) []*waitNode {
		for _, id := range g.edges(n) {
			if id == start.id {
				return path
			}
			if seen[id] {
				continue
			}
			seen[id] = true
			x := g.nodes[id]
			if found := walk(x, append(path, x)); found != nil {
				return found
			}
		}
		return nil
	}
	return walk(start, []*waitNode{start})
}

// victim returns the wait of path that is to end: 0 when path has a wait
// of this process that no server sees (then the checking wait ends), else
// the highest process ID among the waits made on behalf of holds.
func (g *waitGraph) victim(path []*waitNode) int64 {
	var v int64
	for _, n := range path {
		if n.id < 0 {
			return 0
		}
		if len(n.tags) > 0 && n.id > v {
			v = n.id
		}
	}
	return v
}

// describe says what the cycle of path is, for ErrDeadlock's message.
func (g *waitGraph) describe(path []*waitNode) string {
	var b strings.Builder
	fmt.Fprintf(&b, "a cycle of %d waits of holders, each waiting for what the next holds: this wait for key %s", len(path), keyOfTag(path[0].key))
	for _, n := range path[1:] {
		fmt.Fprintf(&b, ", then a wait for key %s", keyOfTag(n.key))
		if n.id > 0 {
			fmt.Fprintf(&b, " (server process %d)", n.id)
		}
	}
	b.WriteString(", which waits for this one")
	return b.String()
}

// keyOfTag is the key that pg_locks shows as t (see Key.LockTag).
func keyOfTag(t lockTag) Key {
	return Key{v: int64(uint64(t.c)<<32 | uint64(t.o)), pair: t.s == 2}
}
