package echolock_test

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/labstack/echo/v4"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/middleware/echolock"
	"github.com/pglockkit/kit/pglock"
)

// replica is one "server instance": its own pool, Locker, Echo and server.
type replica struct {
	*locktest.Replica
	e *echo.Echo
}

// newReplica starts an Echo server with h on POST and GET /orders/:id behind
// the middleware configured by cfg (Locker, made with opts, and, if nil,
// KeyExtractor filled in).
func newReplica(t *testing.T, cfg echolock.Config, h echo.HandlerFunc, opts ...pglock.Option) *replica {
	t.Helper()
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	r := locktest.NewReplica(t, 4, func(lk *pglock.Locker) http.Handler {
		cfg.Locker = lk
		if cfg.KeyExtractor == nil {
			cfg.KeyExtractor = echolock.Param("id")
		}
		mw, err := echolock.WithConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		e.POST("/orders/:id", h, mw)
		e.GET("/orders/:id", h, mw)
		return e
	}, opts...)
	return &replica{Replica: r, e: e}
}

func twoReplicas(t *testing.T, cfg echolock.Config, h echo.HandlerFunc) [2]*replica {
	t.Helper()
	return [2]*replica{newReplica(t, cfg, h), newReplica(t, cfg, h)}
}

// fire sends n concurrent POSTs to /orders/<id(i)>, alternating between the
// replicas.
func fire(reps [2]*replica, n int, id func(i int) string) []locktest.Result {
	return locktest.Fire([]*httptest.Server{reps[0].Server, reps[1].Server}, n,
		func(i int) string { return "/orders/" + id(i) })
}

// post sends one POST to /orders/<id> on rep.
func post(rep *replica, id string) locktest.Result {
	return locktest.Do(rep.Server, http.MethodPost, "/orders/"+id)
}

// lockKey is the pglock.Key the middleware locks for name with the default
// namespace.
func lockKey(t *testing.T, lk *pglock.Locker, name string) pglock.Key {
	t.Helper()
	return locktest.Key(t, lk, echolock.DefaultNamespace+name)
}
