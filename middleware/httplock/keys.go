package httplock

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/pglockkit/kit/internal/httpkey"
)

// KeyFunc names the lock a request needs. ok false passes the request
// through without a lock (it has no key: for example no Idempotency-Key
// header). A non-nil err is answered 400 Bad Request (see
// [WithKeyErrorHandler]), never passed through. The key is prefixed with the
// namespace (see [WithNamespace]) and hashed by the Locker ([pglock.KeyOf]).
type KeyFunc func(r *http.Request) (key string, ok bool, err error)

// errEmptyPathValue is wrapped by PathValue's error.
var errEmptyPathValue = errors.New("empty path value")

// PathValue returns a KeyFunc that keys the request by the path wildcard
// name of its http.ServeMux pattern (Go 1.22 patterns: "/orders/{id}"),
// through r.PathValue. An empty value is an error, not a pass: r.PathValue is
// filled only for the handler a pattern matched, so wrap each route's handler
// (mux.Handle("POST /orders/{id}", mw(h))), not the whole mux. With another
// router, write a KeyFunc that reads its parameter.
func PathValue(name string) KeyFunc {
	return func(r *http.Request) (string, bool, error) {
		v := r.PathValue(name)
		if v == "" {
			return "", false, fmt.Errorf("%w %q (is the middleware wrapping the handler of a route whose pattern has {%s}?)",
				errEmptyPathValue, name, name)
		}
		return v, true, nil
	}
}

// Header returns a KeyFunc that keys the request by the value of the header
// name, for example "Idempotency-Key". A request without the header (or
// with an empty value) passes through unlocked; one with several values of
// it is an error.
func Header(name string) KeyFunc {
	canon := http.CanonicalHeaderKey(name)
	return func(r *http.Request) (string, bool, error) {
		return httpkey.One("header "+canon, r.Header[canon])
	}
}

// Query returns a KeyFunc that keys the request by the URL query parameter
// name. A request without it (or with an empty value) passes through
// unlocked; one with several values of it is an error.
func Query(name string) KeyFunc {
	return func(r *http.Request) (string, bool, error) {
		return httpkey.One("query parameter "+name, r.URL.Query()[name])
	}
}

// MethodPath returns a KeyFunc that keys the request by its method and
// path, "POST /orders/42": one request at a time per method and URL path
// (the query is not part of the key).
func MethodPath() KeyFunc {
	return func(r *http.Request) (string, bool, error) {
		return r.Method + " " + r.URL.Path, true, nil
	}
}
