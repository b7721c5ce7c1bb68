package httplock_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

var tableSeq atomic.Int64

// table creates a table for one test, dropped at its end. Its unique
// constraint on v is checked at commit, so a duplicate makes COMMIT fail.
func table(t *testing.T, db *pgxpool.Pool) string {
	t.Helper()
	name := fmt.Sprintf("httplock_test_%d_%d", time.Now().UnixNano(), tableSeq.Add(1))
	_, err := db.Exec(context.Background(), "CREATE TABLE "+name+
		" (k text, v int, CONSTRAINT "+name+"_v UNIQUE (v) DEFERRABLE INITIALLY DEFERRED)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = db.Exec(context.Background(), "DROP TABLE "+name) })
	return name
}

func count(t *testing.T, db *pgxpool.Pool, tbl, k string) int {
	t.Helper()
	var n int
	if err := db.QueryRow(context.Background(), "SELECT count(*) FROM "+tbl+" WHERE k = $1", k).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestTransactionScope: the handler's writes in the request's transaction
// commit on 2xx and 4xx, roll back on 5xx and on a panic (which is raised
// again), and the lock is free afterwards in every case.
func TestTransactionScope(t *testing.T) {
	t.Parallel()
	rep := newReplica(t, 2)
	watch := pgtest.Pool(t, 2)
	tbl := table(t, watch)

	cases := []struct {
		name      string
		status    int
		panic     bool
		committed bool
	}{
		{"200 commits", http.StatusOK, false, true},
		{"201 commits", http.StatusCreated, false, true},
		{"404 commits", http.StatusNotFound, false, true},
		{"500 rolls back", http.StatusInternalServerError, false, false},
		{"503 rolls back", http.StatusServiceUnavailable, false, false},
		{"panic rolls back", http.StatusOK, true, false},
	}
	for i, c := range cases {
		id := pgtest.UniqueKey(t)
		key := lockKey(t, rep.locker, id)
		var heldInside []pgtest.Holder
		h, err := httplock.Handler(rep.locker, func(*http.Request) (string, bool, error) { return id, true, nil },
			http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				tx, ok := pglock.TxFromContext(r.Context())
				if !ok {
					t.Errorf("%s: no transaction in the request context", c.name)
					return
				}
				if _, err := tx.Exec(r.Context(), "INSERT INTO "+tbl+" VALUES ($1, $2)", id, i); err != nil {
					t.Errorf("%s: insert: %v", c.name, err)
				}
				heldInside = pgtest.Granted(t, watch, key)
				if c.panic {
					panic("boom")
				}
				w.WriteHeader(c.status)
				fmt.Fprint(w, "body")
			}), httplock.WithScope(pglock.Transaction))
		if err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		var recovered any
		func() {
			defer func() { recovered = recover() }()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
		}()
		switch {
		case c.panic && recovered != "boom":
			t.Errorf("%s: recovered %v, want the handler's panic", c.name, recovered)
		case !c.panic && recovered != nil:
			t.Errorf("%s: unexpected panic %v", c.name, recovered)
		case !c.panic && (rec.Code != c.status || rec.Body.String() != "body"):
			t.Errorf("%s: response %d %q", c.name, rec.Code, rec.Body.String())
		}
		if len(heldInside) != 1 {
			t.Errorf("%s: pg_locks inside the handler = %+v, want one holder", c.name, heldInside)
		}
		want := 0
		if c.committed {
			want = 1
		}
		if n := count(t, watch, tbl, id); n != want {
			t.Errorf("%s: %d rows after the request, want %d", c.name, n, want)
		}
		pgtest.WaitFree(t, watch, key)
	}
	noConnsLeft(t, rep.pool)
}

// TestTransactionCommitRule: a custom commit rule decides.
func TestTransactionCommitRule(t *testing.T) {
	t.Parallel()
	rep := newReplica(t, 2, pglock.WithScope(pglock.Transaction)) // scope from the Locker
	watch := pgtest.Pool(t, 2)
	tbl := table(t, watch)
	id := pgtest.UniqueKey(t)
	h, err := httplock.Handler(rep.locker, httplock.Header("Idempotency-Key"),
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			tx, _ := pglock.TxFromContext(r.Context())
			if _, err := tx.Exec(r.Context(), "INSERT INTO "+tbl+" VALUES ($1, 1)", id); err != nil {
				t.Error(err)
			}
			w.WriteHeader(http.StatusConflict)
		}),
		httplock.WithCommitRule(func(_ *http.Request, status int) bool { return status < 400 }))
	if err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodPost, "/", nil)
	req.Header.Set("Idempotency-Key", id)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusConflict {
		t.Fatalf("status %d", rec.Code)
	}
	if n := count(t, watch, tbl, id); n != 0 {
		t.Fatalf("%d rows: the rule said roll back on 409", n)
	}
	pgtest.WaitFree(t, watch, lockKey(t, rep.locker, id))
}

// TestCommitFailureIsNotASuccess: when COMMIT fails (a deferred constraint),
// the client gets 503, not the 200 the handler wrote, and the lock is free.
func TestCommitFailureIsNotASuccess(t *testing.T) {
	t.Parallel()
	rep := newReplica(t, 2)
	watch := pgtest.Pool(t, 2)
	tbl := table(t, watch)
	id := pgtest.UniqueKey(t)
	var got error
	h, err := httplock.Handler(rep.locker, func(*http.Request) (string, bool, error) { return id, true, nil },
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			tx, _ := pglock.TxFromContext(r.Context())
			// Two rows with one v: accepted now, refused at COMMIT.
			if _, err := tx.Exec(r.Context(), "INSERT INTO "+tbl+" VALUES ($1, 7), ($1, 7)", id); err != nil {
				t.Error(err)
			}
			w.Header().Set("Location", "/orders/7")
			w.WriteHeader(http.StatusCreated)
			fmt.Fprint(w, "created")
		}),
		httplock.WithScope(pglock.Transaction),
		httplock.WithErrorHandler(func(w http.ResponseWriter, r *http.Request, err error) {
			got = err
			http.Error(w, "try again", http.StatusServiceUnavailable)
		}))
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	outer := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Request-Id", "abc") // set by outer middleware: kept
		h.ServeHTTP(w, r)
	})
	outer.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
	if rec.Code != http.StatusServiceUnavailable || strings.Contains(rec.Body.String(), "created") ||
		rec.Header().Get("Location") != "" || rec.Header().Get("X-Request-Id") != "abc" {
		t.Fatalf("response %d %q %v; want 503 without the handler's headers or body, with the outer ones", rec.Code, rec.Body.String(), rec.Header())
	}
	if !errorsIs(got, httplock.ErrDatabase) {
		t.Fatalf("error handler got %v, want ErrDatabase", got)
	}
	if n := count(t, watch, tbl, id); n != 0 {
		t.Fatalf("%d rows after a failed commit", n)
	}
	pgtest.WaitFree(t, watch, lockKey(t, rep.locker, id))
	noConnsLeft(t, rep.pool)
}

// TestWriterFlushHijackController: in Transaction scope, http.Flusher,
// http.ResponseController (Flush, SetWriteDeadline through Unwrap) and
// http.Hijacker work through the middleware's writer, on a real server.
func TestWriterFlushHijackController(t *testing.T) {
	t.Parallel()
	rep := newReplica(t, 2)
	id := pgtest.UniqueKey(t)
	flushed := make(chan struct{})
	mw := mustMiddleware(t, rep.locker, httplock.Query("id"), httplock.WithScope(pglock.Transaction))
	srv := httptest.NewServer(mw(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		if err := rc.SetWriteDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Errorf("SetWriteDeadline: %v", err)
		}
		switch r.URL.Path {
		case "/stream":
			fmt.Fprint(w, "first\n")
			if _, ok := w.(http.Flusher); !ok {
				t.Error("writer is not an http.Flusher")
			}
			if err := rc.Flush(); err != nil {
				t.Errorf("Flush: %v", err)
			}
			<-flushed // the client has read the first line while we still hold the lock
			fmt.Fprint(w, "second\n")
		case "/hijack":
			conn, brw, err := rc.Hijack()
			if err != nil {
				t.Errorf("Hijack: %v", err)
				return
			}
			defer conn.Close()
			fmt.Fprint(brw, "HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nhijacked")
			brw.Flush()
		}
	})))
	defer srv.Close()

	resp, err := srv.Client().Get(srv.URL + "/stream?id=" + id)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(resp.Body)
	line, err := br.ReadString('\n')
	if err != nil || line != "first\n" {
		t.Fatalf("first line %q, %v", line, err)
	}
	close(flushed)
	rest, _ := io.ReadAll(br)
	resp.Body.Close()
	if string(rest) != "second\n" {
		t.Fatalf("rest %q", rest)
	}

	resp, err = srv.Client().Get(srv.URL + "/hijack?id=" + id)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "hijacked" {
		t.Fatalf("hijacked body %q", body)
	}
	watch := pgtest.Pool(t, 2)
	pgtest.WaitFree(t, watch, lockKey(t, rep.locker, id))
	noConnsLeft(t, rep.pool)
}

// TestAnswerHandlersMayWrite: in Transaction scope, where the handler's
// response is held back until the commit, WithOnBusy's handler and the
// error handlers write their answers to the client: the busy answer, a
// database error (no server) and a KeyFunc error; no lock or connection is
// left.
func TestAnswerHandlersMayWrite(t *testing.T) {
	t.Parallel()
	// Keys named here: a subtest's name has a slash, a path segment cannot.
	busyID, downID := pgtest.UniqueKey(t), pgtest.UniqueKey(t)
	key := func(r *http.Request) (string, bool, error) {
		if r.PathValue("id") == "bad" {
			return "", false, errors.New("bad id")
		}
		return r.PathValue("id"), true, nil
	}
	serve := func(t *testing.T, lk *pglock.Locker) *httptest.Server {
		mw := mustMiddleware(t, lk, key,
			httplock.WithScope(pglock.Transaction),
			httplock.WithOnBusy(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusTooManyRequests)
				fmt.Fprint(w, `{"busy":true}`)
			})),
			httplock.WithErrorHandler(func(w http.ResponseWriter, _ *http.Request, err error) {
				if !errorsIs(err, httplock.ErrDatabase) {
					t.Errorf("error handler got %v", err)
				}
				w.WriteHeader(http.StatusServiceUnavailable)
				fmt.Fprint(w, "no database")
			}),
			httplock.WithKeyErrorHandler(func(w http.ResponseWriter, _ *http.Request, err error) {
				w.WriteHeader(http.StatusServiceUnavailable)
				fmt.Fprint(w, "no key")
			}))
		mux := http.NewServeMux()
		mux.Handle("POST /orders/{id}", mw(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
			t.Error("handler ran")
		})))
		srv := httptest.NewServer(mux)
		t.Cleanup(srv.Close)
		return srv
	}

	t.Run("busy", func(t *testing.T) {
		t.Parallel()
		rep := newReplica(t, 2)
		srv := serve(t, rep.locker)
		id := busyID
		k := lockKey(t, rep.locker, id)
		held := locktest.HoldElsewhere(t, k)
		if r := locktest.Do(srv, http.MethodPost, "/orders/"+id); r.Status != http.StatusTooManyRequests || r.Body != `{"busy":true}` {
			t.Errorf("busy: %+v, want the busy handler's 429 and its body", r)
		}
		if r := locktest.Do(srv, http.MethodPost, "/orders/bad"); r.Status != http.StatusServiceUnavailable || r.Body != "no key" {
			t.Errorf("bad key: %+v, want the key error handler's 503 \"no key\"", r)
		}
		if err := held.Release(context.Background()); err != nil {
			t.Fatal(err)
		}
		pgtest.WaitFree(t, pgtest.Pool(t, 1), k)
		noConnsLeft(t, rep.pool)
	})

	t.Run("database error", func(t *testing.T) {
		t.Parallel()
		pool := pgtest.UnreachablePool(t)
		lk, err := pglock.NewLocker(pool)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = lk.Close() })
		srv := serve(t, lk)
		if r := locktest.Do(srv, http.MethodPost, "/orders/"+downID); r.Status != http.StatusServiceUnavailable || r.Body != "no database" {
			t.Errorf("database error: %+v, want the error handler's 503 \"no database\"", r)
		}
		noConnsLeft(t, pool)
	})
}
