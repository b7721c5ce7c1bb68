package echo5lock_test

import (
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

// TestConfigurator: Config is an echo.MiddlewareConfigurator, and WithConfig
// is its ToMiddleware under echolock's name, with the same errors (the
// suite's ConstructionErrors goes through ToMiddleware), never a panic.
func TestConfigurator(t *testing.T) {
	t.Parallel()
	lk, err := pglock.NewLocker(pgtest.Pool(t, 1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	bad := []echo5lock.Config{
		{Locker: lk, KeyExtractor: echo5lock.MethodPath(), Wait: -1},
		{Locker: lk, KeyExtractor: echo5lock.MethodPath(), Scope: new(pglock.Scope(9))},
		{Locker: lk, KeyExtractor: echo5lock.MethodPath(), Mode: new(pglock.Mode(9))},
	}
	for i, cfg := range bad {
		if mw, err := echo5lock.WithConfig(cfg); mw != nil || !errors.Is(err, echo5lock.ErrInvalidConfig) {
			t.Errorf("bad config %d: WithConfig: %v", i, err)
		}
	}
	if _, err := echo5lock.WithConfig(echo5lock.Config{}); !errors.Is(err, echo5lock.ErrNilLocker) || !errors.Is(err, echo5lock.ErrNilKeyExtractor) {
		t.Errorf("WithConfig(Config{}) = %v", err)
	}
	// Echo's MiddlewareConfigurator, as e.g. a list of configs would use it.
	var mc echo.MiddlewareConfigurator = echo5lock.Config{Locker: lk, KeyExtractor: echo5lock.MethodPath()}
	if mw, err := mc.ToMiddleware(); mw == nil || err != nil {
		t.Errorf("a good Config as an echo.MiddlewareConfigurator: %v", err)
	}
}

// TestPointersReadOnce: the Config's Scope and Mode pointers are read by
// ToMiddleware: changing them later changes nothing.
func TestPointersReadOnce(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t, 4)
	plain, err := pglock.NewLocker(pool)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = plain.Close() })
	scope := pglock.Transaction
	mw, err := echo5lock.Config{Locker: plain, KeyExtractor: echo5lock.MethodPath(), Scope: &scope}.ToMiddleware()
	if err != nil {
		t.Fatal(err)
	}
	scope = pglock.Session
	var gotTx bool
	e := echo.New()
	e.POST("/", func(ec *echo.Context) error { _, gotTx = pglock.TxFromContext(ec.Request().Context()); return nil }, mw)
	e.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, "/", nil))
	if !gotTx {
		t.Error("a Scope changed after ToMiddleware changed the middleware")
	}
	locktest.NoConnsLeft(t, pool)
}
