package pglock

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
)

// The exclusion self-test passes on PostgreSQL and leaves nothing: both
// tries run (on pgx and on database/sql), no lock of its key class remains
// on the server, and nothing is checked out of the pool or *sql.DB. (A
// Locker runs it at its first lock; run again here to see its result.)
func TestSelfTestRunsAndLeavesNothing(t *testing.T) {
	url := os.Getenv("DATABASE_URL") // set by the test binary's TestMain
	if url == "" {
		t.Skip("no DATABASE_URL")
	}
	bg := context.Background()
	pool, err := pgxpool.New(bg, url)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	db, err := sql.Open("pgx", url)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for name, conn := range map[string]any{"pgxpool": pool, "sql.DB": db} {
		lk, err := NewLocker(conn)
		if err != nil {
			t.Fatal(err)
		}
		key := fmt.Sprintf("selftest-%s-%x", name, rand.Uint64())
		if err := lk.Do(bg, key, func(context.Context) error { return nil }); err != nil {
			t.Fatalf("%s: the first Do = %v", name, err)
		}
		tested, err := lk.mux.selfTest(bg, lk.mux.lc.Slot(0))
		if !tested || err != nil {
			t.Errorf("%s: selfTest = %v, %v; want true, nil (PostgreSQL's locks exclude)", name, tested, err)
		}
		// Another test's Locker may be running its own self-test (a
		// Locker's first connect goes on after a caller's context ended):
		// its lock goes within seconds; one of this Locker's would stay.
		var n int
		for deadline := time.Now().Add(10 * time.Second); ; {
			if err := pool.QueryRow(bg, `SELECT count(*) FROM pg_catalog.pg_locks
				WHERE locktype = 'advisory' AND objsubid = 2 AND classid = $1`, int64(selfTestClass)).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n == 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if n != 0 {
			t.Errorf("%s: %d locks of the self-test's key class left", name, n)
		}
		if n := pool.Stat().AcquiredConns(); n != 0 {
			t.Errorf("%s: %d pool connections checked out", name, n)
		}
		if n := db.Stats().InUse; n != 0 {
			t.Errorf("%s: %d *sql.DB connections in use", name, n)
		}
		_ = lk.Close()
	}
}
