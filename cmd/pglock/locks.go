package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock"
)

const locksUsage = `usage: pglock locks [--json] [--key NAME ...] [--watch [--interval D]]
                    [--database-url URL]

Locks lists every advisory lock of the current database, held or waited
for, from pg_locks joined with pg_stat_activity: the key, its mode, whether
it is held or waited for, the session's pid, application_name and client
address, since when, and who waits behind whom (pg_blocking_pids). Below
the table, it counts the advisory locks of the whole server against the
size of its lock table, and warns when the table is more than half full.

	--json       print a JSON array instead of a table (with --watch, one
	             JSON object per line and snapshot; see below)
	--key NAME   list only the key that NAME maps to (as "pglock key NAME"
	             prints it), labelled with NAME; give --key once per name.
	             NAME is hashed as it is: include an adapter's namespace
	             (e.g. "cron:NAME")
	--watch      refresh until interrupted (Ctrl-C, SIGTERM: status 0)
	--interval D time between refreshes with --watch, from 100ms to 1h
	             (default 1s)

APPLICATION is the session's application_name. The session of a pglock
Leader, leading or campaigning, carries the Leader's identity there (by
default its host name and process id, "host-1:4242"): the holder of a
Leader's key is the replica that leads.

A key of the bigint space is shown as one number, a key of the (integer,
integer) space as "a,b". SINCE is when the wait began for a waiting session;
for a holder, when its current transaction began, or if it is not in one,
when its connection began: PostgreSQL does not record when a lock was
granted. QUEUE says which pids a waiting session waits for ("behind"), and
which pids wait for a holder ("blocks").

With --watch, the table has two more columns: SESSION, the session's
pg_stat_activity.state (active, idle, idle in transaction...), and QUERY,
the statement a waiting session runs, on one line and cut at 100
characters; SINCE and QUEUE come before the session's columns. At a
terminal, it redraws in place, cut to the terminal's width and height;
otherwise each snapshot is printed whole after a line with its time, and a
blank line separates snapshots. With --watch --json, each line is one
snapshot: {"time": ..., "locks": [...], "health": {...}}; the lock table's
health is in those objects only, as --json without --watch prints the
array of locks alone.

The lock-table line counts the advisory locks of every database of the
server, held or waited for (the advisory rows of pg_locks: one per holder
and per waiter), against max_locks_per_transaction * (max_connections +
max_prepared_transactions), the size that PostgreSQL documents for its
shared lock table (it reserves at least that much). That table is shared
by every database and session and sized when the server starts: when
advisory locks fill it, every session of the server that needs one more
lock fails with "out of shared memory", ordinary queries included, until
locks are released or max_locks_per_transaction is raised (a restart).
`

// lockEntry is one row of pg_locks for an advisory lock; its JSON form is
// the output of "pglock locks --json".
type lockEntry struct {
	Key             string     `json:"key"`             // "-6248023315878667354", or "1,2" for a pair key
	Int64           *int64     `json:"int64,omitempty"` // the bigint key (objsubid 1)
	Pair            *[2]int32  `json:"pair,omitempty"`  // the (integer, integer) key (objsubid 2)
	Name            string     `json:"name,omitempty"`  // the --key NAME that maps to it
	ClassID         uint32     `json:"classid"`
	ObjID           uint32     `json:"objid"`
	ObjSubID        int16      `json:"objsubid"`
	Mode            string     `json:"mode"` // "exclusive" or "shared"
	Granted         bool       `json:"granted"`
	PID             int32      `json:"pid"` // 0 for a prepared transaction
	ApplicationName string     `json:"application_name"`
	User            string     `json:"user,omitempty"`
	ClientAddr      string     `json:"client_addr,omitempty"` // "" for a Unix socket or when hidden
	ClientPort      *int32     `json:"client_port,omitempty"` // -1 for a Unix socket
	State           string     `json:"state,omitempty"`
	BackendStart    *time.Time `json:"backend_start,omitempty"`
	XactStart       *time.Time `json:"xact_start,omitempty"`
	QueryStart      *time.Time `json:"query_start,omitempty"`
	WaitStart       *time.Time `json:"wait_start,omitempty"`
	Since           *time.Time `json:"since,omitempty"`
	BlockedBy       []int32    `json:"blocked_by"`      // pids a waiting session waits for
	Waiters         []int32    `json:"waiters"`         // pids that wait for this session on this key
	Query           string     `json:"query,omitempty"` // the statement of a waiting session

	now time.Time // the server's time of the query
}

// locksQuery lists the advisory locks of the current database. waitstart
// (PostgreSQL 14+) is read through to_jsonb so that older servers answer
// NULL instead of failing. pg_blocking_pids and the query are asked only
// for waiters. The rows of pg_locks are taken once each (DISTINCT):
// YugabyteDB's pg_locks can show one lock twice.
const locksQuery = `
SELECT l.classid::int8, l.objid::int8, l.objsubid::int2, l.mode, l.granted,
       coalesce(l.pid, 0), coalesce(a.application_name, ''), coalesce(a.usename::text, ''),
       coalesce(host(a.client_addr), ''), a.client_port, coalesce(a.state, ''),
       a.backend_start, a.xact_start, a.query_start,
       l.waitstart,
       CASE WHEN l.granted OR l.pid IS NULL THEN NULL ELSE pg_catalog.pg_blocking_pids(l.pid) END,
       pg_catalog.statement_timestamp(),
       CASE WHEN l.granted THEN '' ELSE coalesce(a.query, '') END
FROM (SELECT DISTINCT l0.classid, l0.objid, l0.objsubid, l0.mode, l0.granted, l0.pid,
             (pg_catalog.to_jsonb(l0) ->> 'waitstart')::timestamptz AS waitstart
      FROM pg_catalog.pg_locks l0
      WHERE l0.locktype = 'advisory'
        AND l0.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())) l
LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
ORDER BY l.objsubid, l.classid, l.objid, l.granted DESC, 15 NULLS FIRST, l.pid`

// Bounds of --interval: pg_locks is read at every refresh, and reading it
// takes every lock-manager partition's lock in turn, so a busy server should
// not be polled much faster; an hour is already a log, not a view.
const (
	defaultWatchInterval = time.Second
	minWatchInterval     = 100 * time.Millisecond
	maxWatchInterval     = time.Hour
)

func (c *cli) locksCommand(ctx context.Context, url string, args []string) int {
	fset := flag.NewFlagSet("locks", flag.ContinueOnError)
	fset.StringVar(&url, "database-url", url, "PostgreSQL connection URL or DSN")
	asJSON := fset.Bool("json", false, "print JSON")
	var names []string
	fset.Func("key", "list only the key NAME maps to (repeatable)", func(s string) error {
		names = append(names, s)
		return nil
	})
	watch := fset.Bool("watch", false, "refresh until interrupted")
	interval := fset.Duration("interval", defaultWatchInterval, "time between refreshes with --watch")
	if code, done := c.parse(fset, args, locksUsage); done {
		return code
	}
	if fset.NArg() > 0 {
		return c.usageError("locks", "unexpected argument %q (use --key NAME to name a key)", fset.Arg(0))
	}
	intervalSet := false
	fset.Visit(func(f *flag.Flag) { intervalSet = intervalSet || f.Name == "interval" })
	switch {
	case intervalSet && !*watch:
		return c.usageError("locks", "--interval needs --watch")
	case *interval < minWatchInterval || *interval > maxWatchInterval:
		return c.usageError("locks", "--interval %v: must be from 100ms to 1h", *interval)
	}
	byKey, err := keyNames(names)
	if err != nil {
		return c.usageError("locks", "--key: %v", err)
	}
	q := locksQuerier{byKey: byKey, filter: len(names) > 0}
	if *watch {
		return c.watchLocks(ctx, url, q, *interval, *asJSON)
	}
	ictx, stop := c.interruptible(ctx)
	defer stop()
	var (
		entries []*lockEntry
		health  *lockHealth
	)
	pool, err := connect(ictx, url)
	if err == nil {
		entries, err = q.locks(ictx, pool)
		if err == nil && !*asJSON {
			health, err = readLockHealth(ictx, pool)
		}
		pool.Close()
	}
	if err != nil {
		if s := stop(); s != nil {
			return c.fail(signalStatus(s), "locks", "%v", s)
		}
		return c.fail(exitUsage, "locks", "%v", err)
	}
	if *asJSON {
		err = writeLocksJSON(c.stdout, entries)
	} else if err = writeLocksTable(c.stdout, entries); err == nil {
		err = writeLockHealth(c.stdout, health)
	}
	if err != nil {
		return c.fail(exitUsage, "locks", "%v", err)
	}
	return exitOK
}

// keyNames maps the key of each name to the name; the first name of a key
// wins.
func keyNames(names []string) (map[int64]string, error) {
	byKey := map[int64]string{}
	for _, n := range slices.Backward(names) {
		k, err := pglock.KeyOf(n)
		if err != nil {
			return nil, err
		}
		byKey[k.Int64()] = n
	}
	return byKey, nil
}

// locksQuerier reads the advisory locks of the database, each labelled
// with its name in byKey; with filter, only those of byKey's keys.
type locksQuerier struct {
	byKey  map[int64]string
	filter bool
}

func (q locksQuerier) locks(ctx context.Context, pool *pgxpool.Pool) ([]*lockEntry, error) {
	rows, err := pool.Query(ctx, locksQuery)
	if err != nil {
		return nil, err
	}
	entries, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (*lockEntry, error) {
		var (
			e              lockEntry
			classid, objid int64
			mode           string
		)
		err := r.Scan(&classid, &objid, &e.ObjSubID, &mode, &e.Granted,
			&e.PID, &e.ApplicationName, &e.User, &e.ClientAddr, &e.ClientPort, &e.State,
			&e.BackendStart, &e.XactStart, &e.QueryStart, &e.WaitStart, &e.BlockedBy, &e.now, &e.Query)
		e.ClassID, e.ObjID = uint32(classid), uint32(objid)
		e.Mode = modeName(mode)
		return &e, err
	})
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		e.fill(q.byKey)
	}
	linkWaiters(entries)
	if q.filter {
		entries = slices.DeleteFunc(entries, func(e *lockEntry) bool { return e.Name == "" })
	}
	return entries, nil
}

// fill sets the key's forms, its name and since.
func (e *lockEntry) fill(byKey map[int64]string) {
	switch e.ObjSubID {
	case 2:
		k := pglock.Int32PairKey(int32(e.ClassID), int32(e.ObjID))
		e.Key, e.Pair = k.String(), &[2]int32{int32(e.ClassID), int32(e.ObjID)}
	default:
		v := int64(uint64(e.ClassID)<<32 | uint64(e.ObjID))
		e.Key, e.Int64 = strconv.FormatInt(v, 10), &v
		e.Name = byKey[v]
	}
	switch {
	case !e.Granted && e.WaitStart != nil:
		e.Since = e.WaitStart
	case !e.Granted:
		e.Since = e.QueryStart // the statement that waits
	case e.XactStart != nil:
		e.Since = e.XactStart
	default:
		e.Since = e.BackendStart
	}
	if e.BlockedBy == nil {
		e.BlockedBy = []int32{}
	}
	e.Waiters = []int32{}
}

// linkWaiters fills each entry's waiters: the waiting sessions on the same
// key that pg_blocking_pids says wait for it.
func linkWaiters(entries []*lockEntry) {
	for _, w := range entries {
		for _, p := range w.BlockedBy {
			for _, h := range entries {
				if h != w && h.PID == p && h.sameKey(w) && !slices.Contains(h.Waiters, w.PID) {
					h.Waiters = append(h.Waiters, w.PID)
				}
			}
		}
	}
}

func (e *lockEntry) sameKey(o *lockEntry) bool {
	return e.ClassID == o.ClassID && e.ObjID == o.ObjID && e.ObjSubID == o.ObjSubID
}

func modeName(m string) string {
	switch m {
	case "ExclusiveLock":
		return "exclusive"
	case "ShareLock":
		return "shared"
	}
	return m
}

func writeLocksJSON(w io.Writer, entries []*lockEntry) error {
	if entries == nil {
		entries = []*lockEntry{}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(entries)
}

func writeLocksTable(w io.Writer, entries []*lockEntry) error {
	return writeLocksColumns(w, entries, false)
}

// maxQueryLen is where the QUERY column cuts a statement (in runes); a
// terminal cuts it further, at its width.
const maxQueryLen = 100

// writeLocksColumns writes the table of entries; wide (--watch) adds the
// columns SESSION (pg_stat_activity.state) and QUERY (a waiter's
// statement, on one line, cut at maxQueryLen), and puts SINCE and QUEUE
// before the columns of the session, as a terminal cuts lines at its
// width.
func writeLocksColumns(w io.Writer, entries []*lockEntry, wide bool) error {
	if len(entries) == 0 {
		_, err := fmt.Fprintln(w, "no advisory locks in this database")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if wide {
		fmt.Fprintln(tw, "KEY\tNAME\tMODE\tSTATE\tPID\tSINCE\tQUEUE\tSESSION\tAPPLICATION\tCLIENT\tQUERY")
	} else {
		fmt.Fprintln(tw, "KEY\tNAME\tMODE\tSTATE\tPID\tAPPLICATION\tCLIENT\tSINCE\tQUEUE")
	}
	for _, e := range entries {
		state := "held"
		if !e.Granted {
			state = "waiting"
		}
		if wide {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
				e.Key, orDash(printable(e.Name)), e.Mode, state, pidText(e.PID),
				orDash(e.since()), orDash(e.queue()), orDash(e.State),
				orDash(printable(e.ApplicationName)), orDash(e.client()), orDash(queryText(e.Query, maxQueryLen)))
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			e.Key, orDash(printable(e.Name)), e.Mode, state, pidText(e.PID),
			orDash(printable(e.ApplicationName)), orDash(e.client()), orDash(e.since()), orDash(e.queue()))
	}
	return tw.Flush()
}

// queryText puts a statement on one line for a table cell: runs of white
// space become one space, other control characters (a terminal's escape
// sequences) "?", and it is cut to limit runes, "..." included.
func queryText(q string, limit int) string {
	q = strings.Join(strings.Fields(q), " ")
	q = strings.Map(func(r rune) rune {
		if !unicode.IsPrint(r) {
			return '?'
		}
		return r
	}, q)
	if utf8.RuneCountInString(q) <= limit {
		return q
	}
	r := []rune(q)
	return string(r[:limit-3]) + "..."
}

func (e *lockEntry) client() string {
	switch {
	case e.ClientAddr != "" && e.ClientPort != nil:
		return net.JoinHostPort(e.ClientAddr, strconv.Itoa(int(*e.ClientPort)))
	case e.ClientAddr != "":
		return e.ClientAddr
	case e.ClientPort != nil && *e.ClientPort == -1:
		return "local"
	}
	return ""
}

func (e *lockEntry) since() string {
	if e.Since == nil {
		return ""
	}
	return formatAge(e.now.Sub(*e.Since)) + " ago"
}

func (e *lockEntry) queue() string {
	var parts []string
	if len(e.BlockedBy) > 0 {
		parts = append(parts, "behind "+pidList(e.BlockedBy))
	}
	if len(e.Waiters) > 0 {
		parts = append(parts, "blocks "+pidList(e.Waiters))
	}
	return strings.Join(parts, "; ")
}

func pidText(pid int32) string {
	if pid == 0 {
		return "prepared"
	}
	return strconv.Itoa(int(pid))
}

func pidList(pids []int32) string {
	s := make([]string, len(pids))
	for i, p := range pids {
		s[i] = strconv.Itoa(int(p))
	}
	return strings.Join(s, ",")
}

// formatAge writes d for a reader: 0.4s, 12.3s, 4m05s, 3h02m, 2d05h.
func formatAge(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	switch {
	case d < time.Minute:
		return strconv.FormatFloat(d.Seconds(), 'f', 1, 64) + "s"
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d/time.Minute), int(d%time.Minute/time.Second))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d/time.Hour), int(d%time.Hour/time.Minute))
	default:
		return fmt.Sprintf("%dd%02dh", int(d/(24*time.Hour)), int(d%(24*time.Hour)/time.Hour))
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// printable quotes s when it would break the table's columns.
func printable(s string) string {
	if strings.ContainsFunc(s, func(r rune) bool { return r <= ' ' || r == 0x7f || !strconv.IsPrint(r) }) {
		return strconv.Quote(s)
	}
	return s
}
