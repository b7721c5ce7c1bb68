package locktest

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

var tableSeq atomic.Int64

// Table creates a table (k text, v int) for one test, dropped when it ends,
// and returns its name. Its unique constraint on v is checked at commit, so
// inserting one v twice makes COMMIT fail: the way to test a failed commit.
func Table(tb testing.TB, db *pgxpool.Pool) string {
	tb.Helper()
	name := fmt.Sprintf("locktest_%d_%d", time.Now().UnixNano(), tableSeq.Add(1))
	_, err := db.Exec(context.Background(), "CREATE TABLE "+name+
		" (k text, v int, CONSTRAINT "+name+"_v UNIQUE (v) DEFERRABLE INITIALLY DEFERRED)")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _, _ = db.Exec(context.Background(), "DROP TABLE "+name) })
	return name
}

// Count returns the number of committed rows of tbl whose k is k.
func Count(tb testing.TB, db *pgxpool.Pool, tbl, k string) int {
	tb.Helper()
	var n int
	if err := db.QueryRow(context.Background(), "SELECT count(*) FROM "+tbl+" WHERE k = $1", k).Scan(&n); err != nil {
		tb.Fatal(err)
	}
	return n
}
