// Command echo runs two Echo servers in one process, as two replicas of a
// service would run: each has its own pool and *pglock.Locker, and both serve
// POST /accounts/:id/deposit behind echolock's middleware in Transaction
// scope. A deposit reads the account's balance, waits a little, and writes
// the new balance in the request's transaction, a read-modify-write that
// loses updates when two run at once. Six deposits of 10 for one account,
// spread over both replicas at once, run one at a time and the balance ends
// at 60; a withdrawal that would overdraw returns an error, and its write is
// rolled back with the lock. It exits within a few seconds.
//
//	go run ./examples/echo
//
// The database is DATABASE_URL, else a server at 127.0.0.1:5432, else a
// throwaway cluster started from the machine's PostgreSQL binaries. The
// program creates a table of its own and drops it at the end.
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
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/labstack/echo/v4"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/echolock"
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

	admin, err := pgxpool.New(ctx, url)
	if err != nil {
		return err
	}
	defer admin.Close()
	table := pgx.Identifier{fmt.Sprintf("echolock_example_ledger_%d", time.Now().UnixNano())}.Sanitize()
	if _, err := admin.Exec(ctx, "CREATE TABLE "+table+
		" (seq bigserial PRIMARY KEY, account text NOT NULL, balance int NOT NULL)"); err != nil {
		return err
	}
	defer func() { _, _ = admin.Exec(context.WithoutCancel(ctx), "DROP TABLE "+table) }()
	account := fmt.Sprintf("acct-%d", time.Now().UnixNano()%100000)

	// The handler: a read-modify-write in the lock's transaction.
	deposit := func(name string) echo.HandlerFunc {
		return func(c echo.Context) error {
			ctx := c.Request().Context()
			tx, ok := pglock.TxFromContext(ctx)
			if !ok {
				return echo.NewHTTPError(http.StatusInternalServerError, "no transaction")
			}
			amount, err := strconv.Atoi(c.QueryParam("amount"))
			if err != nil {
				return echo.NewHTTPError(http.StatusBadRequest, "amount must be an integer")
			}
			var balance int
			err = tx.QueryRow(ctx, "SELECT coalesce((SELECT balance FROM "+table+
				" WHERE account = $1 ORDER BY seq DESC LIMIT 1), 0)", c.Param("id")).Scan(&balance)
			if err != nil {
				return err
			}
			time.Sleep(30 * time.Millisecond) // the window in which an unlocked twin would read the same balance
			if _, err := tx.Exec(ctx, "INSERT INTO "+table+" (account, balance) VALUES ($1, $2)",
				c.Param("id"), balance+amount); err != nil {
				return err
			}
			if balance+amount < 0 {
				p("%s  %+d on %d: insufficient funds, returning an error (the insert rolls back)", name, amount, balance)
				return echo.NewHTTPError(http.StatusUnprocessableEntity, "insufficient funds")
			}
			p("%s  %+d on %d -> %d", name, amount, balance, balance+amount)
			return c.String(http.StatusCreated, strconv.Itoa(balance+amount))
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
		accounts, err := echolock.WithConfig(echolock.Config{
			Locker:       locker,
			KeyExtractor: echolock.Param("id"),
			Namespace:    "example-accounts:",
			Scope:        pglock.Transaction,
			Wait:         5 * time.Second,
		})
		if err != nil {
			locker.Close()
			pool.Close()
			return err
		}
		e := echo.New()
		e.HideBanner, e.HidePort = true, true
		e.POST("/accounts/:id/deposit", deposit(name), accounts)
		reps = append(reps, replica{name: name, pool: pool, locker: locker, srv: httptest.NewServer(e)})
	}

	send := func(n int, amount int) []string {
		out := make([]string, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				r := reps[i%len(reps)]
				url := fmt.Sprintf("%s/accounts/%s/deposit?amount=%d", r.srv.URL, account, amount)
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, nil)
				resp, err := r.srv.Client().Do(req)
				if err != nil {
					out[i] = err.Error()
					return
				}
				resp.Body.Close()
				out[i] = strconv.Itoa(resp.StatusCode)
			})
		}
		wg.Wait()
		return out
	}
	balance := func() (int, error) {
		var b int
		err := admin.QueryRow(ctx, "SELECT coalesce((SELECT balance FROM "+table+
			" WHERE account = $1 ORDER BY seq DESC LIMIT 1), 0)", account).Scan(&b)
		return b, err
	}

	p("6 deposits of +10 for %s at once, alternating between replica-A and replica-B", account)
	p("answers: %v", send(6, 10))
	b, err := balance()
	if err != nil {
		return err
	}
	p("balance: %d (6 x 10: no update was lost)", b)

	p("a withdrawal of -100")
	p("answers: %v", send(1, -100))
	b, err = balance()
	if err != nil {
		return err
	}
	p("balance: %d (the failed withdrawal's write was rolled back)", b)

	for _, r := range reps {
		if n := r.pool.Stat().AcquiredConns(); n != 0 {
			return fmt.Errorf("%s: %d connections still acquired", r.name, n)
		}
	}
	// And the key is free: a lock on it is granted at once.
	check, err := reps[0].locker.NewLock("example-accounts:" + account)
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
