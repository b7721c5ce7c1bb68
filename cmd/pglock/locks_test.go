package main

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// namedPool is a pool whose connections carry application_name app.
func namedPool(t *testing.T, app string) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 2
	cfg.ConnConfig.RuntimeParams["application_name"] = app
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// lineWith returns the one line of out that has all of the fields.
func lineWith(t *testing.T, out string, fields ...string) []string {
	t.Helper()
	var found []string
	for line := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(line)
		ok := true
		for _, want := range fields {
			if !contains(f, want) {
				ok = false
				break
			}
		}
		if ok {
			if found != nil {
				t.Fatalf("two lines with %v:\n%s", fields, out)
			}
			found = f
		}
	}
	if found == nil {
		t.Fatalf("no line with %v:\n%s", fields, out)
	}
	return found
}

func contains(f []string, s string) bool {
	for _, x := range f {
		if x == s {
			return true
		}
	}
	return false
}

// pglock locks shows a held key with its holder's pid, application and
// name, the session waiting behind it, and a pair key; as a table and as
// JSON.
func TestLocks(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	ctx := context.Background()
	name := pgtest.UniqueKey(t)
	key := keyOf(t, name)
	app := "pglock-test-" + strconv.FormatInt(time.Now().UnixNano(), 36)

	held, err := pglock.NewLock(namedPool(t, app), name)
	if err != nil {
		t.Fatal(err)
	}
	if err := held.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	defer held.Release(ctx)
	holderPID := grantedPID(t, watch, key)

	waitCtx, stopWaiting := context.WithCancel(ctx)
	waiting, err := pglock.NewLock(namedPool(t, app+"-w"), name)
	if err != nil {
		t.Fatal(err)
	}
	waitErr := make(chan error, 1)
	go func() { waitErr <- waiting.Acquire(waitCtx) }()
	waiterPID := waitWaiter(t, watch, key).PID

	// A key of the (integer, integer) space, named by nobody.
	hi, lo := int32(key.Int64()>>32), int32(key.Int64())
	pair, err := pglock.NewLock(namedPool(t, app+"-p"), pglock.Int32PairKey(hi, lo))
	if err != nil {
		t.Fatal(err)
	}
	if err := pair.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	defer pair.Release(ctx)
	pairPID := grantedPID(t, watch, pair.Key())

	hp, wp, pp := strconv.Itoa(int(holderPID)), strconv.Itoa(int(waiterPID)), strconv.Itoa(int(pairPID))
	// Every lock, none named.
	r := pglockRun(t, "locks")
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("pglock locks = %+v", r)
	}
	if h := strings.Fields(strings.SplitN(r.stdout, "\n", 2)[0]); strings.Join(h, " ") !=
		"KEY NAME MODE STATE PID APPLICATION CLIENT SINCE QUEUE" {
		t.Fatalf("header = %q", h)
	}
	lineWith(t, r.stdout, key.String(), "-", "exclusive", "held", hp, app, "blocks", wp)
	lineWith(t, r.stdout, pair.Key().String(), "-", "exclusive", "held", pp, app+"-p")
	// --key filters (and labels): the pair key, named by nobody, is gone.
	r = pglockRun(t, "locks", "--key", name, "--key", "some-other-name")
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("pglock locks --key = %+v", r)
	}
	lineWith(t, r.stdout, key.String(), name, "exclusive", "held", hp, app, "blocks", wp)
	lineWith(t, r.stdout, key.String(), name, "exclusive", "waiting", wp, app+"-w", "behind", hp)
	if lines := strings.Split(strings.TrimSpace(r.stdout), "\n"); len(lines) != 5 || lines[3] != "" ||
		!strings.HasPrefix(lines[4], "advisory locks, all databases: ") {
		t.Fatalf("pglock locks --key NAME printed %d lines, want the header, the key's 2, a blank line and the lock-table line:\n%s", len(lines), r.stdout)
	}

	r = pglockRun(t, "locks", "--json", "--key", name)
	var entries []lockEntry
	if err := json.Unmarshal([]byte(r.stdout), &entries); err != nil || r.code != 0 {
		t.Fatalf("pglock locks --json = %+v: %v", r, err)
	}
	find := func(pid int32) lockEntry {
		for _, e := range entries {
			if e.PID == pid {
				return e
			}
		}
		t.Fatalf("pid %d not in %s", pid, r.stdout)
		return lockEntry{}
	}
	if len(entries) != 2 {
		t.Fatalf("pglock locks --json --key NAME gave %d entries, want the holder and the waiter: %s", len(entries), r.stdout)
	}
	h, w := find(holderPID), find(waiterPID)
	r = pglockRun(t, "locks", "--json")
	entries = nil
	if err := json.Unmarshal([]byte(r.stdout), &entries); err != nil || r.code != 0 {
		t.Fatalf("pglock locks --json = %+v: %v", r, err)
	}
	p := find(pairPID)
	classid, objid, _ := key.LockTag()
	switch {
	case h.Key != key.String() || h.Int64 == nil || *h.Int64 != key.Int64() || h.Name != name ||
		h.ClassID != classid || h.ObjID != objid || h.ObjSubID != 1:
		t.Fatalf("holder's key = %+v, want %s", h, key)
	case !h.Granted || h.Mode != "exclusive" || h.ApplicationName != app || h.ClientAddr == "" ||
		h.BackendStart == nil || h.Since == nil || len(h.Waiters) != 1 || h.Waiters[0] != waiterPID:
		t.Fatalf("holder = %+v", h)
	case w.Granted || w.Key != key.String() || w.Name != name || len(w.BlockedBy) != 1 ||
		w.BlockedBy[0] != holderPID || w.Since == nil || w.QueryStart == nil:
		t.Fatalf("waiter = %+v", w)
	case p.Key != pair.Key().String() || p.Pair == nil || p.Pair[0] != hi || p.Pair[1] != lo ||
		p.Int64 != nil || p.ObjSubID != 2 || p.Name != "":
		t.Fatalf("pair = %+v", p)
	}

	stopWaiting()
	if err := <-waitErr; !errors.Is(err, pglock.ErrNotAcquired) {
		t.Fatalf("waiter's Acquire = %v", err)
	}
	if err := held.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := pair.Release(ctx); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, key)
	pgtest.WaitFree(t, watch, pair.Key())
}

// Ages read as a person would write them.
func TestFormatAge(t *testing.T) {
	for d, want := range map[time.Duration]string{
		-time.Second:                  "0.0s",
		400 * time.Millisecond:        "0.4s",
		12300 * time.Millisecond:      "12.3s",
		4*time.Minute + 5*time.Second: "4m05s",
		3*time.Hour + 2*time.Minute:   "3h02m",
		53*time.Hour + 10*time.Minute: "2d05h",
	} {
		if got := formatAge(d); got != want {
			t.Errorf("formatAge(%v) = %q, want %q", d, got, want)
		}
	}
}

// No locks: an empty JSON array, and a sentence instead of an empty table.
func TestLocksEmpty(t *testing.T) {
	var b strings.Builder
	if err := writeLocksJSON(&b, nil); err != nil || b.String() != "[]\n" {
		t.Fatalf("JSON of no locks = %q, %v", b.String(), err)
	}
	b.Reset()
	if err := writeLocksTable(&b, nil); err != nil || b.String() != "no advisory locks in this database\n" {
		t.Fatalf("table of no locks = %q, %v", b.String(), err)
	}
}
