package echo5lock

import (
	"fmt"

	"github.com/labstack/echo/v5"

	"github.com/pglockkit/kit/internal/httpkey"
)

// KeyExtractor names the lock a request needs. ok false passes the request
// through without a lock. A non-nil err goes to the ErrorHandler (400 by
// default), never passed through. Do not key by c.RealIP(): it trusts
// X-Forwarded-For, which a client can forge.
type KeyExtractor func(c *echo.Context) (key string, ok bool, err error)

// Param returns a KeyExtractor that keys the request by the route's path
// parameter name ("/orders/:id"). An empty value is an error (the route has
// no such parameter, or it matched empty), not a pass.
func Param(name string) KeyExtractor {
	return func(c *echo.Context) (string, bool, error) {
		v := c.Param(name)
		if v == "" {
			return "", false, fmt.Errorf("empty path parameter %q (does the route have :%s?)", name, name)
		}
		return v, true, nil
	}
}

// Header returns a KeyExtractor that keys the request by the header name,
// for example "Idempotency-Key". A request without it (or with an empty
// value) passes through unlocked; one with several values of it is an error.
func Header(name string) KeyExtractor {
	return func(c *echo.Context) (string, bool, error) {
		return httpkey.One("header "+name, c.Request().Header.Values(name))
	}
}

// QueryParam returns a KeyExtractor that keys the request by the query
// parameter name. A request without it (or with an empty value) passes
// through unlocked; one with several values of it is an error.
func QueryParam(name string) KeyExtractor {
	return func(c *echo.Context) (string, bool, error) {
		return httpkey.One("query parameter "+name, c.QueryParams()[name])
	}
}

// MethodPath returns a KeyExtractor that keys the request by its method and
// URL path, "POST /orders/42" (the query is not part of the key).
func MethodPath() KeyExtractor {
	return func(c *echo.Context) (string, bool, error) {
		r := c.Request()
		return r.Method + " " + r.URL.Path, true, nil
	}
}
