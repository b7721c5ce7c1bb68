package httplock_test

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

// syncBuffer is a bytes.Buffer safe for a logger and a test to share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestOuterDeadlineWhileWaiting: when an outer timeout middleware (100 ms)
// ends the request's context while it waits for a key held elsewhere
// (WithWait 2 s), the client, still connected, gets 503 (not net/http's
// empty 200), the handler does not run, the end is logged as
// ErrRequestEnded, and no lock, waiter or pool connection is left, in both
// scopes.
func TestOuterDeadlineWhileWaiting(t *testing.T) {
	t.Parallel()
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		t.Run(scope.String(), func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			id := pgtest.UniqueKey(t)
			rep := newReplica(t, 2)
			watch := pgtest.Pool(t, 2)
			holderPool := pgtest.Pool(t, 1)
			key := lockKey(t, rep.locker, id)
			hl, err := pglock.NewLock(holderPool, key)
			if err != nil {
				t.Fatal(err)
			}
			if err := hl.Acquire(ctx); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = hl.Release(ctx) }) // before the pool closes, on failure too
			var logs syncBuffer
			var ran atomic.Bool
			mw := mustMiddleware(t, rep.locker, httplock.Query("id"), httplock.WithWait(2*time.Second),
				httplock.WithScope(scope), httplock.WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))))
			h := mw(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { ran.Store(true) }))
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				tctx, cancel := context.WithTimeout(r.Context(), 100*time.Millisecond)
				defer cancel()
				h.ServeHTTP(w, r.WithContext(tctx))
			}))
			defer srv.Close()

			start := time.Now()
			resp, err := srv.Client().Post(srv.URL+"/?id="+id, "text/plain", nil)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusServiceUnavailable {
				t.Fatalf("status %d, want 503", resp.StatusCode)
			}
			if d := time.Since(start); d > 1500*time.Millisecond {
				t.Errorf("answered after %v: the outer deadline (100 ms) did not stop the wait (2 s)", d)
			}
			if ran.Load() {
				t.Fatal("the handler ran without the lock")
			}
			if !strings.Contains(logs.String(), "request ended while waiting for the lock") {
				t.Errorf("logs %q, want ErrRequestEnded", logs.String())
			}
			waitFor(t, "no waiter", func() bool { return waiters(t, watch, key) == 0 })
			noConnsLeft(t, rep.pool)
			if hs := pgtest.Granted(t, watch, key); len(hs) != 1 {
				t.Fatalf("holders = %+v, want only the original holder", hs)
			}
			if err := hl.Release(ctx); err != nil {
				t.Fatal(err)
			}
			pgtest.WaitFree(t, watch, key)
			noConnsLeft(t, rep.pool, holderPool)
		})
	}
}

// TestBadModeFunc: a mode func that returns neither Exclusive nor Shared is
// a programming error: answered 500 (not the database error's 503, and not
// through WithErrorHandler), logged with an error matching
// ErrInvalidOption; the handler does not run and nothing is locked.
func TestBadModeFunc(t *testing.T) {
	t.Parallel()
	rep := newReplica(t, 2)
	var logs syncBuffer
	var onError, ran atomic.Bool
	mw := mustMiddleware(t, rep.locker, httplock.Query("id"),
		httplock.WithModeFunc(func(*http.Request) pglock.Mode { return 9 }),
		httplock.WithErrorHandler(func(w http.ResponseWriter, _ *http.Request, _ error) {
			onError.Store(true)
			w.WriteHeader(http.StatusServiceUnavailable)
		}),
		httplock.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	id := pgtest.UniqueKey(t)
	rec := httptest.NewRecorder()
	mw(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { ran.Store(true) })).
		ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/?id="+id, nil))
	if rec.Code != http.StatusInternalServerError || ran.Load() || onError.Load() {
		t.Fatalf("status %d, handler ran %v, error handler ran %v; want 500 and neither", rec.Code, ran.Load(), onError.Load())
	}
	if l := logs.String(); !strings.Contains(l, "httplock: invalid option") || !strings.Contains(l, "level=ERROR") {
		t.Fatalf("logs %q, want the ErrInvalidOption error logged", l)
	}
	watch := pgtest.Pool(t, 2)
	pgtest.WaitFree(t, watch, lockKey(t, rep.locker, id))
	noConnsLeft(t, rep.pool)
}

// TestBusyLogsErrBusy: a busy answer is logged with an error matching
// ErrBusy, with the default busy answer and with WithOnBusy.
func TestBusyLogsErrBusy(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	rep := newReplica(t, 2)
	id := pgtest.UniqueKey(t)
	key := lockKey(t, rep.locker, id)
	hl, err := pglock.NewLock(pgtest.Pool(t, 1), key)
	if err != nil {
		t.Fatal(err)
	}
	if err := hl.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = hl.Release(ctx) }) // before the pool closes, on failure too
	for _, onBusy := range []http.Handler{nil, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusTooManyRequests)
	})} {
		var logs syncBuffer
		mw := mustMiddleware(t, rep.locker, httplock.Query("id"), httplock.WithOnBusy(onBusy),
			httplock.WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))))
		rec := httptest.NewRecorder()
		mw(http.NotFoundHandler()).ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/?id="+id, nil))
		want := http.StatusConflict
		if onBusy != nil {
			want = http.StatusTooManyRequests
		}
		if rec.Code != want || !strings.Contains(logs.String(), "httplock: lock busy") {
			t.Errorf("status %d, logs %q; want %d and ErrBusy logged", rec.Code, logs.String(), want)
		}
	}
	if err := hl.Release(ctx); err != nil {
		t.Fatal(err)
	}
	watch := pgtest.Pool(t, 2)
	pgtest.WaitFree(t, watch, key)
	noConnsLeft(t, rep.pool)
}

// TestTransactionPanicDropsResponse: in Transaction scope a handler that
// sets a header, writes 201 and then panics has its writes rolled back, and
// a recovering middleware outside answers 500 without the handler's header
// or body (an outer middleware's header stays); the lock is free.
func TestTransactionPanicDropsResponse(t *testing.T) {
	t.Parallel()
	rep := newReplica(t, 2)
	watch := pgtest.Pool(t, 2)
	tbl := table(t, watch)
	id := pgtest.UniqueKey(t)
	mw := mustMiddleware(t, rep.locker, httplock.Query("id"), httplock.WithScope(pglock.Transaction))
	h := mw(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tx, _ := pglock.TxFromContext(r.Context())
		if _, err := tx.Exec(r.Context(), "INSERT INTO "+tbl+" VALUES ($1, 1)", id); err != nil {
			t.Error(err)
		}
		w.Header().Set("Location", "/orders/1")
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write([]byte("created"))
		panic("boom")
	}))
	recoverer := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Request-Id", "abc")
		defer func() {
			if p := recover(); p != nil {
				http.Error(w, "recovered", http.StatusInternalServerError)
			}
		}()
		h.ServeHTTP(w, r)
	})
	rec := httptest.NewRecorder()
	recoverer.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/?id="+id, nil))
	if rec.Code != http.StatusInternalServerError || strings.Contains(rec.Body.String(), "created") ||
		rec.Header().Get("Location") != "" || rec.Header().Get("X-Request-Id") != "abc" {
		t.Fatalf("response %d %q %v; want 500 without the handler's header and body, with the outer one", rec.Code, rec.Body, rec.Header())
	}
	if n := count(t, watch, tbl, id); n != 0 {
		t.Fatalf("%d rows after a panic", n)
	}
	pgtest.WaitFree(t, watch, lockKey(t, rep.locker, id))
	noConnsLeft(t, rep.pool)
}
