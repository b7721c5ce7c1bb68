// Command http runs two net/http servers in one process, as two replicas of
// a service would run: each has its own pool and *pglock.Locker, and both
// serve POST /orders/{id}/pay behind httplock's middleware. Eight payment
// requests for order 42, spread over both replicas at once, run one at a
// time (they wait for each other, up to five seconds); then a second refund
// for order 42, sent while a first one runs, is refused at once (no waiting)
// with 409 Conflict and Retry-After. It prints what happened and exits
// within a few seconds.
//
//	go run ./examples/http
//
// The database is DATABASE_URL, else a server at 127.0.0.1:5432, else a
// throwaway cluster started from the machine's PostgreSQL binaries.
package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

func main() {
	if err := withServer(); err != nil {
		log.Fatal(err)
	}
}

func withServer() error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	srv, err := pgtest.FindOrStart(ctx)
	if err != nil {
		return err
	}
	defer srv.Stop()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return run(ctx, os.Stdout, srv.URL)
}

// replica is one instance of the service: its own pool, Locker and server.
type replica struct {
	name   string
	pool   *pgxpool.Pool
	locker *pglock.Locker
	srv    *httptest.Server
}

func run(ctx context.Context, w io.Writer, url string) error {
	var mu sync.Mutex
	start := time.Now()
	p := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(w, "%6.3fs  "+format+"\n", append([]any{time.Since(start).Seconds()}, args...)...)
	}

	// What the handlers do: count how many run at once for the order. A
	// refund with ?hold=1 stays until told to finish.
	var inside, most atomic.Int64
	refundStarted, refundFinish := make(chan struct{}, 1), make(chan struct{})
	work := func(replica, what string) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			n := inside.Add(1)
			defer inside.Add(-1)
			for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
			}
			p("%s  %s order %s  (%d inside)", replica, what, r.PathValue("id"), n)
			if r.URL.Query().Has("hold") {
				refundStarted <- struct{}{}
				<-refundFinish
			} else {
				time.Sleep(50 * time.Millisecond)
			}
			fmt.Fprintf(w, "%s by %s\n", what, replica)
		})
	}

	var reps []replica
	defer func() {
		for _, r := range reps {
			r.srv.Close()
			r.locker.Close()
			r.pool.Close()
		}
	}()
	for _, name := range []string{"replica-A", "replica-B"} {
		cfg, err := pgxpool.ParseConfig(url)
		if err != nil {
			return err
		}
		cfg.MaxConns = 8
		pool, err := pgxpool.NewWithConfig(ctx, cfg)
		if err != nil {
			return err
		}
		locker, err := pglock.NewLocker(pool)
		if err != nil {
			pool.Close()
			return err
		}
		// Payments wait for the order's lock (up to 5 s); refunds do not.
		payLock, err := httplock.Middleware(locker, httplock.PathValue("id"),
			httplock.WithNamespace("example-orders:"), httplock.WithWait(5*time.Second))
		if err != nil {
			locker.Close()
			pool.Close()
			return err
		}
		refundLock, err := httplock.Middleware(locker, httplock.PathValue("id"),
			httplock.WithNamespace("example-orders:"))
		if err != nil {
			locker.Close()
			pool.Close()
			return err
		}
		mux := http.NewServeMux()
		mux.Handle("POST /orders/{id}/pay", payLock(work(name, "pay")))
		mux.Handle("POST /orders/{id}/refund", refundLock(work(name, "refund")))
		reps = append(reps, replica{name: name, pool: pool, locker: locker, srv: httptest.NewServer(mux)})
	}

	post := func(r replica, path string) string {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, r.srv.URL+path, nil)
		resp, err := r.srv.Client().Do(req)
		if err != nil {
			return err.Error()
		}
		defer resp.Body.Close()
		if ra := resp.Header.Get("Retry-After"); ra != "" {
			return resp.Status + ", Retry-After: " + ra
		}
		return resp.Status
	}
	send := func(n int, path string) []string {
		out := make([]string, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() { out[i] = post(reps[i%len(reps)], path) })
		}
		wg.Wait()
		return out
	}

	p("8 payments for order 42 at once, alternating between replica-A and replica-B (waiting on)")
	t0 := time.Now()
	pays := send(8, "/orders/42/pay")
	p("answers: %v", pays)
	p("most handlers inside at once for order 42: %d; 8 x 50 ms took %v", most.Load(), time.Since(t0).Round(10*time.Millisecond))

	p("a refund for order 42 runs on replica-A; another arrives at replica-B meanwhile (fail fast)")
	first := make(chan string, 1)
	go func() { first <- post(reps[0], "/orders/42/refund?hold=1") }()
	select {
	case <-refundStarted:
	case <-ctx.Done():
		return ctx.Err()
	}
	p("replica-B answers: %s", post(reps[1], "/orders/42/refund"))
	close(refundFinish)
	p("replica-A answers: %s", <-first)

	// Nothing is left behind: every pool connection is back.
	for _, r := range reps {
		if n := r.pool.Stat().AcquiredConns(); n != 0 {
			return fmt.Errorf("%s: %d connections still acquired", r.name, n)
		}
	}
	// And the key is free: a lock on it is granted at once.
	check, err := reps[0].locker.NewLock("example-orders:42")
	if err != nil {
		return err
	}
	if ok, err := check.TryAcquire(ctx); err != nil || !ok {
		return fmt.Errorf("the key is still held (%v, %v)", ok, err)
	}
	if err := check.Release(ctx); err != nil {
		return err
	}
	p("done: no lock held, no connection pinned")
	return nil
}
