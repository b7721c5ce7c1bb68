package echo5lock_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/labstack/echo/v5"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/echo5lock"
	"github.com/pglockkit/kit/pglock"
)

// TestConstructionErrors: a nil Locker or KeyExtractor, a Locker on one
// connection, or a field out of range, is an error from New, WithConfig and
// ToMiddleware, never a panic.
func TestConstructionErrors(t *testing.T) {
	t.Parallel()
	lk, err := pglock.NewLocker(pgtest.Pool(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	if mw, err := echo5lock.New(nil, echo5lock.Param("id")); mw != nil || !errors.Is(err, echo5lock.ErrNilLocker) {
		t.Errorf("New(nil, f) = %v", err)
	}
	if mw, err := echo5lock.New(lk, nil); mw != nil || !errors.Is(err, echo5lock.ErrNilKeyExtractor) {
		t.Errorf("New(lk, nil) = %v", err)
	}
	bad := []echo5lock.Config{
		{Locker: lk, KeyExtractor: echo5lock.MethodPath(), Wait: -1},
		{Locker: lk, KeyExtractor: echo5lock.MethodPath(), Scope: new(pglock.Scope(9))},
		{Locker: lk, KeyExtractor: echo5lock.MethodPath(), Mode: new(pglock.Mode(9))},
	}
	for i, cfg := range bad {
		if mw, err := cfg.ToMiddleware(); mw != nil || !errors.Is(err, echo5lock.ErrInvalidConfig) {
			t.Errorf("bad config %d: ToMiddleware: %v", i, err)
		}
		if mw, err := echo5lock.WithConfig(cfg); mw != nil || !errors.Is(err, echo5lock.ErrInvalidConfig) {
			t.Errorf("bad config %d: WithConfig: %v", i, err)
		}
	}
	if _, err := (echo5lock.Config{}).ToMiddleware(); !errors.Is(err, echo5lock.ErrNilLocker) || !errors.Is(err, echo5lock.ErrNilKeyExtractor) {
		t.Errorf("Config{}.ToMiddleware() = %v", err)
	}
	// Echo's MiddlewareConfigurator, as e.g. a list of configs would use it.
	var mc echo.MiddlewareConfigurator = echo5lock.Config{Locker: lk, KeyExtractor: echo5lock.MethodPath()}
	if mw, err := mc.ToMiddleware(); mw == nil || err != nil {
		t.Errorf("a good Config as an echo.MiddlewareConfigurator: %v", err)
	}
	// Concurrent requests need a pooled Locker.
	conn, err := pgtest.Pool(t, 1).Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	connLocker, err := pglock.NewLocker(conn)
	if err != nil {
		t.Fatal(err)
	}
	if mw, err := echo5lock.New(connLocker, echo5lock.MethodPath()); mw != nil || !errors.Is(err, echo5lock.ErrInvalidConfig) {
		t.Errorf("New on a one-connection Locker = %v, want ErrInvalidConfig", err)
	}
}

// TestKeys: a KeyExtractor error is a 400 *echo.HTTPError and the handler
// does not run; no key passes through unlocked and untouched; Skipper
// skips; the ready-made extractors read what they say.
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
	var sawTx bool
	h := func(c *echo.Context) error {
		ran++
		held = pgtest.Granted(t, watch, key)
		_, sawTx = pglock.TxFromContext(c.Request().Context())
		return nil
	}
	do := func(cfg echo5lock.Config, route, target string, hdr ...string) (int, error) {
		cfg.Locker = lk
		mw, err := cfg.ToMiddleware()
		if err != nil {
			t.Fatal(err)
		}
		e := echo.New()
		e.POST(route, h, mw)
		req := httptest.NewRequest(http.MethodPost, target, nil)
		if len(hdr) > 0 { // a header name and its values
			for _, v := range hdr[1:] {
				req.Header.Add(hdr[0], v)
			}
		}
		rec, err := serve(e, req)
		return rec.Code, err
	}

	failing := func(*echo.Context) (string, bool, error) { return "", false, errors.New("no tenant") }
	code, err := do(echo5lock.Config{KeyExtractor: failing}, "/", "/")
	var he *echo.HTTPError
	if code != 400 || ran != 0 || !errors.As(err, &he) || he.Code != 400 || !errors.Is(err, echo5lock.ErrKey) {
		t.Fatalf("key error: %d, ran %d, %v", code, ran, err)
	}
	code, _ = do(echo5lock.Config{KeyExtractor: failing, Skipper: func(*echo.Context) bool { return true }}, "/", "/")
	if code != 200 || ran != 1 {
		t.Fatalf("skipped: %d, ran %d", code, ran)
	}
	if code, _ = do(echo5lock.Config{KeyExtractor: echo5lock.Param("id")}, "/orders/:id", "/orders/"+id); code != 200 || ran != 2 || len(held) != 1 {
		t.Fatalf("Param: %d, ran %d, held %+v", code, ran, held)
	}
	if code, _ = do(echo5lock.Config{KeyExtractor: echo5lock.Param("id")}, "/orders", "/orders"); code != 400 || ran != 2 {
		t.Fatalf("Param on a route without it: %d, ran %d", code, ran)
	}
	hk := echo5lock.Header("Idempotency-Key")
	tx := new(pglock.Transaction)
	if code, _ = do(echo5lock.Config{KeyExtractor: hk, Scope: tx}, "/", "/"); code != 200 || ran != 3 || len(held) != 0 || sawTx {
		t.Fatalf("no header: %d, ran %d, held %+v, tx %v: want passed through untouched", code, ran, held, sawTx)
	}
	if code, _ = do(echo5lock.Config{KeyExtractor: hk, Scope: tx}, "/", "/", "Idempotency-Key", id); code != 200 || ran != 4 || len(held) != 1 || !sawTx {
		t.Fatalf("header: %d, ran %d, held %+v, tx %v", code, ran, held, sawTx)
	}
	if code, _ = do(echo5lock.Config{KeyExtractor: hk}, "/", "/", "Idempotency-Key", id, "x"); code != 400 || ran != 4 {
		t.Fatalf("repeated header: %d, ran %d", code, ran)
	}
	q := echo5lock.QueryParam("id")
	if code, _ = do(echo5lock.Config{KeyExtractor: q}, "/", "/?id="+id); code != 200 || ran != 5 || len(held) != 1 {
		t.Fatalf("query: %d, ran %d, held %+v", code, ran, held)
	}
	if code, _ = do(echo5lock.Config{KeyExtractor: q}, "/", "/?id=a&id=b"); code != 400 || ran != 5 {
		t.Fatalf("repeated query: %d, ran %d", code, ran)
	}
	c := echo.New().NewContext(httptest.NewRequest(http.MethodPut, "/a/b?x=1", nil), httptest.NewRecorder())
	if k, ok, err := echo5lock.MethodPath()(c); k != "PUT /a/b" || !ok || err != nil {
		t.Fatalf("MethodPath = %q, %v, %v", k, ok, err)
	}
	pgtest.WaitFree(t, watch, key)
}

// TestDatabaseError: an unreachable database is a 503 *echo.HTTPError that
// matches ErrDatabase and pglock.ErrNotAcquired, returned, not written.
//
// The database is a port where nothing listens (pgtest.UnreachablePool).
func TestDatabaseError(t *testing.T) {
	t.Parallel()
	lk, err := pglock.NewLocker(pgtest.UnreachablePool(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		mw, err := echo5lock.Config{Locker: lk, KeyExtractor: echo5lock.MethodPath(), Scope: new(scope)}.ToMiddleware()
		if err != nil {
			t.Fatal(err)
		}
		c := echo.New().NewContext(httptest.NewRequest(http.MethodPost, "/", nil), httptest.NewRecorder())
		err = mw(func(*echo.Context) error { t.Error("handler ran"); return nil })(c)
		var he *echo.HTTPError
		if !errors.As(err, &he) || he.Code != http.StatusServiceUnavailable ||
			!errors.Is(err, echo5lock.ErrDatabase) || !errors.Is(err, pglock.ErrNotAcquired) {
			t.Fatalf("%v: err = %v", scope, err)
		}
		if resp, uerr := echo.UnwrapResponse(c.Response()); uerr != nil || resp.Committed {
			t.Fatalf("%v: the middleware wrote a response instead of returning an error (%v)", scope, uerr)
		}
	}
}

// TestAnswerHandlersMayWrite: a DenyHandler or ErrorHandler that writes its
// answer itself (as Echo's rate limiter documents) reaches the client, in
// Transaction scope too, where the handler's response is held back.
func TestAnswerHandlersMayWrite(t *testing.T) {
	t.Parallel()
	id := pgtest.UniqueKey(t)
	rep := newReplica(t, echo5lock.Config{
		Scope: new(pglock.Transaction),
		KeyExtractor: func(c *echo.Context) (string, bool, error) {
			if c.Param("id") == "bad" {
				return "", false, errors.New("bad id")
			}
			return c.Param("id"), true, nil
		},
		DenyHandler: func(c *echo.Context, key string, err error) error {
			return c.JSON(http.StatusTooManyRequests, map[string]string{"busy": key})
		},
		ErrorHandler: func(c *echo.Context, err error) error {
			return c.String(http.StatusTeapot, "no key")
		},
	}, func(c *echo.Context) error { t.Error("handler ran"); return nil })
	locktest.HoldElsewhere(t, lockKey(t, rep.Locker, id))
	if r := post(rep, id); r.Status != http.StatusTooManyRequests || r.Body != `{"busy":"http:`+id+`"}`+"\n" || r.RetryAfter != "1" {
		t.Errorf("busy: %+v", r)
	}
	if r := post(rep, "bad"); r.Status != http.StatusTeapot || r.Body != "no key" {
		t.Errorf("bad key: %+v", r)
	}
	locktest.NoConnsLeft(t, rep.Pool)
}
