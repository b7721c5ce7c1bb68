package echolock_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/labstack/echo/v4"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/echolock"
	"github.com/pglockkit/kit/pglock"
)

// TestTransactionScope: the handler's writes in the request's transaction
// commit on 2xx and 4xx written by the handler, and roll back on 5xx, on a
// returned error (an *echo.HTTPError or any other) and on a panic (which is
// raised again); the lock is free afterwards in every case.
func TestTransactionScope(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	tbl := locktest.Table(t, watch)
	cases := []struct {
		name      string
		answer    func(c echo.Context) error
		panic     bool
		wantCode  int
		committed bool
	}{
		{"200 commits", func(c echo.Context) error { return c.String(http.StatusOK, "body") }, false, 200, true},
		{"404 written commits", func(c echo.Context) error { return c.String(http.StatusNotFound, "body") }, false, 404, true},
		{"500 written rolls back", func(c echo.Context) error { return c.String(http.StatusInternalServerError, "body") }, false, 500, false},
		{"HTTPError rolls back", func(c echo.Context) error { return echo.NewHTTPError(http.StatusUnprocessableEntity, "no") }, false, 422, false},
		{"error rolls back", func(c echo.Context) error { return errors.New("boom") }, false, 500, false},
		{"panic rolls back", nil, true, 0, false},
	}
	for i, c := range cases {
		var heldInside []pgtest.Holder
		var id string
		var rep *replica
		rep = newReplica(t, echolock.Config{Scope: pglock.Transaction}, func(ec echo.Context) error {
			tx, ok := pglock.TxFromContext(ec.Request().Context())
			if !ok {
				t.Errorf("%s: no transaction in the request context", c.name)
				return nil
			}
			if _, err := tx.Exec(ec.Request().Context(), "INSERT INTO "+tbl+" VALUES ($1, $2)", id, i); err != nil {
				t.Errorf("%s: insert: %v", c.name, err)
			}
			heldInside = pgtest.Granted(t, watch, lockKey(t, rep.Locker, id))
			if c.panic {
				panic("boom")
			}
			return c.answer(ec)
		})
		id = pgtest.UniqueKey(t)
		rec := httptest.NewRecorder()
		var recovered any
		func() {
			defer func() { recovered = recover() }()
			rep.e.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/orders/"+id, nil))
		}()
		switch {
		case c.panic && recovered != "boom":
			t.Errorf("%s: recovered %v, want the handler's panic", c.name, recovered)
		case !c.panic && recovered != nil:
			t.Errorf("%s: unexpected panic %v", c.name, recovered)
		case !c.panic && rec.Code != c.wantCode:
			t.Errorf("%s: status %d, want %d", c.name, rec.Code, c.wantCode)
		}
		if len(heldInside) != 1 {
			t.Errorf("%s: pg_locks inside the handler = %+v, want one holder", c.name, heldInside)
		}
		want := 0
		if c.committed {
			want = 1
		}
		if n := locktest.Count(t, watch, tbl, id); n != want {
			t.Errorf("%s: %d rows after the request, want %d", c.name, n, want)
		}
		pgtest.WaitFree(t, watch, lockKey(t, rep.Locker, id))
		locktest.NoConnsLeft(t, rep.Pool)
	}
}

// TestCommitFailureIsNotASuccess: when COMMIT fails, the client gets 503,
// not the 201 the handler wrote, and the lock is free.
func TestCommitFailureIsNotASuccess(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	tbl := locktest.Table(t, watch)
	id := pgtest.UniqueKey(t)
	var got error
	rep := newReplica(t, echolock.Config{
		Scope: pglock.Transaction,
		ErrorHandler: func(c echo.Context, err error) error {
			got = err
			return echolock.DefaultConfig.ErrorHandler(c, err)
		},
	}, func(c echo.Context) error {
		tx, _ := pglock.TxFromContext(c.Request().Context())
		if _, err := tx.Exec(c.Request().Context(), "INSERT INTO "+tbl+" VALUES ($1, 7), ($1, 7)", id); err != nil {
			t.Error(err)
		}
		c.Response().Header().Set("Location", "/orders/7")
		return c.String(http.StatusCreated, "created")
	})
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
	if resp.StatusCode != http.StatusServiceUnavailable || strings.Contains(string(body), "created") ||
		resp.Header.Get("Location") != "" || resp.Header.Get("X-Request-Id") != "abc" {
		t.Fatalf("response %d %q %v; want 503 without the handler's headers and body, with the outer ones", resp.StatusCode, body, resp.Header)
	}
	if !errors.Is(got, echolock.ErrDatabase) {
		t.Fatalf("ErrorHandler got %v", got)
	}
	if n := locktest.Count(t, watch, tbl, id); n != 0 {
		t.Fatalf("%d rows after a failed commit", n)
	}
	pgtest.WaitFree(t, watch, lockKey(t, rep.Locker, id))
	locktest.NoConnsLeft(t, rep.Pool)
}

// TestFlushAndHijack: in Transaction scope c.Response().Flush,
// http.ResponseController and Hijack work through the held writer.
func TestFlushAndHijack(t *testing.T) {
	t.Parallel()
	flushed := make(chan struct{})
	rep := newReplica(t, echolock.Config{Scope: pglock.Transaction}, func(c echo.Context) error {
		rc := http.NewResponseController(c.Response())
		if err := rc.SetWriteDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Errorf("SetWriteDeadline: %v", err)
		}
		if c.QueryParam("hijack") != "" {
			conn, brw, err := c.Response().Hijack()
			if err != nil {
				t.Errorf("Hijack: %v", err)
				return nil
			}
			defer conn.Close()
			fmt.Fprint(brw, "HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nhijacked")
			return brw.Flush()
		}
		c.Response().WriteHeader(http.StatusOK)
		fmt.Fprint(c.Response(), "first\n")
		c.Response().Flush()
		<-flushed
		fmt.Fprint(c.Response(), "second\n")
		return nil
	})
	id := pgtest.UniqueKey(t)
	resp, err := rep.Server.Client().Post(rep.Server.URL+"/orders/"+id, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); err != nil || line != "first\n" {
		t.Fatalf("first line %q, %v", line, err)
	}
	close(flushed)
	rest, _ := io.ReadAll(br)
	resp.Body.Close()
	if string(rest) != "second\n" {
		t.Fatalf("rest %q", rest)
	}
	if r := locktest.Do(rep.Server, http.MethodPost, "/orders/"+id+"?hijack=1"); r.Body != "hijacked" {
		t.Fatalf("hijack: %+v", r)
	}
	watch := pgtest.Pool(t, 2)
	pgtest.WaitFree(t, watch, lockKey(t, rep.Locker, id))
	locktest.NoConnsLeft(t, rep.Pool)
}

// TestAnswerHandlersMayWrite: in Transaction scope, where the handler's
// response is held back until the commit, a DenyHandler or ErrorHandler
// that writes its answer itself reaches the client: the busy answer, a
// database error (no server) and a KeyExtractor error; no lock or
// connection is left.
func TestAnswerHandlersMayWrite(t *testing.T) {
	t.Parallel()
	// Keys named here: a subtest's name has a slash, a path segment cannot.
	busyID, downID := pgtest.UniqueKey(t), pgtest.UniqueKey(t)
	t.Run("busy", func(t *testing.T) {
		t.Parallel()
		id := busyID
		rep := newReplica(t, answeringConfig(t), answeringHandler(t))
		key := lockKey(t, rep.Locker, id)
		held := locktest.HoldElsewhere(t, key)
		r := post(rep, id)
		if r.Status != http.StatusTooManyRequests || r.Body != `{"busy":"http:`+id+`"}`+"\n" || r.RetryAfter != "1" {
			t.Errorf("busy: %+v, want the DenyHandler's 429 with its JSON body and Retry-After 1", r)
		}
		if r := post(rep, "bad"); r.Status != http.StatusServiceUnavailable || r.Body != "no key" {
			t.Errorf("bad key: %+v, want the ErrorHandler's 503 \"no key\"", r)
		}
		if err := held.Release(t.Context()); err != nil {
			t.Fatal(err)
		}
		pgtest.WaitFree(t, pgtest.Pool(t, 1), key)
		locktest.NoConnsLeft(t, rep.Pool)
	})

	t.Run("database error", func(t *testing.T) {
		t.Parallel()
		pool := pgtest.UnreachablePool(t)
		lk, err := pglock.NewLocker(pool)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = lk.Close() })
		cfg := answeringConfig(t)
		cfg.Locker = lk
		mw, err := echolock.WithConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		e := echo.New()
		e.HideBanner, e.HidePort = true, true
		e.POST("/orders/:id", answeringHandler(t), mw)
		srv := httptest.NewServer(e)
		t.Cleanup(srv.Close)
		if r := locktest.Do(srv, http.MethodPost, "/orders/"+downID); r.Status != http.StatusServiceUnavailable || r.Body != "no database" {
			t.Errorf("database error: %+v, want the ErrorHandler's 503 \"no database\"", r)
		}
		locktest.NoConnsLeft(t, pool)
	})
}

// answeringHandler is the handler of TestAnswerHandlersMayWrite: it must not
// run.
func answeringHandler(t *testing.T) echo.HandlerFunc {
	return func(echo.Context) error { t.Error("handler ran"); return nil }
}

// answeringConfig is the Config of TestAnswerHandlersMayWrite (Locker left
// nil): Transaction scope, no wait, the id "bad" a KeyExtractor error, and a
// DenyHandler and an ErrorHandler that write their answers themselves.
func answeringConfig(t *testing.T) echolock.Config {
	return echolock.Config{
		Scope: pglock.Transaction,
		KeyExtractor: func(c echo.Context) (string, bool, error) {
			if c.Param("id") == "bad" {
				return "", false, errors.New("bad id")
			}
			return c.Param("id"), true, nil
		},
		DenyHandler: func(c echo.Context, key string, err error) error {
			if !errors.Is(err, echolock.ErrBusy) {
				t.Errorf("DenyHandler got %v", err)
			}
			return c.JSON(http.StatusTooManyRequests, map[string]string{"busy": key})
		},
		ErrorHandler: func(c echo.Context, err error) error {
			switch {
			case errors.Is(err, echolock.ErrKey):
				return c.String(http.StatusServiceUnavailable, "no key")
			case errors.Is(err, echolock.ErrDatabase):
				return c.String(http.StatusServiceUnavailable, "no database")
			}
			t.Errorf("ErrorHandler got %v", err)
			return err
		},
	}
}
