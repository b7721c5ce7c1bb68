package echolock_test

import (
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/echolock"
	"github.com/pglockkit/kit/pglock"
)

// TestRollbackIsNotASuccess: in Transaction scope a handler that writes a
// 200 and then panics (under Echo's Recover) or returns an error has its
// writes rolled back, and the client gets the panic's 500 or the error's
// status, never the held 200; outer middleware's headers stay, the
// handler's go.
func TestRollbackIsNotASuccess(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	tbl := locktest.Table(t, watch)
	cases := []struct {
		name     string
		after    func() error // runs after the handler wrote 200
		wantCode int
	}{
		{"write then panic", func() error { panic("boom") }, http.StatusInternalServerError},
		{"write then HTTPError", func() error { return echo.NewHTTPError(http.StatusConflict, "no") }, http.StatusConflict},
		{"write then error", func() error { return errors.New("boom") }, http.StatusInternalServerError},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id := pgtest.UniqueKey(t)
			rep := newReplica(t, echolock.Config{Scope: pglock.Transaction}, func(ec echo.Context) error {
				tx, _ := pglock.TxFromContext(ec.Request().Context())
				if _, err := tx.Exec(ec.Request().Context(), "INSERT INTO "+tbl+" VALUES ($1, $2)", id, i); err != nil {
					t.Error(err)
				}
				ec.Response().Header().Set("Location", "/orders/"+id)
				if err := ec.String(http.StatusOK, "paid"); err != nil {
					t.Error(err)
				}
				return c.after()
			})
			rep.e.Logger.SetOutput(io.Discard)
			rep.e.Use(middleware.RecoverWithConfig(middleware.RecoverConfig{DisablePrintStack: true, DisableStackAll: true}))
			rep.e.Pre(func(next echo.HandlerFunc) echo.HandlerFunc {
				return func(c echo.Context) error {
					c.Response().Header().Set("X-Request-Id", "abc") // outer middleware's: kept
					return next(c)
				}
			})
			resp, err := rep.Server.Client().Post(rep.Server.URL+"/orders/"+id, "", nil)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != c.wantCode || strings.Contains(string(body), "paid") ||
				resp.Header.Get("Location") != "" || resp.Header.Get("X-Request-Id") != "abc" {
				t.Errorf("response %d %q %v; want %d without the handler's body and headers, with the outer ones",
					resp.StatusCode, body, resp.Header, c.wantCode)
			}
			if n := locktest.Count(t, watch, tbl, id); n != 0 {
				t.Errorf("%d rows after a rollback", n)
			}
			pgtest.WaitFree(t, watch, lockKey(t, rep.Locker, id))
			locktest.NoConnsLeft(t, rep.Pool)
		})
	}
}

// TestFollowsLocker: Config's zero Scope and Mode take the Locker's scope
// and mode; a non-zero Scope or Mode, or ScopeSet / ModeSet with the zero
// value, overrides them.
func TestFollowsLocker(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	pool := pgtest.Pool(t, 4)
	txShared, err := pglock.NewLocker(pool, pglock.WithScope(pglock.Transaction), pglock.WithMode(pglock.Shared))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = txShared.Close() })
	plain, err := pglock.NewLocker(pool)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = plain.Close() })
	cases := []struct {
		name     string
		locker   *pglock.Locker
		cfg      echolock.Config
		wantTx   bool
		wantMode string
	}{
		{"zero follows a Transaction/Shared Locker", txShared, echolock.Config{}, true, "ShareLock"},
		{"ScopeSet and ModeSet force Session/Exclusive", txShared, echolock.Config{ScopeSet: true, ModeSet: true}, false, "ExclusiveLock"},
		{"zero follows a default Locker", plain, echolock.Config{}, false, "ExclusiveLock"},
		{"non-zero overrides a default Locker", plain, echolock.Config{Scope: pglock.Transaction, Mode: pglock.Shared}, true, "ShareLock"},
	}
	for _, c := range cases {
		id := pgtest.UniqueKey(t)
		key := lockKey(t, c.locker, id)
		var gotTx bool
		var held []pgtest.Holder
		c.cfg.Locker, c.cfg.KeyExtractor = c.locker, echolock.Param("id")
		mw, err := echolock.WithConfig(c.cfg)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		e := echo.New()
		e.POST("/orders/:id", func(ec echo.Context) error {
			_, gotTx = pglock.TxFromContext(ec.Request().Context())
			held = pgtest.Granted(t, watch, key)
			return ec.NoContent(http.StatusNoContent)
		}, mw)
		rec := httptest.NewRecorder()
		e.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/orders/"+id, nil))
		if rec.Code != http.StatusNoContent || gotTx != c.wantTx || len(held) != 1 || held[0].Mode != c.wantMode {
			t.Errorf("%s: status %d, tx %v, pg_locks %+v; want tx %v and one %s", c.name, rec.Code, gotTx, held, c.wantTx, c.wantMode)
		}
		pgtest.WaitFree(t, watch, key)
	}
	locktest.NoConnsLeft(t, pool)
}

// TestBadModeFunc: a ModeFunc that returns a mode other than Exclusive or
// Shared is a configuration error: a 500 *echo.HTTPError matching
// ErrInvalidConfig (not ErrDatabase), logged; the handler does not run and
// nothing is locked.
func TestBadModeFunc(t *testing.T) {
	t.Parallel()
	var logs locktest.SyncBuffer
	var ran bool
	var herr error
	rep := newReplica(t, echolock.Config{
		ModeFunc: func(echo.Context) pglock.Mode { return 9 },
		Logger:   slog.New(slog.NewTextHandler(&logs, nil)),
	}, func(echo.Context) error { ran = true; return nil })
	def := rep.e.HTTPErrorHandler
	rep.e.HTTPErrorHandler = func(err error, c echo.Context) { herr = err; def(err, c) }
	id := pgtest.UniqueKey(t)
	rec := httptest.NewRecorder()
	rep.e.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/orders/"+id, nil))
	var he *echo.HTTPError
	if rec.Code != http.StatusInternalServerError || ran || !errors.As(herr, &he) ||
		!errors.Is(herr, echolock.ErrInvalidConfig) || errors.Is(herr, echolock.ErrDatabase) {
		t.Fatalf("status %d, ran %v, error %v; want 500 matching ErrInvalidConfig only", rec.Code, ran, herr)
	}
	if !strings.Contains(logs.String(), "invalid config") {
		t.Fatalf("logs %q, want the error logged", logs.String())
	}
	watch := pgtest.Pool(t, 2)
	pgtest.WaitFree(t, watch, lockKey(t, rep.Locker, id))
	locktest.NoConnsLeft(t, rep.Pool)
}
