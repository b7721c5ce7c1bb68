package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/url"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Five pglock migrate processes at once on a new database: one schema at
// pglock.SchemaVersion, each migration applied once (by one process, the
// others find it up to date); a later run has nothing to do.
func TestMigrateProcesses(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	admin := pgtest.Pool(t, 1)
	name := fmt.Sprintf("pglock_cli_migrate_%d", rand.Uint32())
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = admin.Exec(context.Background(), "DROP DATABASE "+name+" WITH (FORCE)") })
	u, err := url.Parse(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	dbURL := u.String()

	const n = 5
	type proc struct{ out, errOut *syncBuffer }
	var procs []proc
	var cmds []interface{ Wait() error }
	for range n {
		cmd, out, errOut := commandProcess(t, "--database-url", dbURL, "migrate")
		cmds = append(cmds, cmd)
		procs = append(procs, proc{out, errOut})
	}
	migrated := 0
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Fatalf("pglock migrate %d: %v: %s", i, err, procs[i].errOut.String())
		}
		out := procs[i].out.String()
		switch {
		case strings.Contains(out, "migrated from version 0"):
			migrated++
		case strings.Contains(out, "up to date"):
		default:
			t.Errorf("pglock migrate %d printed %q", i, out)
		}
	}
	if migrated != 1 {
		t.Errorf("%d of %d processes applied the migrations, want 1", migrated, n)
	}
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var version, rows int
	if err := conn.QueryRow(ctx, "SELECT max(version), count(*) FROM pglock.migration").Scan(&version, &rows); err != nil {
		t.Fatal(err)
	}
	if version != pglock.SchemaVersion || rows != pglock.SchemaVersion {
		t.Errorf("pglock.migration: version %d in %d rows, want %d", version, rows, pglock.SchemaVersion)
	}
	r := pglockRun(t, "--database-url", dbURL, "migrate")
	if r.code != 0 || !strings.Contains(r.stdout, "up to date") {
		t.Errorf("a later pglock migrate = %+v", r)
	}
	if r := pglockRun(t, "migrate", "extra"); r.code != exitUsage {
		t.Errorf("pglock migrate extra = %+v, want a usage error", r)
	}
}
