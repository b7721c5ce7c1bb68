package echosuite

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

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// transactionScope: the handler's writes in the request's transaction
// commit on 2xx and 4xx written by the handler (or nothing written), and
// roll back on 5xx, on a returned error (an *echo.HTTPError or any other)
// and on a panic (which is raised again); the lock is free afterwards in
// every case.
func (s *suite[C]) transactionScope(t *testing.T) {
	a := s.a
	watch := pgtest.Pool(t, 2)
	tbl := locktest.Table(t, watch)
	cases := []struct {
		name      string
		answer    func(c C) error
		panic     bool
		wantCode  int
		committed bool
	}{
		{"200 commits", func(c C) error { return a.String(c, http.StatusOK, "body") }, false, 200, true},
		{"nothing written commits", func(C) error { return nil }, false, 200, true},
		{"404 written commits", func(c C) error { return a.String(c, http.StatusNotFound, "body") }, false, 404, true},
		{"JSON commits", func(c C) error { return a.JSON(c, http.StatusCreated, map[string]int{"id": 7}) }, false, 201, true},
		{"500 written rolls back", func(c C) error { return a.String(c, http.StatusInternalServerError, "body") }, false, 500, false},
		{"HTTPError rolls back", func(C) error { return a.HTTPError(http.StatusUnprocessableEntity, "no", nil) }, false, 422, false},
		{"error rolls back", func(C) error { return errors.New("boom") }, false, 500, false},
		{"panic rolls back", nil, true, 0, false},
	}
	for i, tc := range cases {
		var heldInside []pgtest.Holder
		var id string
		var rep *replica
		rep = s.replica(t, config[C]{Scope: new(pglock.Transaction)}, App{}, func(c C) error {
			ctx := a.Request(c).Context()
			tx, ok := pglock.TxFromContext(ctx)
			if !ok {
				t.Errorf("%s: no transaction in the request context", tc.name)
				return nil
			}
			if _, err := tx.Exec(ctx, "INSERT INTO "+tbl+" VALUES ($1, $2)", id, i); err != nil {
				t.Errorf("%s: insert: %v", tc.name, err)
			}
			heldInside = pgtest.Granted(t, watch, s.lockKey(t, rep.Locker, id))
			if tc.panic {
				panic("boom")
			}
			return tc.answer(c)
		})
		id = uniqueID(t)
		rec := httptest.NewRecorder()
		var recovered any
		func() {
			defer func() { recovered = recover() }()
			rep.e.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/orders/"+id, nil))
		}()
		switch {
		case tc.panic && recovered != "boom":
			t.Errorf("%s: recovered %v, want the handler's panic", tc.name, recovered)
		case !tc.panic && recovered != nil:
			t.Errorf("%s: unexpected panic %v", tc.name, recovered)
		case !tc.panic && rec.Code != tc.wantCode:
			t.Errorf("%s: status %d, want %d", tc.name, rec.Code, tc.wantCode)
		}
		if len(heldInside) != 1 {
			t.Errorf("%s: pg_locks inside the handler = %+v, want one holder", tc.name, heldInside)
		}
		want := 0
		if tc.committed {
			want = 1
		}
		if n := locktest.Count(t, watch, tbl, id); n != want {
			t.Errorf("%s: %d rows after the request, want %d", tc.name, n, want)
		}
		pgtest.WaitFree(t, watch, s.lockKey(t, rep.Locker, id))
		locktest.NoConnsLeft(t, rep.Pool)
	}
}

// commitRule: a Commit function decides, reading the status the handler
// wrote; a response the handler wrote without an error is sent as written
// although Commit rolled back.
func (s *suite[C]) commitRule(t *testing.T) {
	a := s.a
	watch := pgtest.Pool(t, 2)
	tbl := locktest.Table(t, watch)
	id := uniqueID(t)
	var seen []int
	rep := s.replica(t, config[C]{
		Scope: new(pglock.Transaction),
		Commit: func(c C, err error) bool {
			status := a.Status(c)
			seen = append(seen, status)
			return err == nil && status != http.StatusAccepted
		},
	}, App{}, func(c C) error {
		ctx := a.Request(c).Context()
		tx, _ := pglock.TxFromContext(ctx)
		if _, err := tx.Exec(ctx, "INSERT INTO "+tbl+" VALUES ($1, 1)", id); err != nil {
			t.Error(err)
		}
		return a.NoContent(c, http.StatusAccepted)
	})
	if r := post(rep, id); r.Status != http.StatusAccepted {
		t.Fatalf("%+v, want the 202 the handler wrote, sent although Commit rolled back", r)
	}
	if n := locktest.Count(t, watch, tbl, id); n != 0 || len(seen) != 1 || seen[0] != http.StatusAccepted {
		t.Fatalf("%d rows, Commit saw %v; want 0 rows, [202]", n, seen)
	}
	pgtest.WaitFree(t, watch, s.lockKey(t, rep.Locker, id))
	locktest.NoConnsLeft(t, rep.Pool)
}

// commitFailureIsNotASuccess: when COMMIT fails, the client gets 503, not
// the 201 the handler wrote, without the handler's headers and with outer
// middleware's, and the lock is free.
func (s *suite[C]) commitFailureIsNotASuccess(t *testing.T) {
	a := s.a
	watch := pgtest.Pool(t, 2)
	tbl := locktest.Table(t, watch)
	id := uniqueID(t)
	var got error
	rep := s.replica(t, config[C]{
		Scope: new(pglock.Transaction),
		ErrorHandler: func(c C, err error) error {
			got = err
			return a.DefaultError(c, err)
		},
	}, App{RequestID: true}, func(c C) error {
		ctx := a.Request(c).Context()
		tx, _ := pglock.TxFromContext(ctx)
		if _, err := tx.Exec(ctx, "INSERT INTO "+tbl+" VALUES ($1, 7), ($1, 7)", id); err != nil {
			t.Error(err)
		}
		a.Response(c).Header().Set("Location", "/orders/7")
		return a.String(c, http.StatusCreated, "created")
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
	if !errors.Is(got, a.Errors.Database) {
		t.Fatalf("ErrorHandler got %v", got)
	}
	if n := locktest.Count(t, watch, tbl, id); n != 0 {
		t.Fatalf("%d rows after a failed commit", n)
	}
	pgtest.WaitFree(t, watch, s.lockKey(t, rep.Locker, id))
	locktest.NoConnsLeft(t, rep.Pool)
}

// flushAndHijack: in Transaction scope the Echo major's own Flush and
// Hijack (Adapter.Flush, Adapter.Hijack) and http.ResponseController work
// through the held writer.
func (s *suite[C]) flushAndHijack(t *testing.T) {
	a := s.a
	flushed := make(chan struct{})
	rep := s.replica(t, config[C]{Scope: new(pglock.Transaction)}, App{}, func(c C) error {
		w := a.Response(c)
		if err := http.NewResponseController(w).SetWriteDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Errorf("SetWriteDeadline: %v", err)
		}
		if a.QueryParam(c, "hijack") != "" {
			conn, brw, err := a.Hijack(c)
			if err != nil {
				t.Errorf("Hijack: %v", err)
				return nil
			}
			defer conn.Close()
			fmt.Fprint(brw, "HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nhijacked")
			return brw.Flush()
		}
		w.WriteHeader(http.StatusOK)
		fmt.Fprint(w, "first\n")
		a.Flush(c)
		<-flushed
		fmt.Fprint(w, "second\n")
		return nil
	})
	id := uniqueID(t)
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
	pgtest.WaitFree(t, watch, s.lockKey(t, rep.Locker, id))
	locktest.NoConnsLeft(t, rep.Pool)
}

// answerHandlersMayWrite: in Transaction scope, where the handler's
// response is held back until the commit, a DenyHandler or ErrorHandler
// that writes its answer itself (as Echo's rate limiter documents) reaches
// the client: the busy answer, a database error (no server) and a
// KeyExtractor error; no lock or connection is left.
func (s *suite[C]) answerHandlersMayWrite(t *testing.T) {
	a := s.a
	t.Run("busy", func(t *testing.T) {
		t.Parallel()
		id := uniqueID(t)
		rep := s.replica(t, s.answeringConfig(t), App{}, s.answeringHandler(t))
		key := s.lockKey(t, rep.Locker, id)
		held := locktest.HoldElsewhere(t, key)
		r := post(rep, id)
		if r.Status != http.StatusTooManyRequests || r.Body != `{"busy":"`+a.Namespace+id+`"}`+"\n" || r.RetryAfter != "1" {
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
		cfg := s.answeringConfig(t)
		cfg.Locker = lk
		e, err := s.mount(cfg, App{}, s.answeringHandler(t))
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewServer(e)
		t.Cleanup(srv.Close)
		if r := locktest.Do(srv, http.MethodPost, "/orders/"+uniqueID(t)); r.Status != http.StatusServiceUnavailable || r.Body != "no database" {
			t.Errorf("database error: %+v, want the ErrorHandler's 503 \"no database\"", r)
		}
		locktest.NoConnsLeft(t, pool)
	})
}

// answeringHandler is the handler of answerHandlersMayWrite: it must not
// run.
func (s *suite[C]) answeringHandler(t *testing.T) func(C) error {
	return func(C) error { t.Error("handler ran"); return nil }
}

// answeringConfig is the Config of answerHandlersMayWrite (Locker left
// nil): Transaction scope, no wait, the id "bad" a KeyExtractor error, and a
// DenyHandler and an ErrorHandler that write their answers themselves.
func (s *suite[C]) answeringConfig(t *testing.T) config[C] {
	a := s.a
	return config[C]{
		Scope: new(pglock.Transaction),
		KeyExtractor: func(c C) (string, bool, error) {
			if a.PathParam(c, "id") == "bad" {
				return "", false, errors.New("bad id")
			}
			return a.PathParam(c, "id"), true, nil
		},
		DenyHandler: func(c C, key string, err error) error {
			if !errors.Is(err, a.Errors.Busy) {
				t.Errorf("DenyHandler got %v", err)
			}
			return a.JSON(c, http.StatusTooManyRequests, map[string]string{"busy": key})
		},
		ErrorHandler: func(c C, err error) error {
			switch {
			case errors.Is(err, a.Errors.Key):
				return a.String(c, http.StatusServiceUnavailable, "no key")
			case errors.Is(err, a.Errors.Database):
				return a.String(c, http.StatusServiceUnavailable, "no database")
			}
			t.Errorf("ErrorHandler got %v", err)
			return err
		},
	}
}
