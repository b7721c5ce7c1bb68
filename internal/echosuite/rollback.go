package echosuite

import (
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// rollbackIsNotASuccess: in Transaction scope a handler that writes a 200
// and then panics (under Echo's Recover) or returns an error has its writes
// rolled back, and the client gets the panic's 500 or the error's status,
// never the held 200; outer middleware's headers stay, the handler's go.
func (s *suite[C]) rollbackIsNotASuccess(t *testing.T) {
	a := s.a
	watch := pgtest.Pool(t, 2)
	tbl := locktest.Table(t, watch)
	cases := []struct {
		name     string
		after    func() error // runs after the handler wrote 200
		wantCode int
	}{
		{"write then panic", func() error { panic("boom") }, http.StatusInternalServerError},
		{"write then HTTPError", func() error { return a.HTTPError(http.StatusConflict, "no", nil) }, http.StatusConflict},
		{"write then error", func() error { return errors.New("boom") }, http.StatusInternalServerError},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			id := uniqueID(t)
			rep := s.replica(t, config[C]{Scope: new(pglock.Transaction)}, App{Recover: true, RequestID: true}, func(c C) error {
				ctx := a.Request(c).Context()
				tx, _ := pglock.TxFromContext(ctx)
				if _, err := tx.Exec(ctx, "INSERT INTO "+tbl+" VALUES ($1, $2)", id, i); err != nil {
					t.Error(err)
				}
				a.Response(c).Header().Set("Location", "/orders/"+id)
				if err := a.String(c, http.StatusOK, "paid"); err != nil {
					t.Error(err)
				}
				return tc.after()
			})
			resp, err := rep.Server.Client().Post(rep.Server.URL+"/orders/"+id, "", nil)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.wantCode || strings.Contains(string(body), "paid") ||
				resp.Header.Get("Location") != "" || resp.Header.Get("X-Request-Id") != "abc" {
				t.Errorf("response %d %q %v; want %d without the handler's body and headers, with the outer ones",
					resp.StatusCode, body, resp.Header, tc.wantCode)
			}
			if n := locktest.Count(t, watch, tbl, id); n != 0 {
				t.Errorf("%d rows after a rollback", n)
			}
			pgtest.WaitFree(t, watch, s.lockKey(t, rep.Locker, id))
			locktest.NoConnsLeft(t, rep.Pool)
		})
	}
}

// followsLocker: the Config's Scope and Mode follow the Locker's scope and
// mode unless they are set (each adapter says "set" its own way: Echo v5
// with a pointer, Echo v4 with a non-zero value or ScopeSet and ModeSet);
// set, they override it, the zero values included.
func (s *suite[C]) followsLocker(t *testing.T) {
	a := s.a
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
		cfg      config[C]
		wantTx   bool
		wantMode string
	}{
		{"unset follows a Transaction/Shared Locker", txShared, config[C]{}, true, "ShareLock"},
		{"Session/Exclusive override it", txShared, config[C]{Scope: new(pglock.Session), Mode: new(pglock.Exclusive)}, false, "ExclusiveLock"},
		{"unset follows a default Locker", plain, config[C]{}, false, "ExclusiveLock"},
		{"Transaction/Shared override it", plain, config[C]{Scope: new(pglock.Transaction), Mode: new(pglock.Shared)}, true, "ShareLock"},
	}
	for _, tc := range cases {
		id := uniqueID(t)
		key := s.lockKey(t, tc.locker, id)
		var gotTx bool
		var held []pgtest.Holder
		tc.cfg.Locker, tc.cfg.KeyExtractor = tc.locker, a.ParamKey("id")
		e, err := s.mount(tc.cfg, App{}, func(c C) error {
			_, gotTx = pglock.TxFromContext(a.Request(c).Context())
			held = pgtest.Granted(t, watch, key)
			return a.NoContent(c, http.StatusNoContent)
		})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		rec := serve(e, http.MethodPost, "/orders/"+id)
		if rec.Code != http.StatusNoContent || gotTx != tc.wantTx || len(held) != 1 || held[0].Mode != tc.wantMode {
			t.Errorf("%s: status %d, tx %v, pg_locks %+v; want tx %v and one %s", tc.name, rec.Code, gotTx, held, tc.wantTx, tc.wantMode)
		}
		pgtest.WaitFree(t, watch, key)
	}
	locktest.NoConnsLeft(t, pool)
}

// badModeFunc: a ModeFunc that returns a mode other than Exclusive or
// Shared is a configuration error: a 500 *echo.HTTPError matching
// ErrInvalidConfig (not ErrDatabase), logged; the handler does not run and
// nothing is locked.
func (s *suite[C]) badModeFunc(t *testing.T) {
	a := s.a
	var logs locktest.SyncBuffer
	var ran bool
	var herr error
	rep := s.replica(t, config[C]{
		ModeFunc: func(C) pglock.Mode { return 9 },
		Logger:   slog.New(slog.NewTextHandler(&logs, nil)),
	}, App{Handled: func(err error) { herr = err }}, func(C) error { ran = true; return nil })
	id := uniqueID(t)
	rec := serve(rep.e, http.MethodPost, "/orders/"+id)
	if _, ok := a.HTTPErrorCode(herr); rec.Code != http.StatusInternalServerError || ran || !ok ||
		!errors.Is(herr, a.Errors.InvalidConfig) || errors.Is(herr, a.Errors.Database) {
		t.Fatalf("status %d, ran %v, error %v; want 500 matching ErrInvalidConfig only", rec.Code, ran, herr)
	}
	if !strings.Contains(logs.String(), "invalid config") {
		t.Fatalf("logs %q, want the error logged", logs.String())
	}
	watch := pgtest.Pool(t, 2)
	pgtest.WaitFree(t, watch, s.lockKey(t, rep.Locker, id))
	locktest.NoConnsLeft(t, rep.Pool)
}
