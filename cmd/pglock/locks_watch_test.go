package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// queuedKey is a key that a test holds on one pool while a second pool
// waits for it.
type queuedKey struct {
	watch                *pgxpool.Pool
	name                 string
	key                  pglock.Key
	holderPID, waiterPID int32
}

// holdAndQueue takes name's lock on one pool (pglock.New on pgtest.Pool)
// and queues a waiter on another; both end with the test, the waiter's
// Acquire cancelled (and checked) first.
func holdAndQueue(t *testing.T) *queuedKey {
	t.Helper()
	q := &queuedKey{watch: pgtest.Pool(t, 2), name: pgtest.UniqueKey(t)}
	q.key = keyOf(t, q.name)
	_, q.holderPID = holder(t, q.watch, q.name)
	waiting, err := pglock.NewLock(pgtest.Pool(t, 2), q.name)
	if err != nil {
		t.Fatal(err)
	}
	waitCtx, stopWaiting := context.WithCancel(context.Background())
	waitErr := make(chan error, 1)
	go func() { waitErr <- waiting.Acquire(waitCtx) }()
	t.Cleanup(func() {
		stopWaiting()
		if err := <-waitErr; !errors.Is(err, pglock.ErrNotAcquired) {
			t.Errorf("waiter's Acquire = %v, want ErrNotAcquired", err)
		}
	})
	q.waiterPID = waitWaiter(t, q.watch, q.key).PID
	return q
}

func (q *queuedKey) pids() (holder, waiter string) {
	return strconv.Itoa(int(q.holderPID)), strconv.Itoa(int(q.waiterPID))
}

// lockTableCapacity computes the lock table's size from the server's
// settings.
func lockTableCapacity(t *testing.T, db *pgxpool.Pool) int64 {
	t.Helper()
	var n int64
	err := db.QueryRow(context.Background(), `SELECT current_setting('max_locks_per_transaction')::int8 *
		(current_setting('max_connections')::int8 + current_setting('max_prepared_transactions')::int8)`).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

var healthLine = regexp.MustCompile(`(?m)^advisory locks, all databases: ([0-9,]+) of ([0-9,]+) lock-table slots \(([0-9.]+)%\)$`)

// checkHealthLine checks the lock-table line of out: at least atLeast
// locks, of the server's capacity.
func checkHealthLine(t *testing.T, out string, atLeast, capacity int64) {
	t.Helper()
	m := healthLine.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no lock-table line in:\n%s", out)
	}
	n, _ := strconv.ParseInt(strings.ReplaceAll(m[1], ",", ""), 10, 64)
	c, _ := strconv.ParseInt(strings.ReplaceAll(m[2], ",", ""), 10, 64)
	if n < atLeast || c != capacity {
		t.Fatalf("lock-table line %q: want at least %d locks of %d slots", m[0], atLeast, capacity)
	}
}

// runningCommand is pglock run in-process, in the background, with output
// the test can read while it runs.
type runningCommand struct {
	stdout, stderr syncBuffer
	signals        chan os.Signal
	cancel         context.CancelFunc
	code           chan int
}

func startCommand(t *testing.T, args ...string) *runningCommand {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &runningCommand{signals: make(chan os.Signal, 1), cancel: cancel, code: make(chan int, 1)}
	go func() { r.code <- run(ctx, args, &r.stdout, &r.stderr, r.signals) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.code:
		case <-time.After(20 * time.Second):
			t.Errorf("pglock %q did not return", args)
		}
	})
	return r
}

// waitCount waits until s occurs n times in the command's output.
func (r *runningCommand) waitCount(t *testing.T, s string, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for strings.Count(r.stdout.String(), s) < n {
		select {
		case code := <-r.code:
			r.code <- code
			t.Fatalf("pglock returned %d before printing %q %d times: stdout %q, stderr %q", code, s, n, r.stdout.String(), r.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("pglock did not print %q %d times within 20s: %q", s, n, r.stdout.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (r *runningCommand) wait(t *testing.T) int {
	t.Helper()
	select {
	case code := <-r.code:
		r.code <- code // for the cleanup
		return code
	case <-time.After(20 * time.Second):
		t.Fatal("pglock did not return within 20s")
		return -1
	}
}

// pglock locks --watch, not at a terminal, prints whole snapshots one
// after another (a time line first, a blank line between them) until
// SIGINT, and exits 0; --json prints one snapshot per line; the table
// without --watch ends with the lock table's health.
func TestLocksWatch(t *testing.T) {
	t.Parallel()
	q := holdAndQueue(t)
	hp, wp := q.pids()
	capacity := lockTableCapacity(t, q.watch)

	t.Run("plain", func(t *testing.T) {
		t.Parallel()
		r := startCommand(t, "locks", "--watch", "--interval", "200ms", "--key", q.name)
		r.waitCount(t, "lock-table slots", 3)
		r.signals <- os.Interrupt
		if code := r.wait(t); code != exitOK || r.stderr.String() != "" {
			t.Fatalf("pglock locks --watch after SIGINT = %d, stderr %q; want 0", code, r.stderr.String())
		}
		out := r.stdout.String()
		header := regexp.MustCompile(`(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \S+  pglock locks --watch, every 200ms$`)
		starts := header.FindAllStringIndex(out, -1)
		if len(starts) < 3 || starts[0][0] != 0 {
			t.Fatalf("want 3 or more snapshots, each after its time:\n%s", out)
		}
		for i, s := range starts {
			end := len(out)
			if i+1 < len(starts) {
				end = starts[i+1][0]
				if !strings.HasSuffix(out[:end], "\n\n") {
					t.Fatalf("snapshot %d is not followed by a blank line:\n%s", i, out)
				}
			}
			snap := out[s[0]:end]
			if h := strings.Join(strings.Fields(strings.Split(snap, "\n")[2]), " "); h !=
				"KEY NAME MODE STATE PID SINCE QUEUE SESSION APPLICATION CLIENT QUERY" {
				t.Fatalf("snapshot %d's header = %q", i, h)
			}
			lineWith(t, snap, q.key.String(), q.name, "exclusive", "held", hp, "blocks", wp)
			w := strings.Join(lineWith(t, snap, q.key.String(), q.name, "exclusive", "waiting", wp, "behind", hp, "active"), " ")
			if !strings.Contains(w, "pg_advisory") {
				t.Fatalf("the waiter's line shows no query: %q", w)
			}
			checkHealthLine(t, snap, 2, capacity)
		}
	})

	t.Run("json", func(t *testing.T) {
		t.Parallel()
		r := startCommand(t, "locks", "--watch", "--json", "--interval", "200ms", "--key", q.name)
		r.waitCount(t, "\n", 3)
		r.cancel() // as SIGTERM
		if code := r.wait(t); code != exitOK || r.stderr.String() != "" {
			t.Fatalf("pglock locks --watch --json after SIGTERM = %d, stderr %q; want 0", code, r.stderr.String())
		}
		lines := strings.Split(strings.TrimSuffix(r.stdout.String(), "\n"), "\n")
		if len(lines) < 3 {
			t.Fatalf("want 3 or more JSON lines: %q", r.stdout.String())
		}
		var last time.Time
		for _, l := range lines {
			var s struct {
				Time   time.Time   `json:"time"`
				Locks  []lockEntry `json:"locks"`
				Health *lockHealth `json:"health"`
			}
			if err := json.Unmarshal([]byte(l), &s); err != nil {
				t.Fatalf("line %q: %v", l, err)
			}
			if !s.Time.After(last) || len(s.Locks) != 2 || s.Health == nil {
				t.Fatalf("snapshot %s", l)
			}
			last = s.Time
			h, w := s.Locks[0], s.Locks[1]
			if !h.Granted || h.PID != q.holderPID || len(h.Waiters) != 1 || h.Waiters[0] != q.waiterPID || h.Name != q.name || h.Query != "" ||
				w.Granted || w.PID != q.waiterPID || len(w.BlockedBy) != 1 || w.BlockedBy[0] != q.holderPID || !strings.Contains(w.Query, "pg_advisory") {
				t.Fatalf("snapshot's locks: %s", l)
			}
			if s.Health.AdvisoryLocks < 2 || s.Health.Capacity != capacity ||
				s.Health.MaxLocksPerTransaction*(s.Health.MaxConnections+s.Health.MaxPreparedTransactions) != capacity || s.Health.Warning != "" {
				t.Fatalf("snapshot's health = %+v, want at least 2 locks of %d", s.Health, capacity)
			}
		}
	})

	t.Run("table", func(t *testing.T) {
		t.Parallel()
		r := pglockRun(t, "locks", "--key", q.name)
		if r.code != 0 || r.stderr != "" {
			t.Fatalf("pglock locks = %+v", r)
		}
		lines := strings.Split(r.stdout, "\n")
		if len(lines) != 6 || lines[3] != "" || lines[5] != "" || !healthLine.MatchString(lines[4]) {
			t.Fatalf("want the table, a blank line and the lock-table line:\n%s", r.stdout)
		}
		checkHealthLine(t, r.stdout, 2, capacity)
		// The array of --json stays an array.
		r = pglockRun(t, "locks", "--json", "--key", q.name)
		var entries []lockEntry
		if err := json.Unmarshal([]byte(r.stdout), &entries); err != nil || r.code != 0 || len(entries) != 2 {
			t.Fatalf("pglock locks --json = %+v: %v", r, err)
		}
	})
}

// The lock-table line: digits grouped, one decimal, and the warning above
// half, not at half.
func TestLockHealthLines(t *testing.T) {
	for _, tc := range []struct {
		n, perTx, conns, prepared int64
		want                      []string
	}{
		{1234, 64, 200, 0, []string{"advisory locks, all databases: 1,234 of 12,800 lock-table slots (9.6%)"}},
		{0, 64, 100, 0, []string{"advisory locks, all databases: 0 of 6,400 lock-table slots (0.0%)"}},
		{6400, 64, 200, 0, []string{"advisory locks, all databases: 6,400 of 12,800 lock-table slots (50.0%)"}},
		{6401, 64, 200, 0, []string{"advisory locks, all databases: 6,401 of 12,800 lock-table slots (50.0%)", fullLockTableWarning}},
		{1_000_000, 1000, 900, 100, []string{"advisory locks, all databases: 1,000,000 of 1,000,000 lock-table slots (100.0%)", fullLockTableWarning}},
		{600, 10, 100, 10, []string{"advisory locks, all databases: 600 of 1,100 lock-table slots (54.5%)", fullLockTableWarning}},
	} {
		h := newLockHealth(tc.n, tc.perTx, tc.conns, tc.prepared)
		if got := h.lines(); strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
			t.Errorf("lines of %d locks, %d * (%d + %d) = %q, want %q", tc.n, tc.perTx, tc.conns, tc.prepared, got, tc.want)
		}
	}
	if !strings.HasPrefix(fullLockTableWarning, "warning: the lock table is more than half full") ||
		!strings.Contains(fullLockTableWarning, "'out of shared memory'") || !strings.Contains(fullLockTableWarning, "max_locks_per_transaction") {
		t.Fatalf("warning = %q", fullLockTableWarning)
	}
	for n, want := range map[int64]string{0: "0", 7: "7", 999: "999", 1000: "1,000", 12800: "12,800",
		1234567: "1,234,567", -1234: "-1,234", -100: "-100"} {
		if got := groupDigits(n); got != want {
			t.Errorf("groupDigits(%d) = %q, want %q", n, got, want)
		}
	}
}

// A bad --interval, or --interval without --watch, is one line and status 2.
func TestLocksWatchBadInterval(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--watch", "--interval", "0"}, "--interval 0s: must be from 100ms to 1h"},
		{[]string{"--watch", "--interval", "-1s"}, "--interval -1s: must be from 100ms to 1h"},
		{[]string{"--watch", "--interval", "10ms"}, "--interval 10ms: must be from 100ms to 1h"},
		{[]string{"--watch", "--interval", "2h"}, "must be from 100ms to 1h"},
		{[]string{"--watch", "--interval", "soon"}, `invalid value "soon" for flag -interval`},
		{[]string{"--interval", "1s"}, "--interval needs --watch"},
	} {
		args := append([]string{"locks", "--database-url", unreachable}, tc.args...)
		r := pglockRun(t, args...)
		if r.code != exitUsage || r.stdout != "" || !strings.HasPrefix(r.stderr, "pglock locks: ") || !strings.Contains(r.stderr, tc.want) {
			t.Fatalf("pglock %q = %+v, want status 2 and %q", args, r, tc.want)
		}
		assertOneLine(t, "stderr", r.stderr)
	}
}

// A database that cannot be reached ends the watch with the usual line.
func TestLocksWatchUnreachable(t *testing.T) {
	t.Parallel()
	r := pglockRun(t, "locks", "--watch", "--database-url", unreachable)
	if r.code != exitUsage || r.stdout != "" || !strings.Contains(r.stderr, "cannot connect to the database") {
		t.Fatalf("pglock locks --watch with no database = %+v", r)
	}
	assertOneLine(t, "stderr", r.stderr)
}

// A frame fits the terminal: lines cut at its width, and rows that do not
// fit counted on a line of their own, the head and foot kept.
func TestFitScreen(t *testing.T) {
	head := []string{"time", ""}
	foot := []string{"", "advisory locks"}
	table := []string{"KEY  QUERY"}
	for i := range 30 {
		table = append(table, fmt.Sprintf("%d  %s", i, strings.Repeat("x", 100)))
	}
	got := fitScreen(head, table, foot, 40, 12)
	if len(got) != 11 || got[0] != "time" || got[2] != "KEY  QUERY" || got[3] != "0  "+strings.Repeat("x", 37) ||
		got[10] != "advisory locks" || got[9] != "" || !strings.HasPrefix(got[8], "... and 25 more") {
		t.Fatalf("fitScreen = %q", got)
	}
	for _, l := range got {
		if utf8.RuneCountInString(l) > 40 {
			t.Fatalf("line %q is wider than 40", l)
		}
	}
	// Enough room: everything, uncut.
	if got := fitScreen(head, table[:3], foot, 200, 50); len(got) != 7 || got[4] != table[2] {
		t.Fatalf("fitScreen = %q", got)
	}
	// No size known: 80 x 24.
	if got := fitScreen(head, table, foot, 0, 0); len(got) != 23 || utf8.RuneCountInString(got[3]) != 80 {
		t.Fatalf("fitScreen with no size = %q", got)
	}
}

// A waiter's statement is one printable line, cut at the limit.
func TestQueryText(t *testing.T) {
	for in, want := range map[string]string{
		"SELECT pg_advisory_lock($1)":        "SELECT pg_advisory_lock($1)",
		"SELECT\n\t pg_advisory_lock(1)\r\n": "SELECT pg_advisory_lock(1)",
		"SELECT '\x1b[2J'":                   "SELECT '?[2J'",
		strings.Repeat("é", 40):              strings.Repeat("é", 27) + "...",
		strings.Repeat("é", 30):              strings.Repeat("é", 30),
	} {
		if got := queryText(in, 30); got != want {
			t.Errorf("queryText(%q) = %q, want %q", in, got, want)
		}
	}
}
