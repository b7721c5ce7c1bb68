package echosuite

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// constructionErrors: a nil Locker or KeyExtractor, a Locker on one
// connection, or a field out of range, is an error from New and WithConfig,
// never a panic.
func (s *suite[C]) constructionErrors(t *testing.T) {
	a := s.a
	lk, err := pglock.NewLocker(pgtest.Pool(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	if mw, err := a.New(nil, a.ParamKey("id")); mw != nil || !errors.Is(err, a.Errors.NilLocker) {
		t.Errorf("New(nil, f) = %v", err)
	}
	if mw, err := a.New(lk, nil); mw != nil || !errors.Is(err, a.Errors.NilKeyExtractor) {
		t.Errorf("New(lk, nil) = %v", err)
	}
	bad := []config[C]{
		{Locker: lk, KeyExtractor: a.MethodPathKey(), Wait: -1},
		{Locker: lk, KeyExtractor: a.MethodPathKey(), Scope: new(pglock.Scope(9))},
		{Locker: lk, KeyExtractor: a.MethodPathKey(), Mode: new(pglock.Mode(9))},
	}
	for i, cfg := range bad {
		if mw, err := a.Middleware(cfg); mw != nil || !errors.Is(err, a.Errors.InvalidConfig) {
			t.Errorf("bad config %d: %v", i, err)
		}
	}
	if _, err := a.Middleware(config[C]{}); !errors.Is(err, a.Errors.NilLocker) || !errors.Is(err, a.Errors.NilKeyExtractor) {
		t.Errorf("an empty Config: %v", err)
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
	if mw, err := a.New(connLocker, a.MethodPathKey()); mw != nil || !errors.Is(err, a.Errors.InvalidConfig) {
		t.Errorf("New on a one-connection Locker = %v, want ErrInvalidConfig", err)
	}
}

// keys: a KeyExtractor error is a 400 *echo.HTTPError and the handler does
// not run; no key passes through unlocked and untouched (no transaction in
// Transaction scope); Skipper skips; the ready-made extractors read what
// they say.
func (s *suite[C]) keys(t *testing.T) {
	a := s.a
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	lk, _ := pglock.NewLocker(pool)
	t.Cleanup(func() { _ = lk.Close() })
	id := uniqueID(t)
	key := s.lockKey(t, lk, id)
	ran := 0
	var held []pgtest.Holder
	var sawTx bool
	h := func(c C) error {
		ran++
		held = pgtest.Granted(t, watch, key)
		_, sawTx = pglock.TxFromContext(a.Request(c).Context())
		return nil
	}
	do := func(cfg config[C], route, target string, hdr ...string) (int, error) {
		cfg.Locker = lk
		var got error
		e, err := s.mount(cfg, App{Routes: []string{route}, Handled: func(err error) { got = err }}, h)
		if err != nil {
			t.Fatal(err)
		}
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

	failing := func(C) (string, bool, error) { return "", false, errors.New("no tenant") }
	code, err := do(config[C]{KeyExtractor: failing}, "/", "/")
	if hc, ok := a.HTTPErrorCode(err); code != 400 || ran != 0 || !ok || hc != 400 || !errors.Is(err, a.Errors.Key) {
		t.Fatalf("key error: %d, ran %d, %v", code, ran, err)
	}
	code, _ = do(config[C]{KeyExtractor: failing, Skipper: func(C) bool { return true }}, "/", "/")
	if code != 200 || ran != 1 {
		t.Fatalf("skipped: %d, ran %d", code, ran)
	}
	if code, _ = do(config[C]{KeyExtractor: a.ParamKey("id")}, "/orders/:id", "/orders/"+id); code != 200 || ran != 2 || len(held) != 1 {
		t.Fatalf("Param: %d, ran %d, held %+v", code, ran, held)
	}
	if code, _ = do(config[C]{KeyExtractor: a.ParamKey("id")}, "/orders", "/orders"); code != 400 || ran != 2 {
		t.Fatalf("Param on a route without it: %d, ran %d", code, ran)
	}
	hk := a.HeaderKey("Idempotency-Key")
	tx := new(pglock.Transaction)
	if code, _ = do(config[C]{KeyExtractor: hk, Scope: tx}, "/", "/"); code != 200 || ran != 3 || len(held) != 0 || sawTx {
		t.Fatalf("no header: %d, ran %d, held %+v, tx %v: want passed through untouched", code, ran, held, sawTx)
	}
	if code, _ = do(config[C]{KeyExtractor: hk, Scope: tx}, "/", "/", "Idempotency-Key", id); code != 200 || ran != 4 || len(held) != 1 || !sawTx {
		t.Fatalf("header: %d, ran %d, held %+v, tx %v", code, ran, held, sawTx)
	}
	if code, _ = do(config[C]{KeyExtractor: hk}, "/", "/", "Idempotency-Key", id, "x"); code != 400 || ran != 4 {
		t.Fatalf("repeated header: %d, ran %d", code, ran)
	}
	q := a.QueryParamKey("id")
	if code, _ = do(config[C]{KeyExtractor: q}, "/", "/?id="+id); code != 200 || ran != 5 || len(held) != 1 {
		t.Fatalf("query: %d, ran %d, held %+v", code, ran, held)
	}
	if code, _ = do(config[C]{KeyExtractor: q}, "/", "/?id=a&id=b"); code != 400 || ran != 5 {
		t.Fatalf("repeated query: %d, ran %d", code, ran)
	}
	c := a.NewContext(httptest.NewRequest(http.MethodPut, "/a/b?x=1", nil), httptest.NewRecorder())
	if k, ok, err := a.MethodPathKey()(c); k != "PUT /a/b" || !ok || err != nil {
		t.Fatalf("MethodPath = %q, %v, %v", k, ok, err)
	}
	pgtest.WaitFree(t, watch, key)
}

// databaseError: an unreachable database is a 503 *echo.HTTPError that
// matches ErrDatabase and pglock.ErrNotAcquired, returned, not written, in
// both scopes.
//
// The database is a port where nothing listens (pgtest.UnreachablePool).
func (s *suite[C]) databaseError(t *testing.T) {
	a := s.a
	lk, err := pglock.NewLocker(pgtest.UnreachablePool(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		mw, err := a.Middleware(config[C]{Locker: lk, KeyExtractor: a.MethodPathKey(), Scope: &scope})
		if err != nil {
			t.Fatal(err)
		}
		c := a.NewContext(httptest.NewRequest(http.MethodPost, "/", nil), httptest.NewRecorder())
		err = mw(func(C) error { t.Error("handler ran"); return nil })(c)
		if code, ok := a.HTTPErrorCode(err); !ok || code != http.StatusServiceUnavailable ||
			!errors.Is(err, a.Errors.Database) || !errors.Is(err, pglock.ErrNotAcquired) {
			t.Fatalf("%v: err = %v", scope, err)
		}
		if a.Committed(c) {
			t.Fatalf("%v: the middleware wrote a response instead of returning an error", scope)
		}
	}
}
