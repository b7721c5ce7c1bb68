// Command lockconns shows what a Locker on a pool does with its connections:
// a held lock costs no pool connection. A service on a pool of 4 serves 64
// requests at once, each holding its own key while its handler queries the
// same pool; then one process holds 1,000 locks at once on 2 lock
// connections. It runs against DATABASE_URL (make demo finds or starts a
// server).
package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

const appName = "pglock-lockconns-demo"

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := run(ctx, os.Stdout, os.Getenv("DATABASE_URL")); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, w io.Writer, url string) error {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return err
	}
	cfg.MaxConns = 4
	cfg.ConnConfig.RuntimeParams["application_name"] = appName // the lock connections copy it
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	locker, err := pglock.NewLocker(pool, pglock.WithLockConns(2))
	if err != nil {
		return err
	}
	defer locker.Close()

	if err := serve(ctx, w, pool, locker); err != nil {
		return err
	}
	return holdMany(ctx, w, pool, locker)
}

// serve sends 64 requests at once to a handler that holds the request's key
// and runs a 50 ms query on the same pool of 4.
func serve(ctx context.Context, w io.Writer, pool *pgxpool.Pool, locker *pglock.Locker) error {
	mw, err := httplock.Middleware(locker, httplock.PathValue("id"), httplock.WithWait(5*time.Second))
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("POST /orders/{id}", mw(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if _, err := pool.Exec(r.Context(), "SELECT pg_sleep(0.05)"); err != nil {
			http.Error(rw, err.Error(), http.StatusInternalServerError)
		}
	})))
	srv := httptest.NewServer(mux)
	defer srv.Close()

	const requests = 64
	start := time.Now()
	statuses := make(chan int, requests)
	var wg sync.WaitGroup
	for i := range requests {
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, fmt.Sprintf("%s/orders/%d", srv.URL, i), nil)
			resp, err := srv.Client().Do(req)
			if err != nil {
				statuses <- 0
				return
			}
			resp.Body.Close()
			statuses <- resp.StatusCode
		})
	}
	wg.Wait()
	close(statuses)
	count := map[int]int{}
	for s := range statuses {
		count[s]++
	}
	fmt.Fprintf(w, "%d requests at once on a pool of %d, each holding its key while it queries the pool: %d x 200 OK in %v\n",
		requests, pool.Config().MaxConns, count[http.StatusOK], time.Since(start).Round(10*time.Millisecond))
	if count[http.StatusOK] != requests {
		return fmt.Errorf("statuses %v, want %d x 200", count, requests)
	}
	return nil
}

// holdMany holds 1,000 keys at once from 1,000 goroutines, and shows where
// the locks are.
func holdMany(ctx context.Context, w io.Writer, pool *pgxpool.Pool, locker *pglock.Locker) error {
	const goroutines, each = 50, 20
	var held, done sync.WaitGroup
	release := make(chan struct{})
	errs := make(chan error, goroutines*each)
	held.Add(goroutines * each)
	for g := range goroutines {
		for i := range each {
			done.Go(func() {
				err := locker.Do(ctx, fmt.Sprintf("lockconns-demo:%d:%d", g, i), func(ctx context.Context) error {
					held.Done()
					<-release
					return nil
				})
				if err != nil {
					held.Done()
					errs <- err
				}
			})
		}
	}
	held.Wait()
	st := locker.Stats()
	var locks, sessions int
	err := pool.QueryRow(ctx, `SELECT count(*), count(DISTINCT l.pid) FROM pg_locks l
		JOIN pg_stat_activity a ON a.pid = l.pid
		WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1`, appName).Scan(&locks, &sessions)
	close(release)
	done.Wait()
	close(errs)
	for err := range errs {
		return err
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "%d locks held at once by one Locker: %d lock connections, %d pool connections in use\n",
		st.HeldKeys, st.LockConns, pool.Stat().AcquiredConns())
	fmt.Fprintf(w, "pg_locks: %d advisory locks on %d sessions\n", locks, sessions)
	fmt.Fprintf(w, "released: %d held now\n", locker.Stats().HeldKeys)
	return nil
}
