package httplock_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

// One payment per order at a time: a second request for the same order,
// made while the first one runs, is refused with 409 Conflict.
func ExampleMiddleware() {
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
	orders, err := httplock.Middleware(locker, httplock.PathValue("id"),
		httplock.WithNamespace("httplock-example-orders:"))
	if err != nil {
		fmt.Println(err)
		return
	}

	inside, done := make(chan struct{}), make(chan struct{})
	pay := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Has("slow") {
			close(inside)
			<-done
		}
		fmt.Fprintln(w, "paid", r.PathValue("id"))
	})
	mux := http.NewServeMux()
	mux.Handle("POST /orders/{id}/pay", orders(pay)) // wrap the route's handler
	srv := httptest.NewServer(mux)
	defer srv.Close()

	first := make(chan int)
	go func() {
		resp, err := srv.Client().Post(srv.URL+"/orders/42/pay?slow=1", "", nil)
		if err != nil {
			first <- 0
			return
		}
		resp.Body.Close()
		first <- resp.StatusCode
	}()
	<-inside
	resp, err := srv.Client().Post(srv.URL+"/orders/42/pay", "", nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	resp.Body.Close()
	fmt.Println("second request:", resp.StatusCode, "Retry-After:", resp.Header.Get("Retry-After"))
	close(done)
	fmt.Println("first request:", <-first)
	// Output:
	// second request: 409 Retry-After: 1
	// first request: 200
}

// At most two exports per tenant at once, across every replica: a third
// request for the tenant, made while two run, is refused with 409 Conflict
// (with WithWait it would queue for a slot instead).
func ExampleWithLimit() {
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
	exports, err := httplock.Middleware(locker, httplock.PathValue("tenant"),
		httplock.WithNamespace("httplock-example-exports:"), httplock.WithLimit(2))
	if err != nil {
		fmt.Println(err)
		return
	}

	inside, done := make(chan struct{}), make(chan struct{})
	export := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Has("slow") {
			inside <- struct{}{}
			<-done
		}
		fmt.Fprintln(w, "exported", r.PathValue("tenant"))
	})
	mux := http.NewServeMux()
	mux.Handle("POST /tenants/{tenant}/exports", exports(export))
	srv := httptest.NewServer(mux)
	defer srv.Close()

	slow := make(chan int, 2)
	for range 2 {
		go func() {
			resp, err := srv.Client().Post(srv.URL+"/tenants/acme/exports?slow=1", "", nil)
			if err != nil {
				slow <- 0
				return
			}
			resp.Body.Close()
			slow <- resp.StatusCode
		}()
		<-inside
	}
	resp, err := srv.Client().Post(srv.URL+"/tenants/acme/exports", "", nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	resp.Body.Close()
	fmt.Println("third export:", resp.StatusCode)
	resp, err = srv.Client().Post(srv.URL+"/tenants/globex/exports", "", nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	resp.Body.Close()
	fmt.Println("another tenant:", resp.StatusCode)
	close(done)
	fmt.Println("first two:", <-slow, <-slow)
	// Output:
	// third export: 409
	// another tenant: 200
	// first two: 200 200
}

// In Transaction scope the handler finds the lock's transaction in its
// context: its writes commit with the lock when it answers below 500, and
// roll back otherwise.
func ExampleWithScope() {
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
	h, err := httplock.Handler(locker, httplock.Header("Idempotency-Key"),
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			tx, ok := pglock.TxFromContext(r.Context())
			if !ok {
				fmt.Println("no key, no transaction")
				return
			}
			var n int
			if err := tx.QueryRow(r.Context(), "SELECT 40 + 2").Scan(&n); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			fmt.Println("in the lock's transaction:", n)
			w.WriteHeader(http.StatusCreated)
		}),
		httplock.WithScope(pglock.Transaction),
		httplock.WithWait(5*time.Second))
	if err != nil {
		fmt.Println(err)
		return
	}

	req := httptest.NewRequest(http.MethodPost, "/payments", nil)
	req.Header.Set("Idempotency-Key", "example-7d1c4a")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	fmt.Println("status:", rec.Code)

	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/payments", nil))
	fmt.Println("status:", rec.Code)
	// Output:
	// in the lock's transaction: 42
	// status: 201
	// no key, no transaction
	// status: 200
}

// A nil Locker or KeyFunc is an error at construction.
func ExampleHandler_badConfiguration() {
	_, err := httplock.Handler(nil, nil, http.NotFoundHandler())
	fmt.Println(err)
	// Output:
	// httplock: nil *pglock.Locker
	// httplock: nil KeyFunc
}
