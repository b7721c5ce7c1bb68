package echosuite

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/pglockkit/kit/internal/echocore"
	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Run runs every scenario of the suite against a, each as a parallel
// subtest of t named after it.
func Run[C any](t *testing.T, a Adapter[C]) {
	s := &suite[C]{a: a}
	for _, sc := range []struct {
		name string
		run  func(t *testing.T)
	}{
		// serialize.go
		{"SerializeAcrossReplicas", s.serializeAcrossReplicas},
		{"FailFastBusy", s.failFastBusy},
		{"WaitGetsTheLock", s.waitGetsTheLock},
		{"DifferentKeysOverlap", s.differentKeysOverlap},
		{"SharedReads", s.sharedReads},
		{"SharesKeysWithHTTPLock", s.sharesKeysWithHTTPLock},
		// tx.go
		{"TransactionScope", s.transactionScope},
		{"CommitRule", s.commitRule},
		{"CommitFailureIsNotASuccess", s.commitFailureIsNotASuccess},
		{"FlushAndHijack", s.flushAndHijack},
		{"AnswerHandlersMayWrite", s.answerHandlersMayWrite},
		// rollback.go
		{"RollbackIsNotASuccess", s.rollbackIsNotASuccess},
		{"FollowsLocker", s.followsLocker},
		{"BadModeFunc", s.badModeFunc},
		// config.go
		{"ConstructionErrors", s.constructionErrors},
		{"Keys", s.keys},
		{"DatabaseError", s.databaseError},
		// lost.go
		{"LostLockCancelsRequest", s.lostLockCancelsRequest},
		{"SessionPanic", s.sessionPanic},
		// cancel.go
		{"ClientGoneWhileWaiting", s.clientGoneWhileWaiting},
		{"WaitLimit", s.waitLimit},
		// token.go
		{"Token", s.token},
	} {
		t.Run(sc.name, func(t *testing.T) {
			t.Parallel()
			sc.run(t)
		})
	}
}

type suite[C any] struct{ a Adapter[C] }

// config is the suite's name for the Config every scenario describes.
type config[C any] = echocore.Config[C]

// uniqueID returns a unique key that fits in a path segment: a subtest's name,
// which pgtest.UniqueKey includes, has slashes.
func uniqueID(t testing.TB) string {
	return strings.ReplaceAll(pgtest.UniqueKey(t), "/", ".")
}

// replica is one "server instance": its own pool, Locker, Echo and server.
type replica struct {
	*locktest.Replica
	e http.Handler // the Echo, to serve requests without a network
}

// replica starts an Echo with h on POST and GET /orders/:id (or app's
// routes) behind the middleware configured by cfg (Locker, made with opts,
// and, if nil, KeyExtractor Param("id") filled in).
func (s *suite[C]) replica(t *testing.T, cfg config[C], app App, h func(C) error, opts ...pglock.Option) *replica {
	t.Helper()
	var e http.Handler
	r := locktest.NewReplica(t, 4, func(lk *pglock.Locker) http.Handler {
		cfg.Locker = lk
		if cfg.KeyExtractor == nil {
			cfg.KeyExtractor = s.a.ParamKey("id")
		}
		var err error
		if e, err = s.mount(cfg, app, h); err != nil {
			t.Fatal(err)
		}
		return e
	}, opts...)
	return &replica{Replica: r, e: e}
}

func (s *suite[C]) twoReplicas(t *testing.T, cfg config[C], app App, h func(C) error) [2]*replica {
	t.Helper()
	return [2]*replica{s.replica(t, cfg, app, h), s.replica(t, cfg, app, h)}
}

// mount returns an Echo with h on app's routes behind the middleware
// configured by cfg, or the middleware's error.
func (s *suite[C]) mount(cfg config[C], app App, h func(C) error) (http.Handler, error) {
	mw, err := s.a.Middleware(cfg)
	if err != nil {
		return nil, err
	}
	return s.echo(app, h, mw), nil
}

// echo returns an Echo with h on app's routes, behind mw unless it is nil.
func (s *suite[C]) echo(app App, h func(C) error, mw MiddlewareFunc[C]) http.Handler {
	spec := EchoSpec[C]{Routes: app.Routes, Handler: h, Middleware: mw, Recover: app.Recover, Handled: app.Handled}
	if len(spec.Routes) == 0 {
		spec.Routes = []string{"/orders/:id"}
	}
	if app.RequestID {
		spec.Pre = append(spec.Pre, func(next func(C) error) func(C) error {
			return func(c C) error {
				s.a.Response(c).Header().Set("X-Request-Id", "abc") // outer middleware's
				return next(c)
			}
		})
	}
	if app.Returned != nil {
		spec.Use = append(spec.Use, func(next func(C) error) func(C) error {
			return func(c C) (err error) {
				defer func() { app.Returned(err) }()
				return next(c)
			}
		})
	}
	return s.a.Echo(spec)
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

// serve runs one request through e without a network.
func serve(e http.Handler, method, target string) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	e.ServeHTTP(rec, httptest.NewRequest(method, target, nil))
	return rec
}

// lockKey is the pglock.Key the middleware locks for name with the default
// namespace.
func (s *suite[C]) lockKey(t testing.TB, lk *pglock.Locker, name string) pglock.Key {
	t.Helper()
	return locktest.Key(t, lk, s.a.Namespace+name)
}
