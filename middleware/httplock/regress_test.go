package httplock_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

// TestColdLockerNeverAnswersBusyForFreeKeys (issue 19, item 11): 409 Conflict
// says that another request holds the key. A cold Locker (no lock connection
// open yet) whose connections take longer to open than the middleware's
// wait (WithWait(15ms); new connections here take 40 ms more) must not
// answer 409 for keys nobody holds: a request that could not be served
// while the lock connection opens gets 503 (the database was not ready), and
// the connect it started goes on for the next requests. 20 requests 50 ms
// apart, each on its own key.
func TestColdLockerNeverAnswersBusyForFreeKeys(t *testing.T) {
	t.Parallel()
	const requests, spacing, connectDelay = 20, 50 * time.Millisecond, 40 * time.Millisecond
	bg := context.Background()
	watch := pgtest.Pool(t, 2)
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 2
	cfg.ConnConfig.ValidateConnect = func(ctx context.Context, _ *pgconn.PgConn) error {
		select {
		case <-time.After(connectDelay):
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	pool, err := pgxpool.NewWithConfig(bg, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if _, err := pool.Exec(bg, "SELECT 1"); err != nil { // a warm pool
		t.Fatal(err)
	}
	lk, err := pglock.NewLocker(pool)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	mw := mustMiddleware(t, lk, httplock.Query("k"), httplock.WithWait(15*time.Millisecond))
	srv := httptest.NewServer(mw(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusOK)
	})))
	t.Cleanup(srv.Close)

	base := pgtest.UniqueKey(t)
	codes := map[int]int{}
	var conflicts []int
	var keys []pglock.Key
	t0 := time.Now()
	for i := range requests {
		time.Sleep(time.Until(t0.Add(time.Duration(i) * spacing)))
		name := fmt.Sprintf("%s:free-%d", base, i)
		keys = append(keys, lockKey(t, lk, name))
		resp, err := http.Get(srv.URL + "/?k=" + url.QueryEscape(name))
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		codes[resp.StatusCode]++
		if resp.StatusCode == http.StatusConflict {
			conflicts = append(conflicts, i+1)
		}
	}
	t.Logf("answers by status: %v; Locker stats %+v", codes, lk.Stats())
	if len(conflicts) > 0 {
		t.Errorf("requests %v (of %d) on keys nobody holds were answered 409 Conflict (answers by status: %v); want 200, or 503 while the lock connection opens",
			conflicts, requests, codes)
	}
	for _, k := range keys {
		pgtest.WaitFree(t, watch, k)
	}
}
