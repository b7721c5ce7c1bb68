package pgtest

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Main runs a test binary's tests against a server: DATABASE_URL, the local
// one, or a throwaway cluster started for this binary. It sets DATABASE_URL
// for the tests and exits with their status. With no server and no
// binaries it fails the run with a line that says what to install.
func Main(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	s, err := FindOrStart(ctx)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer s.Stop()
	os.Setenv("DATABASE_URL", s.URL)
	// The goroutines alive before the tests (the runtime's, the server's
	// log readers) are not leaks; every one the tests start must be gone
	// when they end: a lock's watcher or wait that outlives its test is.
	before := goleak.IgnoreCurrent()
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(before); err != nil {
			fmt.Fprintln(os.Stderr, "pgtest: goroutines leaked:", err)
			return 1
		}
	}
	return code
}

// URL returns DATABASE_URL as Main set it.
func URL(tb testing.TB) string {
	tb.Helper()
	u := os.Getenv("DATABASE_URL")
	if u == "" {
		tb.Fatal("pgtest: DATABASE_URL not set: call pgtest.Main from TestMain")
	}
	return u
}
