package httplock_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

// TestConstructionErrors: a nil Locker, KeyFunc or handler, or a bad option,
// is an error from the constructor, never a panic.
func TestConstructionErrors(t *testing.T) {
	t.Parallel()
	rep := newReplica(t, 1)
	key := httplock.MethodPath()
	next := http.NotFoundHandler()
	cases := []struct {
		name string
		lk   *pglock.Locker
		key  httplock.KeyFunc
		next http.Handler
		opts []httplock.Option
		want error
	}{
		{"nil locker", nil, key, next, nil, httplock.ErrNilLocker},
		{"nil key func", rep.locker, nil, next, nil, httplock.ErrNilKeyFunc},
		{"nil handler", rep.locker, key, nil, nil, httplock.ErrNilHandler},
		{"nil option", rep.locker, key, next, []httplock.Option{nil}, httplock.ErrInvalidOption},
		{"negative wait", rep.locker, key, next, []httplock.Option{httplock.WithWait(-1)}, httplock.ErrInvalidOption},
		{"negative retry-after", rep.locker, key, next, []httplock.Option{httplock.WithRetryAfter(-1)}, httplock.ErrInvalidOption},
		{"bad scope", rep.locker, key, next, []httplock.Option{httplock.WithScope(7)}, httplock.ErrInvalidOption},
		{"bad mode", rep.locker, key, next, []httplock.Option{httplock.WithMode(7)}, httplock.ErrInvalidOption},
		{"nil mode func", rep.locker, key, next, []httplock.Option{httplock.WithModeFunc(nil)}, httplock.ErrInvalidOption},
	}
	for _, c := range cases {
		h, err := httplock.Handler(c.lk, c.key, c.next, c.opts...)
		if !errors.Is(err, c.want) || h != nil {
			t.Errorf("Handler, %s: %v, want %v", c.name, err, c.want)
		}
		if c.next == nil {
			continue
		}
		mw, err := httplock.Middleware(c.lk, c.key, c.opts...)
		if !errors.Is(err, c.want) || mw != nil {
			t.Errorf("Middleware, %s: %v, want %v", c.name, err, c.want)
		}
	}
	if _, err := httplock.Middleware(nil, nil); !errors.Is(err, httplock.ErrNilLocker) || !errors.Is(err, httplock.ErrNilKeyFunc) {
		t.Errorf("Middleware(nil, nil) = %v, want both errors", err)
	}
	// Concurrent requests need a pooled Locker.
	conn, err := rep.pool.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	connLocker, err := pglock.NewLocker(conn)
	if err != nil {
		t.Fatal(err)
	}
	if mw, err := httplock.Middleware(connLocker, key); mw != nil || !errors.Is(err, httplock.ErrInvalidOption) {
		t.Errorf("Middleware on a one-connection Locker = %v, want ErrInvalidOption", err)
	}
}

// TestKeyFunctions: a KeyFunc error is 400 and the handler does not run; no
// key passes through unlocked; the ready-made key functions read what they
// say.
func TestKeyFunctions(t *testing.T) {
	t.Parallel()
	rep := newReplica(t, 2)
	watch := pgtest.Pool(t, 2)
	id := pgtest.UniqueKey(t)
	ran := 0
	var heldInside []pgtest.Holder
	var gotKeyErr error
	next := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ran++
		heldInside = pgtest.Granted(t, watch, lockKey(t, rep.locker, id))
	})
	failing := func(*http.Request) (string, bool, error) { return "", false, errors.New("no tenant") }

	serve := func(h http.Handler, req *http.Request) int {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec.Code
	}
	h, err := httplock.Handler(rep.locker, failing, next)
	if err != nil {
		t.Fatal(err)
	}
	if c := serve(h, httptest.NewRequest(http.MethodPost, "/", nil)); c != http.StatusBadRequest || ran != 0 {
		t.Fatalf("key error: status %d, ran %d; want 400, 0", c, ran)
	}
	h, _ = httplock.Handler(rep.locker, failing, next, httplock.WithKeyErrorHandler(
		func(w http.ResponseWriter, r *http.Request, err error) { gotKeyErr = err; w.WriteHeader(422) }))
	if c := serve(h, httptest.NewRequest(http.MethodPost, "/", nil)); c != 422 || !errors.Is(gotKeyErr, httplock.ErrKey) {
		t.Fatalf("key error handler: status %d, err %v", c, gotKeyErr)
	}

	// PathValue on a handler that no pattern with {id} matched: 400, loudly.
	mw := mustMiddleware(t, rep.locker, httplock.PathValue("id"))
	if c := serve(mw(next), httptest.NewRequest(http.MethodPost, "/orders/1", nil)); c != http.StatusBadRequest || ran != 0 {
		t.Fatalf("PathValue outside a pattern: status %d, ran %d", c, ran)
	}
	mux := http.NewServeMux()
	mux.Handle("POST /orders/{id}", mw(next))
	if c := serve(mux, httptest.NewRequest(http.MethodPost, "/orders/"+id, nil)); c != 200 || ran != 1 || len(heldInside) != 1 {
		t.Fatalf("PathValue: status %d, ran %d, held %+v", c, ran, heldInside)
	}

	// Header: absent passes through unlocked; present locks; repeated is 400.
	mw = mustMiddleware(t, rep.locker, httplock.Header("idempotency-key"))
	req := httptest.NewRequest(http.MethodPost, "/", nil)
	if c := serve(mw(next), req); c != 200 || ran != 2 || len(heldInside) != 0 {
		t.Fatalf("no header: status %d, ran %d, held %+v", c, ran, heldInside)
	}
	req.Header.Set("Idempotency-Key", id)
	if c := serve(mw(next), req); c != 200 || ran != 3 || len(heldInside) != 1 {
		t.Fatalf("header: status %d, ran %d, held %+v", c, ran, heldInside)
	}
	req.Header.Add("Idempotency-Key", "other")
	if c := serve(mw(next), req); c != http.StatusBadRequest || ran != 3 {
		t.Fatalf("repeated header: status %d, ran %d", c, ran)
	}

	// Query: the same rules.
	mw = mustMiddleware(t, rep.locker, httplock.Query("id"))
	if c := serve(mw(next), httptest.NewRequest(http.MethodPost, "/?id=", nil)); c != 200 || ran != 4 || len(heldInside) != 0 {
		t.Fatalf("empty query: status %d, ran %d, held %+v", c, ran, heldInside)
	}
	if c := serve(mw(next), httptest.NewRequest(http.MethodPost, "/?id="+id, nil)); c != 200 || ran != 5 || len(heldInside) != 1 {
		t.Fatalf("query: status %d, ran %d, held %+v", c, ran, heldInside)
	}
	if c := serve(mw(next), httptest.NewRequest(http.MethodPost, "/?id=a&id=b", nil)); c != http.StatusBadRequest || ran != 5 {
		t.Fatalf("repeated query: status %d, ran %d", c, ran)
	}

	// MethodPath.
	k, ok, err := httplock.MethodPath()(httptest.NewRequest(http.MethodPut, "/a/b?x=1", nil))
	if k != "PUT /a/b" || !ok || err != nil {
		t.Fatalf("MethodPath = %q, %v, %v", k, ok, err)
	}

	// WithNamespace: the key the middleware locks.
	mw = mustMiddleware(t, rep.locker, httplock.Query("id"), httplock.WithNamespace(""))
	next2 := http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
		k, _ := rep.locker.Key(id)
		heldInside = pgtest.Granted(t, watch, k)
	})
	if c := serve(mw(next2), httptest.NewRequest(http.MethodPost, "/?id="+id, nil)); c != 200 || len(heldInside) != 1 {
		t.Fatalf("empty namespace: status %d, held %+v", c, heldInside)
	}
	noConnsLeft(t, rep.pool)
}
