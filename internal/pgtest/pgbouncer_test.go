package pgtest

import (
	"context"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Extra pgbouncer.ini settings reach PgBouncer and override its own: read
// back through PgBouncer's admin console (SHOW CONFIG).
func TestStartPgBouncerWith(t *testing.T) {
	if _, err := PgBouncerBinary(); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, ok, err := Find(ctx)
	if err != nil || !ok {
		t.Skip("no PostgreSQL server to put PgBouncer in front of:", err)
	}
	b, err := StartPgBouncerWith(ctx, s.URL, "transaction", 3, map[string]string{
		"server_reset_query_always": "1",
		"max_client_conn":           "50", // StartPgBouncer's own is 1000
		"admin_users":               "postgres",
		"server_reset_query":        "DISCARD ALL",
	})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Stop()
	admin, err := url.Parse(b.URL)
	if err != nil {
		t.Fatal(err)
	}
	admin.Path = "/pgbouncer" // the admin console
	conn, err := pgx.Connect(ctx, admin.String()+"&default_query_exec_mode=simple_protocol")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, "SHOW CONFIG")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for rows.Next() {
		vals, err := rows.Values()
		if err != nil {
			t.Fatal(err)
		}
		if len(vals) >= 2 {
			name, _ := vals[0].(string)
			value, _ := vals[1].(string)
			got[name] = value
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{
		"server_reset_query_always": "1",
		"max_client_conn":           "50",
		"server_reset_query":        "DISCARD ALL",
		"pool_mode":                 "transaction", // StartPgBouncer's, from its arguments
		"default_pool_size":         "3",
	} {
		if got[name] != want {
			t.Errorf("%s = %q, want %q", name, got[name], want)
		}
	}
}

// Invalid settings are refused before anything starts.
func TestStartPgBouncerWithInvalid(t *testing.T) {
	for _, tc := range []struct {
		name, value, want string
	}{
		{"listen_port", "6432", "cannot be set"},
		{"Pool_Mode", "session", "pass it as mode"},
		{"default_pool_size", "4", "pass it as poolSize"},
		{"server reset", "1", "not a setting name"},
		{"", "1", "not a setting name"},
		{"1abc", "1", "not a setting name"},
		{"server_reset_query", "DISCARD ALL\nlisten_port = 1", "one line"},
	} {
		b, err := StartPgBouncerWith(context.Background(), "postgres://postgres@127.0.0.1:5432/postgres", "transaction", 2,
			map[string]string{tc.name: tc.value})
		if err == nil {
			b.Stop()
			t.Errorf("%q=%q: started", tc.name, tc.value)
			continue
		}
		if errors.Is(err, ErrNoPgBouncer) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q=%q: error %q, want it to say %q", tc.name, tc.value, err, tc.want)
		}
	}
	text, err := pgbouncerSettings(map[string]string{"server_reset_query_always": "1", "max_client_conn": " 50 ", "server_reset_query": ""})
	if want := "max_client_conn = 50\nserver_reset_query = \nserver_reset_query_always = 1\n"; err != nil || text != want {
		t.Fatalf("pgbouncerSettings: %q, %v; want %q", text, err, want)
	}
}
