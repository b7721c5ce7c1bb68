package main

import (
	"encoding/json"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
)

// pglock key prints what pglock.KeyOf computes, with its two halves.
func TestKey(t *testing.T) {
	t.Parallel()
	names := []string{"test", "shared-identifier", "café ☕", "a name\twith a tab", pgtest.UniqueKey(t)}
	r := pglockRun(t, append([]string{"key"}, names...)...)
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("pglock key = %+v", r)
	}
	lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
	if len(lines) != len(names)+1 || strings.Fields(lines[0])[0] != "INT64" {
		t.Fatalf("pglock key output:\n%s", r.stdout)
	}
	for i, name := range names {
		k := keyOf(t, name)
		v := k.Int64()
		f := strings.Fields(lines[i+1])
		want := []string{strconv.FormatInt(v, 10), strconv.Itoa(int(int32(v >> 32))), strconv.Itoa(int(int32(v)))}
		if len(f) < 4 || f[0] != want[0] || f[1] != want[1] || f[2] != want[2] {
			t.Fatalf("line for %q = %q, want %v", name, lines[i+1], want)
		}
	}
	// The vectors of the Python package.
	if !strings.Contains(lines[1], "-6248023315878667354") || !strings.Contains(lines[2], "-464685171814670893") {
		t.Fatalf("vectors:\n%s", r.stdout)
	}

	r = pglockRun(t, append([]string{"key", "--json"}, names...)...)
	var got []keyEntry
	if err := json.Unmarshal([]byte(r.stdout), &got); err != nil || r.code != 0 {
		t.Fatalf("pglock key --json = %+v: %v", r, err)
	}
	for i, name := range names {
		k := keyOf(t, name)
		classid, objid, objsubid := k.LockTag()
		e := got[i]
		if e.Name != name || e.Int64 != k.Int64() || e.High != int32(k.Int64()>>32) || e.Low != int32(k.Int64()) ||
			e.ClassID != classid || e.ObjID != objid || e.ObjSubID != objsubid {
			t.Fatalf("json entry %d = %+v, want key %s of %q", i, e, k, name)
		}
	}
}

// pglock sql prints SQL that, run by psql, makes pglock_key agree with
// pglock key.
func TestSQL(t *testing.T) {
	t.Parallel()
	r := pglockRun(t, "sql")
	if r.code != 0 || r.stderr != "" || !strings.Contains(r.stdout, "CREATE OR REPLACE FUNCTION pglock_key(") {
		t.Fatalf("pglock sql = %+v", r)
	}
	psql, err := exec.LookPath("psql")
	if err != nil {
		t.Skip("no psql to run the SQL with")
	}
	schema := "pglock_cli_sql_" + strconv.FormatInt(time.Now().UnixNano(), 36)
	name := pgtest.UniqueKey(t)
	script := "CREATE SCHEMA " + schema + ";\nSET search_path = " + schema + ", public;\n" + r.stdout +
		"SELECT pglock_key('" + name + "');\nDROP SCHEMA " + schema + " CASCADE;\n"
	cmd := exec.Command(psql, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", pgtest.URL(t))
	cmd.Stdin = strings.NewReader(script)
	var stderr strings.Builder
	cmd.Stderr = &stderr // NOTICEs of the DROP
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("psql: %v\n%s%s", err, out, stderr.String())
	}
	if got, want := strings.TrimSpace(string(out)), strconv.FormatInt(keyOf(t, name).Int64(), 10); got != want {
		t.Fatalf("pglock_key(%q) through psql = %q, want %s", name, got, want)
	}
	if r := pglockRun(t, "sql", "extra"); r.code != exitUsage {
		t.Fatalf("pglock sql extra = %+v, want a usage error", r)
	}
}
