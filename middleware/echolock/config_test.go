package echolock_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/labstack/echo/v4"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/echolock"
	"github.com/pglockkit/kit/pglock"
)

// TestConstructionErrors: a nil Locker or KeyExtractor, or a field out of
// range, is an error from New and WithConfig, never a panic.
func TestConstructionErrors(t *testing.T) {
	t.Parallel()
	lk, err := pglock.NewLocker(pgtest.Pool(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	if mw, err := echolock.New(nil, echolock.Param("id")); mw != nil || !errors.Is(err, echolock.ErrNilLocker) {
		t.Errorf("New(nil, f) = %v", err)
	}
	if mw, err := echolock.New(lk, nil); mw != nil || !errors.Is(err, echolock.ErrNilKeyExtractor) {
		t.Errorf("New(lk, nil) = %v", err)
	}
	bad := []echolock.Config{
		{Locker: lk, KeyExtractor: echolock.MethodPath(), Wait: -1},
		{Locker: lk, KeyExtractor: echolock.MethodPath(), Scope: 9},
		{Locker: lk, KeyExtractor: echolock.MethodPath(), Mode: 9},
	}
	for i, cfg := range bad {
		if mw, err := echolock.WithConfig(cfg); mw != nil || !errors.Is(err, echolock.ErrInvalidConfig) {
			t.Errorf("bad config %d: %v", i, err)
		}
	}
	if _, err := echolock.WithConfig(echolock.Config{}); !errors.Is(err, echolock.ErrNilLocker) || !errors.Is(err, echolock.ErrNilKeyExtractor) {
		t.Errorf("WithConfig(Config{}) = %v", err)
	}
	// Concurrent requests need a pooled Locker.
	pool := pgtest.Pool(t, 1)
	conn, err := pool.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	connLocker, err := pglock.NewLocker(conn)
	if err != nil {
		t.Fatal(err)
	}
	if mw, err := echolock.New(connLocker, echolock.MethodPath()); mw != nil || !errors.Is(err, echolock.ErrInvalidConfig) {
		t.Errorf("New on a one-connection Locker = %v, want ErrInvalidConfig", err)
	}
}

// TestKeys: a KeyExtractor error is a 400 *echo.HTTPError and the handler
// does not run; no key passes through unlocked; Skipper skips; the
// ready-made extractors read what they say.
func TestKeys(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk, _ := pglock.NewLocker(pool)
	t.Cleanup(func() { _ = lk.Close() })
	id := pgtest.UniqueKey(t)
	key := lockKey(t, lk, id)
	ran := 0
	var held []pgtest.Holder
	h := func(c echo.Context) error {
		ran++
		held = pgtest.Granted(t, watch, key)
		return nil
	}
	serve := func(cfg echolock.Config, route, target string, hdr ...string) (int, error) {
		cfg.Locker = lk
		mw, err := echolock.WithConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		e := echo.New()
		var got error
		e.HTTPErrorHandler = func(err error, c echo.Context) {
			got = err
			e.DefaultHTTPErrorHandler(err, c)
		}
		e.POST(route, h, mw)
		req := httptest.NewRequest(http.MethodPost, target, nil)
		if len(hdr) > 0 { // a header name and its values
			for _, v := range hdr[1:] {
				req.Header.Add(hdr[0], v)
			}
		}
		rec := httptest.NewRecorder()
		e.ServeHTTP(rec, req)
		return rec.Code, got
	}

	failing := func(echo.Context) (string, bool, error) { return "", false, errors.New("no tenant") }
	code, err := serve(echolock.Config{KeyExtractor: failing}, "/", "/")
	var he *echo.HTTPError
	if code != 400 || ran != 0 || !errors.As(err, &he) || !errors.Is(err, echolock.ErrKey) {
		t.Fatalf("key error: %d, ran %d, %v", code, ran, err)
	}
	code, _ = serve(echolock.Config{KeyExtractor: failing, Skipper: func(echo.Context) bool { return true }}, "/", "/")
	if code != 200 || ran != 1 {
		t.Fatalf("skipped: %d, ran %d", code, ran)
	}
	if code, _ = serve(echolock.Config{KeyExtractor: echolock.Param("id")}, "/orders/:id", "/orders/"+id); code != 200 || ran != 2 || len(held) != 1 {
		t.Fatalf("Param: %d, ran %d, held %+v", code, ran, held)
	}
	if code, _ = serve(echolock.Config{KeyExtractor: echolock.Param("id")}, "/orders", "/orders"); code != 400 || ran != 2 {
		t.Fatalf("Param on a route without it: %d, ran %d", code, ran)
	}
	hk := echolock.Header("Idempotency-Key")
	if code, _ = serve(echolock.Config{KeyExtractor: hk}, "/", "/"); code != 200 || ran != 3 || len(held) != 0 {
		t.Fatalf("no header: %d, ran %d, held %+v", code, ran, held)
	}
	if code, _ = serve(echolock.Config{KeyExtractor: hk}, "/", "/", "Idempotency-Key", id); code != 200 || ran != 4 || len(held) != 1 {
		t.Fatalf("header: %d, ran %d, held %+v", code, ran, held)
	}
	if code, _ = serve(echolock.Config{KeyExtractor: hk}, "/", "/", "Idempotency-Key", id, "x"); code != 400 || ran != 4 {
		t.Fatalf("repeated header: %d, ran %d", code, ran)
	}
	q := echolock.QueryParam("id")
	if code, _ = serve(echolock.Config{KeyExtractor: q}, "/", "/?id="+id); code != 200 || ran != 5 || len(held) != 1 {
		t.Fatalf("query: %d, ran %d, held %+v", code, ran, held)
	}
	if code, _ = serve(echolock.Config{KeyExtractor: q}, "/", "/?id=a&id=b"); code != 400 || ran != 5 {
		t.Fatalf("repeated query: %d, ran %d", code, ran)
	}
	e := echo.New()
	c := e.NewContext(httptest.NewRequest(http.MethodPut, "/a/b?x=1", nil), httptest.NewRecorder())
	if k, ok, err := echolock.MethodPath()(c); k != "PUT /a/b" || !ok || err != nil {
		t.Fatalf("MethodPath = %q, %v, %v", k, ok, err)
	}
	pgtest.WaitFree(t, watch, key)
}

// TestDatabaseError: an unreachable database is a 503 *echo.HTTPError that
// matches ErrDatabase and pglock.ErrNotAcquired.
//
// The database is a port where nothing listens (pgtest.UnreachablePool).
func TestDatabaseError(t *testing.T) {
	t.Parallel()
	lk, err := pglock.NewLocker(pgtest.UnreachablePool(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	mw, err := echolock.New(lk, echolock.MethodPath())
	if err != nil {
		t.Fatal(err)
	}
	e := echo.New()
	c := e.NewContext(httptest.NewRequest(http.MethodPost, "/", nil), httptest.NewRecorder())
	err = mw(func(echo.Context) error { t.Error("handler ran"); return nil })(c)
	var he *echo.HTTPError
	if !errors.As(err, &he) || he.Code != http.StatusServiceUnavailable ||
		!errors.Is(err, echolock.ErrDatabase) || !errors.Is(err, pglock.ErrNotAcquired) {
		t.Fatalf("err = %v", err)
	}
	if c.Response().Committed {
		t.Fatal("the middleware wrote a response instead of returning an error")
	}
}
