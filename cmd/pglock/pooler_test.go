//go:build unix

package main

import (
	"strings"
	"testing"

	"github.com/pglockkit/kit/internal/pgtest"
)

// Through PgBouncer in transaction pooling mode a session lock is refused
// (pglock.ErrTransactionPooler): pglock run exits 2 with one line that
// names --xact, the flag that works there, and does not run the command;
// with --xact the command runs under the lock. Through statement pooling,
// which allows no transaction block, --xact is refused too, and the line
// does not send the user back to --xact. (pgtest.StartPgBouncerT skips the
// test when pgbouncer is not installed, and fails it under CI.)
func TestRunTransactionPooler(t *testing.T) {
	t.Parallel()
	b := pgtest.StartPgBouncerT(t, "transaction", 2)
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	for _, u := range []string{b.URL, b.URL + "&default_query_exec_mode=simple_protocol"} {
		r := pglockRun(t, "run", "--database-url", u, name, "--", "sh", "-c", "echo ran")
		t.Logf("pglock run through a transaction pooler: %d %q", r.code, r.stderr)
		if r.code != exitUsage || r.stdout != "" {
			t.Fatalf("run through a transaction pooler = %+v, want 2 and no output", r)
		}
		assertOneLine(t, "stderr", r.stderr)
		if !strings.Contains(r.stderr, "transaction pool") || !strings.Contains(r.stderr, "--xact") {
			t.Errorf("stderr = %q, want it to say a transaction pooler is in the way and to name --xact", r.stderr)
		}
		if strings.Contains(r.stderr, "Transaction scope") {
			t.Errorf("stderr = %q: advice for library users (Transaction scope), not for the command", r.stderr)
		}
		r = pglockRun(t, "run", "--xact", "--database-url", u, name, "--", "sh", "-c", "echo ran")
		if r.code != 0 || r.stdout != "ran\n" || r.stderr != "" {
			t.Fatalf("run --xact through a transaction pooler = %+v, want 0 and the command's output", r)
		}
	}
	pgtest.WaitFree(t, watch, keyOf(t, name))

	stmt := pgtest.StartPgBouncerT(t, "statement", 2)
	r := pglockRun(t, "run", "--xact", "--database-url", stmt.URL+"&default_query_exec_mode=simple_protocol", name, "--", "sh", "-c", "echo ran")
	t.Logf("pglock run --xact through a statement pooler: %d %q", r.code, r.stderr)
	if r.code != exitUsage || r.stdout != "" {
		t.Fatalf("run --xact through a statement pooler = %+v, want 2 and no output", r)
	}
	assertOneLine(t, "stderr", r.stderr)
	if !strings.Contains(r.stderr, "statement pooling") || strings.Contains(r.stderr, "use --xact") {
		t.Errorf("stderr = %q, want it to name statement pooling, not to advise --xact", r.stderr)
	}
}
