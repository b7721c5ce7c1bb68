package httplock_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
)

// Issue 24: a handler behind httplock that calls a service function which
// locks the request's own key with the same Locker (Do on the request's
// context) runs at once in the request's hold, in Session and Transaction
// scope; it used to wait for the request's own lock until the request's
// context ended.
func TestHandlerNestedDoOnItsKey(t *testing.T) {
	t.Parallel()
	rep := newReplica(t, 4)
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		t.Run(scope.String(), func(t *testing.T) {
			id := pgtest.UniqueKey(t)
			ran := false
			h, err := httplock.Handler(rep.locker, func(*http.Request) (string, bool, error) { return id, true, nil },
				http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
					defer cancel()
					if err := rep.locker.Do(ctx, id, func(context.Context) error { ran = true; return nil }); err != nil {
						http.Error(w, err.Error(), http.StatusInternalServerError)
					}
				}), httplock.WithScope(scope))
			if err != nil {
				t.Fatal(err)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/", nil))
			if rec.Code != http.StatusOK || !ran {
				t.Fatalf("status %d %q (nested Do ran: %v); want 200 and the nested Do run", rec.Code, rec.Body.String(), ran)
			}
		})
	}
}
