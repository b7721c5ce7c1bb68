package echolock_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/labstack/echo/v4"

	"github.com/pglockkit/kit/middleware/echolock"
	"github.com/pglockkit/kit/pglock"
)

// One payment per order at a time: a request for an order whose payment is
// running elsewhere is refused with 409 Conflict.
func ExampleNew() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer locker.Close()
	orders, err := echolock.New(locker, echolock.Param("id"))
	if err != nil {
		fmt.Println(err)
		return
	}
	e := echo.New()
	e.POST("/orders/:id/pay", func(c echo.Context) error {
		return c.String(http.StatusOK, "paid "+c.Param("id"))
	}, orders)

	// Another replica holds order 42's lock.
	held, err := locker.NewLock(echolock.DefaultNamespace + "example-42")
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := held.Acquire(ctx); err != nil {
		fmt.Println(err)
		return
	}
	rec := httptest.NewRecorder()
	e.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/orders/example-42/pay", nil))
	fmt.Println(rec.Code, "Retry-After:", rec.Header().Get("Retry-After"))

	if err := held.Release(ctx); err != nil {
		fmt.Println(err)
		return
	}
	rec = httptest.NewRecorder()
	e.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/orders/example-42/pay", nil))
	fmt.Println(rec.Code, rec.Body.String())
	// Output:
	// 409 Retry-After: 1
	// 200 paid example-42
}

// In Transaction scope the handler finds the lock's transaction in the
// request's context; a returned error rolls it back.
func ExampleWithConfig() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer locker.Close()
	mw, err := echolock.WithConfig(echolock.Config{
		Locker:       locker,
		KeyExtractor: echolock.Header("Idempotency-Key"),
		Scope:        pglock.Transaction,
		Wait:         5 * time.Second,
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	e := echo.New()
	e.POST("/payments", func(c echo.Context) error {
		tx, ok := pglock.TxFromContext(c.Request().Context())
		if !ok {
			return echo.NewHTTPError(http.StatusBadRequest, "Idempotency-Key required")
		}
		var n int
		if err := tx.QueryRow(c.Request().Context(), "SELECT 40 + 2").Scan(&n); err != nil {
			return err // rolls back
		}
		return c.String(http.StatusCreated, fmt.Sprint("in the lock's transaction: ", n))
	}, mw)

	req := httptest.NewRequest(http.MethodPost, "/payments", nil)
	req.Header.Set("Idempotency-Key", "example-9f2e")
	rec := httptest.NewRecorder()
	e.ServeHTTP(rec, req)
	fmt.Println(rec.Code, rec.Body.String())

	rec = httptest.NewRecorder()
	e.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/payments", nil))
	fmt.Println(rec.Code)
	// Output:
	// 201 in the lock's transaction: 42
	// 400
}

// A nil Locker or KeyExtractor is an error, not a panic.
func ExampleWithConfig_badConfiguration() {
	_, err := echolock.WithConfig(echolock.Config{})
	fmt.Println(err)
	// Output:
	// echolock: nil *pglock.Locker
	// echolock: nil KeyExtractor
}
