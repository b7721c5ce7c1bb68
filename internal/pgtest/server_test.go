package pgtest

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// The throwaway path: start a cluster from the machine's binaries, use it,
// stop it, and check that it is gone.
func TestStartThrowaway(t *testing.T) {
	if _, err := Binaries(); errors.Is(err, ErrNoPostgres) {
		t.Skip("no PostgreSQL binaries on this machine:", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, err := StartThrowaway(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if s.Source != "throwaway" {
		t.Fatalf("source %q", s.Source)
	}
	conn, err := pgx.Connect(ctx, s.URL)
	if err != nil {
		s.Stop()
		t.Fatal(err)
	}
	var ok bool
	err = conn.QueryRow(ctx, "SELECT pg_try_advisory_lock(1)").Scan(&ok)
	conn.Close(ctx)
	if err != nil || !ok {
		s.Stop()
		t.Fatalf("advisory lock on the throwaway server: %v, %v", ok, err)
	}
	dir := s.dir
	s.Stop()
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("cluster directory %s left behind", dir)
	}
	if err := ping(ctx, s.URL); err == nil {
		t.Fatal("the throwaway server still answers after Stop")
	}
}

func TestFindPrefersDatabaseURL(t *testing.T) {
	t.Setenv("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none?sslmode=disable&connect_timeout=1")
	if _, _, err := Find(context.Background()); err == nil {
		t.Fatal("an unreachable DATABASE_URL was not reported")
	}
}
