package pgtest

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Extra settings reach the throwaway server and override its own.
func TestStartThrowawayWith(t *testing.T) {
	if _, err := Binaries(); errors.Is(err, ErrNoPostgres) {
		t.Skip("no PostgreSQL binaries on this machine:", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, err := StartThrowawayWith(ctx, map[string]string{
		"max_locks_per_transaction": "256", // StartThrowaway's own is 128
		"work_mem":                  "8MB",
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	conn, err := pgx.Connect(ctx, s.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for name, want := range map[string]string{
		"max_locks_per_transaction": "256",
		"work_mem":                  "8MB",
		"max_connections":           "300", // StartThrowaway's, unchanged
		"fsync":                     "off",
	} {
		var got string
		if err := conn.QueryRow(ctx, "SELECT current_setting($1)", name).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
}

// Invalid settings are refused before anything starts.
func TestStartThrowawayWithInvalid(t *testing.T) {
	for _, tc := range []struct {
		name, value, want string
	}{
		{"port", "5433", "belongs to the throwaway"},
		{"Listen_Addresses", "*", "belongs to the throwaway"},
		{"work mem", "8MB", "not a parameter name"},
		{"", "1", "not a parameter name"},
		{"1abc", "1", "not a parameter name"},
		{"work_mem", "8MB; rm -rf /", "plain word"},
		{"search_path", "'a b'", "plain word"},
		{"work_mem", "", "plain word"},
	} {
		s, err := StartThrowawayWith(context.Background(), map[string]string{tc.name: tc.value})
		if err == nil {
			s.Stop()
			t.Errorf("%q=%q: started", tc.name, tc.value)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q=%q: error %q, want it to say %q", tc.name, tc.value, err, tc.want)
		}
	}
	args, err := settingArgs(map[string]string{"b.c": "on", "a": "-1"})
	if err != nil || strings.Join(args, " ") != "-c a=-1 -c b.c=on" {
		t.Fatalf("settingArgs: %q, %v", args, err)
	}
}
