package pgtest

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// A standby of a throwaway primary: in recovery and read-only, it replays
// the primary's writes, takes advisory locks of its own, and after Promote
// accepts writes.
func TestStandby(t *testing.T) {
	// An extra setting a hot standby must have at least as high as its
	// primary: the standby gets the primary's.
	primary := ThrowawayT(t, map[string]string{"max_locks_per_transaction": "256"})
	standby := primary.StandbyT(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if standby.Source != "throwaway" || standby.URL == primary.URL || standby.dir == primary.dir {
		t.Fatalf("standby %+v of primary %+v", standby, primary)
	}
	p := connect(ctx, t, primary.URL)
	s := connect(ctx, t, standby.URL)

	if !recovering(ctx, t, s) {
		t.Fatal("the standby is not in recovery")
	}
	if recovering(ctx, t, p) {
		t.Fatal("the primary is in recovery")
	}
	for name, want := range map[string]string{"max_locks_per_transaction": "256", "max_connections": "300", "hot_standby": "on"} {
		var got string
		if err := s.QueryRow(ctx, "SELECT current_setting($1)", name).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("standby: %s = %q, want %q", name, got, want)
		}
	}
	_, err := s.Exec(ctx, "CREATE TABLE t (n int)")
	if pgErr := (*pgconn.PgError)(nil); !errors.As(err, &pgErr) || pgErr.Code != "25006" {
		t.Fatalf("CREATE TABLE on the standby: %v, want read_only_sql_transaction (25006)", err)
	}

	// The primary's writes reach the standby.
	if _, err := p.Exec(ctx, "CREATE TABLE t (n int); INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	if err := standby.WaitReplayed(ctx, primary); err != nil {
		t.Fatal(err)
	}
	if n := count(ctx, t, s); n != 1 {
		t.Fatalf("standby sees %d rows, want 1", n)
	}

	// Advisory locks are the standby's own: one session's excludes another
	// session of the standby, not the primary's.
	s2 := connect(ctx, t, standby.URL)
	for _, step := range []struct {
		conn *pgx.Conn
		who  string
		want bool
	}{{s, "standby", true}, {s2, "second standby session", false}, {p, "primary", true}} {
		var got bool
		if err := step.conn.QueryRow(ctx, "SELECT pg_try_advisory_lock(23)").Scan(&got); err != nil {
			t.Fatalf("%s: pg_try_advisory_lock: %v", step.who, err)
		}
		if got != step.want {
			t.Fatalf("%s: pg_try_advisory_lock(23) = %v, want %v", step.who, got, step.want)
		}
	}

	// Promoted, it is a primary of its own; its sessions survive.
	if err := standby.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	if recovering(ctx, t, s) {
		t.Fatal("in recovery after Promote")
	}
	if _, err := s.Exec(ctx, "INSERT INTO t VALUES (2)"); err != nil {
		t.Fatalf("write after Promote: %v", err)
	}
	if n := count(ctx, t, s); n != 2 {
		t.Fatalf("promoted standby has %d rows, want 2", n)
	}
	if n := count(ctx, t, p); n != 1 {
		t.Fatalf("primary has %d rows after the standby's write, want 1", n)
	}

	// Stop removes the standby, as it does a primary.
	dir := standby.dir
	standby.Stop()
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("standby directory %s left behind", dir)
	}
}

// Only a throwaway cluster this process started can have a standby.
func TestStartStandbyNotThrowaway(t *testing.T) {
	s := &Server{URL: "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable", Source: "local"}
	if st, err := s.StartStandby(context.Background()); err == nil {
		st.Stop()
		t.Fatal("a standby of a server this process did not start")
	}
}

func connect(ctx context.Context, t *testing.T, url string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func recovering(ctx context.Context, t *testing.T, conn *pgx.Conn) bool {
	t.Helper()
	var in bool
	if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&in); err != nil {
		t.Fatal(err)
	}
	return in
}

func count(ctx context.Context, t *testing.T, conn *pgx.Conn) int {
	t.Helper()
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}
