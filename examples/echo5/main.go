// Command echo5 runs two Echo v5 servers in one process, as two replicas of
// a service would run: each has its own pool and *pglock.Locker, and both
// serve one SKU's stock behind echo5lock's middleware, keyed by the SKU.
// POST /skus/:sku/reserve waits for the SKU's lock (up to five seconds) in
// Transaction scope: it reads the stock, waits a little, and writes it back
// one lower in the request's transaction, a read-modify-write that oversells
// when two run at once. Five reservations of a SKU with 3 in stock, spread
// over both replicas at once, run one at a time: three are answered 201
// Created and two 422 (out of stock), and the stock ends at 0, not below.
// POST /skus/:sku/recount does not wait: a recount sent to replica-B while
// one runs on replica-A is answered at once with 409 Conflict and
// Retry-After, an *echo.HTTPError that matches echo5lock.ErrBusy. It exits
// within a few seconds.
//
//	go run ./examples/echo5
//
// The database is DATABASE_URL, else a server at 127.0.0.1:5432, else a
// throwaway cluster started from the machine's PostgreSQL binaries. The
// program creates a table of its own and drops it at the end.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/labstack/echo/v5"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/echo5lock"
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

// namespace is the key namespace of both routes: a reservation and a
// recount of one SKU take the same lock, so they never overlap either.
const namespace = "example-skus:"

func run(ctx context.Context, w io.Writer, url string) error {
	var mu sync.Mutex
	start := time.Now()
	p := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(w, "%6.3fs  "+format+"\n", append([]any{time.Since(start).Seconds()}, args...)...)
	}

	admin, err := pgxpool.New(ctx, url)
	if err != nil {
		return err
	}
	defer admin.Close()
	table := pgx.Identifier{fmt.Sprintf("echo5lock_example_stock_%d", time.Now().UnixNano())}.Sanitize()
	if _, err := admin.Exec(ctx, "CREATE TABLE "+table+" (sku text PRIMARY KEY, stock int NOT NULL)"); err != nil {
		return err
	}
	defer func() { _, _ = admin.Exec(context.WithoutCancel(ctx), "DROP TABLE "+table) }()
	sku := fmt.Sprintf("sku-%d", time.Now().UnixNano()%100000)
	if _, err := admin.Exec(ctx, "INSERT INTO "+table+" (sku, stock) VALUES ($1, 3)", sku); err != nil {
		return err
	}

	// reserve: a read-modify-write in the lock's transaction.
	reserve := func(name string) echo.HandlerFunc {
		return func(c *echo.Context) error {
			ctx := c.Request().Context()
			tx, ok := pglock.TxFromContext(ctx)
			if !ok {
				return echo.NewHTTPError(http.StatusInternalServerError, "no transaction")
			}
			var stock int
			if err := tx.QueryRow(ctx, "SELECT stock FROM "+table+" WHERE sku = $1", c.Param("sku")).Scan(&stock); err != nil {
				return err
			}
			time.Sleep(30 * time.Millisecond) // the window in which an unlocked twin would read the same stock
			if stock == 0 {
				p("%s  reserve on 0 in stock: out of stock", name)
				return echo.NewHTTPError(http.StatusUnprocessableEntity, "out of stock")
			}
			if _, err := tx.Exec(ctx, "UPDATE "+table+" SET stock = $2 WHERE sku = $1", c.Param("sku"), stock-1); err != nil {
				return err
			}
			p("%s  reserve on %d in stock -> %d", name, stock, stock-1)
			return c.String(http.StatusCreated, strconv.Itoa(stock-1))
		}
	}
	// recount: counts the shelf; with ?hold=1 it stays until told to finish.
	recountStarted, recountFinish := make(chan struct{}, 1), make(chan struct{})
	recount := func(name string) echo.HandlerFunc {
		return func(c *echo.Context) error {
			p("%s  recount of %s", name, c.Param("sku"))
			if c.QueryParam("hold") != "" {
				recountStarted <- struct{}{}
				<-recountFinish
			}
			return c.String(http.StatusOK, "counted")
		}
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
		// Reservations wait for the SKU's lock (up to 5 s), in a
		// transaction of their own; recounts do not wait, in the Locker's
		// scope (Session).
		reserveLock, err := echo5lock.Config{
			Locker:       locker,
			KeyExtractor: echo5lock.Param("sku"),
			Namespace:    namespace,
			Scope:        new(pglock.Transaction),
			Wait:         5 * time.Second,
		}.ToMiddleware()
		if err != nil {
			locker.Close()
			pool.Close()
			return err
		}
		recountLock, err := echo5lock.Config{
			Locker:       locker,
			KeyExtractor: echo5lock.Param("sku"),
			Namespace:    namespace,
		}.ToMiddleware()
		if err != nil {
			locker.Close()
			pool.Close()
			return err
		}
		e := echo.New()
		answer := e.HTTPErrorHandler
		e.HTTPErrorHandler = func(c *echo.Context, err error) {
			if errors.Is(err, echo5lock.ErrBusy) {
				p("%s  %s %s: the SKU is busy elsewhere (the error matches echo5lock.ErrBusy)", name, c.Request().Method, c.Request().URL.Path)
			}
			answer(c, err)
		}
		e.POST("/skus/:sku/reserve", reserve(name), reserveLock)
		e.POST("/skus/:sku/recount", recount(name), recountLock)
		reps = append(reps, replica{name: name, pool: pool, locker: locker, srv: httptest.NewServer(e)})
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
		slices.Sort(out)
		return out
	}
	stock := func() (int, error) {
		var s int
		err := admin.QueryRow(ctx, "SELECT stock FROM "+table+" WHERE sku = $1", sku).Scan(&s)
		return s, err
	}

	p("5 reservations of %s (3 in stock) at once, alternating between replica-A and replica-B", sku)
	p("answers: %v", send(5, "/skus/"+sku+"/reserve"))
	s, err := stock()
	if err != nil {
		return err
	}
	p("stock: %d (3 reserved, none oversold)", s)

	p("a recount of %s runs on replica-A; another arrives at replica-B meanwhile (fail fast)", sku)
	first := make(chan string, 1)
	go func() { first <- post(reps[0], "/skus/"+sku+"/recount?hold=1") }()
	select {
	case <-recountStarted:
	case <-ctx.Done():
		return ctx.Err()
	}
	p("replica-B answers: %s", post(reps[1], "/skus/"+sku+"/recount"))
	close(recountFinish)
	p("replica-A answers: %s", <-first)

	// Nothing is left behind: every pool connection is back.
	for _, r := range reps {
		if n := r.pool.Stat().AcquiredConns(); n != 0 {
			return fmt.Errorf("%s: %d connections still acquired", r.name, n)
		}
	}
	// And the key is free: a lock on it is granted at once.
	check, err := reps[0].locker.NewLock(namespace + sku)
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
