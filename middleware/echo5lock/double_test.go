package echo5lock_test

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/labstack/echo/v5"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/middleware/echo5lock"
	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/pglock/pglocktest"
)

// doubleReplica is one replica of an Echo service on pglocktest's double:
// POST /orders/:id waits its turn for the order's lock (Wait), POST
// /try/:id is refused at once when it is busy (the default). Every error a
// handler chain returns is kept for the test, then written by Echo's
// default HTTPErrorHandler.
type doubleReplica struct {
	e      *echo.Echo
	locker *pglock.Locker
	errs   chan error
}

func newDoubleReplica(t *testing.T, srv *pglocktest.Server, logger *slog.Logger, h echo.HandlerFunc) *doubleReplica {
	t.Helper()
	lk, err := pglocktest.NewLocker(srv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lk.Close() })
	wait, err := echo5lock.WithConfig(echo5lock.Config{Locker: lk, KeyExtractor: echo5lock.Param("id"), Wait: 10 * time.Second, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	try, err := echo5lock.WithConfig(echo5lock.Config{Locker: lk, KeyExtractor: echo5lock.Param("id"), Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	r := &doubleReplica{e: echo.New(), locker: lk, errs: make(chan error, 8)}
	r.e.Logger = slog.New(slog.DiscardHandler)
	r.e.HTTPErrorHandler = func(c *echo.Context, err error) {
		r.errs <- err
		echo.DefaultHTTPErrorHandler(false)(c, err)
	}
	r.e.POST("/orders/:id", h, wait)
	r.e.POST("/try/:id", h, try)
	return r
}

// post serves a POST of path; the client gives up after 5 s (a handler
// that runs when it should not ends then, and the test fails, not hangs).
func (r *doubleReplica) post(path string) *httptest.ResponseRecorder {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rec := httptest.NewRecorder()
	r.e.ServeHTTP(rec, httptest.NewRequestWithContext(ctx, http.MethodPost, path, nil))
	return rec
}

// echo5lock on pglocktest's in-memory double, unchanged: two requests for
// one order on two replicas run one after the other; a key held elsewhere
// is 409 at once (with Retry-After), through the DenyHandler; the database
// down is 503, through the ErrorHandler; and a lock lost while the handler
// runs cancels the request's context with cause pglock.ErrLockLost, the
// handler's answer stands, and the failed release is logged at Warn.
func TestOnDouble(t *testing.T) {
	t.Parallel()
	srv := pglocktest.NewServer()
	var logs locktest.SlogRecords
	var running locktest.Overlap
	entered := make(chan struct{}, 4)
	release := make(chan struct{})
	causes := make(chan error, 4)
	handler := func(c *echo.Context) error {
		running.Enter()
		defer running.Leave()
		entered <- struct{}{}
		ctx := c.Request().Context()
		select {
		case <-release:
			return c.NoContent(http.StatusNoContent)
		case <-ctx.Done():
			causes <- context.Cause(ctx)
			return echo.NewHTTPError(http.StatusServiceUnavailable, "order abandoned").Wrap(context.Cause(ctx))
		}
	}
	a := newDoubleReplica(t, srv, logs.Logger(), handler)
	b := newDoubleReplica(t, srv, logs.Logger(), handler)
	key := locktest.Key(t, a.locker, echo5lock.DefaultNamespace+"42")

	// Two requests for order 42, one per replica: the second waits in the
	// server's queue until the first has answered.
	codes := make(chan int, 2)
	var wg sync.WaitGroup
	for _, r := range []*doubleReplica{a, b} {
		wg.Go(func() { codes <- r.post("/orders/42").Code })
	}
	<-entered
	locktest.WaitFor(t, "the second request to wait", func() bool { return len(srv.Waiters(key)) == 1 })
	release <- struct{}{}
	<-entered
	release <- struct{}{}
	wg.Wait()
	if c1, c2 := <-codes, <-codes; c1 != http.StatusNoContent || c2 != http.StatusNoContent || running.Max() != 1 {
		t.Fatalf("codes %d, %d; at most %d handlers at once (want 204, 204, 1)", c1, c2, running.Max())
	}

	// Held by another replica: the route that does not wait is refused.
	let := srv.HoldElsewhere(key)
	rec := a.post("/try/42")
	let()
	if err := <-a.errs; rec.Code != http.StatusConflict || rec.Header().Get("Retry-After") != "1" || !errors.Is(err, echo5lock.ErrBusy) {
		t.Fatalf("key held elsewhere: %d, Retry-After %q, error %v; want 409, 1, ErrBusy", rec.Code, rec.Header().Get("Retry-After"), err)
	}
	srv.BusyNext(key)
	if rec := b.post("/try/42"); rec.Code != http.StatusConflict || !errors.Is(<-b.errs, echo5lock.ErrBusy) {
		t.Fatalf("key made busy by BusyNext: %d, want 409", rec.Code)
	}

	// The database is down: 503, not 409, and the handler does not run.
	srv.SetDown(true)
	rec = a.post("/orders/42")
	srv.SetDown(false)
	if err := <-a.errs; rec.Code != http.StatusServiceUnavailable || !errors.Is(err, echo5lock.ErrDatabase) || !errors.Is(err, pglock.ErrUnavailable) {
		t.Fatalf("database down: %d, %v; want 503, ErrDatabase and pglock.ErrUnavailable", rec.Code, err)
	}
	if len(entered) != 0 {
		t.Fatal("a handler ran without its lock")
	}

	// Lost while the handler runs: its context ends with cause ErrLockLost.
	done := make(chan int, 1)
	go func() { done <- b.post("/orders/42").Code }()
	<-entered
	if n := srv.Lose(key); n != 1 {
		t.Fatalf("Lose = %d, want 1", n)
	}
	if cause := <-causes; !errors.Is(cause, pglock.ErrLockLost) {
		t.Fatalf("the handler's context ended with %v, want pglock.ErrLockLost", cause)
	}
	if code := <-done; code != http.StatusServiceUnavailable {
		t.Fatalf("the handler answered 503 after its loss; the client got %d", code)
	}
	if err := <-b.errs; !errors.Is(err, pglock.ErrLockLost) {
		t.Fatalf("the handler's error: %v", err)
	}
	warned := logs.Errors(slog.LevelWarn, "echo5lock: release failed after the handler ran")
	if len(warned) != 1 || !errors.Is(warned[0], pglock.ErrLockLost) {
		t.Fatalf("Warn logs of the failed release: %v, want one matching pglock.ErrLockLost", warned)
	}
	if keys := srv.Keys(); len(keys) != 0 {
		t.Fatalf("keys left: %v", keys)
	}
}
