package echolock_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/labstack/echo/v4"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/echolock"
	"github.com/pglockkit/kit/pglock"
)

// overlap counts the handlers running at once and remembers the most.
type overlap struct{ cur, max atomic.Int64 }

func (o *overlap) enter() {
	n := o.cur.Add(1)
	for {
		m := o.max.Load()
		if n <= m || o.max.CompareAndSwap(m, n) {
			return
		}
	}
}

func (o *overlap) leave() { o.cur.Add(-1) }

// replica is one "server instance": its own pool, Locker and Echo.
type replica struct {
	pool   *pgxpool.Pool
	locker *pglock.Locker
	e      *echo.Echo
	srv    *httptest.Server
}

// newReplica starts an Echo server with h on POST and GET /orders/:id behind
// the middleware configured by cfg (Locker and, if nil, KeyExtractor
// filled in).
func newReplica(t *testing.T, cfg echolock.Config, h echo.HandlerFunc) *replica {
	t.Helper()
	pool := pgtest.Pool(t, 4)
	lk, err := pglock.NewLocker(pool)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	cfg.Locker = lk
	if cfg.KeyExtractor == nil {
		cfg.KeyExtractor = echolock.Param("id")
	}
	mw, err := echolock.WithConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.POST("/orders/:id", h, mw)
	e.GET("/orders/:id", h, mw)
	srv := httptest.NewServer(e)
	t.Cleanup(srv.Close)
	return &replica{pool: pool, locker: lk, e: e, srv: srv}
}

func lockKey(t *testing.T, lk *pglock.Locker, name string) pglock.Key {
	t.Helper()
	k, err := lk.Key(echolock.DefaultNamespace + name)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

type result struct {
	status     int
	retryAfter string
	body       string
	err        error
}

func do(srv *httptest.Server, method, path string) result {
	req, _ := http.NewRequest(method, srv.URL+path, nil)
	resp, err := srv.Client().Do(req)
	if err != nil {
		return result{err: err}
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return result{status: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After"), body: string(b)}
}

// fire sends n concurrent POSTs, alternating between the replicas.
func fire(reps [2]*replica, n int, id func(i int) string) []result {
	res := make([]result, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			res[i] = do(reps[i%2].srv, http.MethodPost, "/orders/"+id(i))
		})
	}
	close(start)
	wg.Wait()
	return res
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func waiters(t *testing.T, watch *pgxpool.Pool, key pglock.Key) int {
	t.Helper()
	hs, err := pgtest.Holders(context.Background(), watch, key)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, h := range hs {
		if !h.Granted {
			n++
		}
	}
	return n
}

func noConnsLeft(t *testing.T, pools ...*pgxpool.Pool) {
	t.Helper()
	for _, p := range pools {
		waitFor(t, "pool connections to be released", func() bool { return p.Stat().AcquiredConns() == 0 })
	}
}

var tableSeq atomic.Int64

// table creates a table for one test, dropped at its end. Its unique
// constraint on v is checked at commit, so a duplicate makes COMMIT fail.
func table(t *testing.T, db *pgxpool.Pool) string {
	t.Helper()
	name := fmt.Sprintf("echolock_test_%d_%d", time.Now().UnixNano(), tableSeq.Add(1))
	_, err := db.Exec(context.Background(), "CREATE TABLE "+name+
		" (k text, v int, CONSTRAINT "+name+"_v UNIQUE (v) DEFERRABLE INITIALLY DEFERRED)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = db.Exec(context.Background(), "DROP TABLE "+name) })
	return name
}

func count(t *testing.T, db *pgxpool.Pool, tbl, k string) int {
	t.Helper()
	var n int
	if err := db.QueryRow(context.Background(), "SELECT count(*) FROM "+tbl+" WHERE k = $1", k).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }
