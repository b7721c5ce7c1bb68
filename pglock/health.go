package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock/internal/lockconn"
	"github.com/pglockkit/kit/pglock/internal/memlock"
)

// HealthHandler returns an http.Handler for a health check: check is
// [Locker.CheckHealth] or [Leader.CheckHealth] (or a function of yours that
// combines them). It calls check with the request's context and answers 200
// with the body "ok" when it returns nil, else 503 Service Unavailable with
// the error's text, on one line, as the body ("pglock: leading, but the
// lock is in doubt: ..."). Any method is answered (HEAD without a body); the
// answer is never cached. A nil check answers 503, with an error matching
// [ErrNilFunc].
//
//	http.Handle("/livez", pglock.HealthHandler(leader.CheckHealth))
//	http.Handle("/readyz", pglock.HealthHandler(locker.CheckHealth))
//
// Kubernetes: a Leader's check goes to the liveness probe and a Locker's to
// the readiness probe; their doc comments say why and how to set the
// probes.
func HealthHandler(check func(ctx context.Context) error) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var err error
		if check == nil {
			err = fmt.Errorf("%w: pglock.HealthHandler: nil check", ErrNilFunc)
		} else {
			err = check(r.Context())
		}
		h := w.Header()
		h.Set("Content-Type", "text/plain; charset=utf-8")
		h.Set("Cache-Control", "no-store")
		h.Set("X-Content-Type-Options", "nosniff")
		body := "ok\n"
		if err != nil {
			body = healthText(err) + "\n"
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		if r.Method != http.MethodHead {
			_, _ = w.Write([]byte(body))
		}
	})
}

// healthText is err's text on one line, cut at maxHealthText bytes.
func healthText(err error) string {
	s := strings.Join(strings.Fields(err.Error()), " ")
	if len(s) > maxHealthText {
		s = strings.ToValidUTF8(s[:maxHealthText-3], "") + "..."
	}
	return s
}

// maxHealthText bounds the body of an unhealthy answer.
const maxHealthText = 512

// healthProbe runs one health check at a time and keeps its result for a
// while, so that a health endpoint probed often costs the server a bounded
// number of statements: concurrent callers share the check under way, and
// later ones reuse its result while it is fresh.
type healthProbe struct {
	mu      sync.Mutex
	running chan struct{} // closed when the check under way ends; nil when none
	at      time.Time     // when the last check ended
	about   int64         // what it was about (a Leader's term); a result about another is not reused
	err     error
	checks  int // how many checks ran (tests)
}

// do returns the result of a check about about that ended less than fresh
// ago, or of the check under way, or runs check (in the caller's goroutine;
// it must bound itself). A caller whose ctx ends while another runs the
// check returns ctx's error.
func (p *healthProbe) do(ctx context.Context, about int64, fresh time.Duration, check func() error) error {
	for {
		p.mu.Lock()
		if ch := p.running; ch != nil {
			p.mu.Unlock()
			select {
			case <-ch:
				continue // its result is fresh now, unless it was about another
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if !p.at.IsZero() && p.about == about && time.Since(p.at) < fresh {
			err := p.err
			p.mu.Unlock()
			return err
		}
		ch := make(chan struct{})
		p.running = ch
		p.checks++
		p.mu.Unlock()
		err := check()
		p.mu.Lock()
		p.running, p.at, p.about, p.err = nil, time.Now(), about, err
		p.mu.Unlock()
		close(ch)
		return err
	}
}

// CheckHealth reports whether the Locker can reach its server: nil when it
// can, else an error matching [ErrUnavailable] (the server cannot be reached
// or did not answer in time; with the database's error) or [ErrLockerClosed]
// (after Close). Use it with [HealthHandler].
//
// A multiplexing Locker (on a *pgxpool.Pool, or a *sql.DB with pgx's
// driver) asks on its lock connections, where its session locks live: a
// check statement (SELECT true) on an open one, sent with the lock requests
// of the moment (it shares their round trip); when none is open or none
// answers, it opens one, as the next lock would (the first check of a
// Locker that has not locked yet opens its first lock connection). So it
// fails when the last connect failed and no lock connection is alive. A
// Locker that does not multiplex pings its pool ([WithMultiplexing](false),
// or a *sql.DB with another driver: its holds live on pool connections). A
// Locker on one connection or transaction is not asked anything: it fails
// only when a pgx connection is known to be closed.
//
// Cost: at most one check per lost-check interval (500 ms by default),
// whatever the number of callers (concurrent calls share one check, and
// later ones its result), each answered within twice the interval (1 s by
// default; a connect or a statement under way goes on in the background).
// It holds no lock and never waits for one.
//
// Kubernetes: wire it to the readiness probe, not to the liveness probe. A
// database that is down or cut off makes every replica unhealthy at once:
// readiness takes them out of service (their requests would fail or wait for
// locks) and brings them back when the database does, where liveness would
// restart every replica, which cures nothing and makes them all reconnect
// at once when the database returns. Set timeoutSeconds to at least twice
// the lost-check interval (1 s by default: the probe's default timeout).
// On a nil or zero Locker it returns an error matching [ErrUnsupportedConn].
func (lk *Locker) CheckHealth(ctx context.Context) error {
	if err := lk.unmade(); err != nil {
		return fmt.Errorf("pglock: Locker.CheckHealth: %w", err)
	}
	if ctx == nil {
		ctx = context.Background()
	}
	if lk.closed.Load() {
		return ErrLockerClosed
	}
	if !lk.pooled {
		return lk.connClosed()
	}
	interval := lk.cfg.lostCheck
	return lk.health().do(ctx, 0, interval, func() error {
		cctx, cancel := context.WithTimeout(context.Background(), 2*interval)
		defer cancel()
		// The answer comes within the bound even when the check's request
		// was already sent on a lock connection the network left silent
		// (its statement bound, not the check's context, ends it there): the
		// check goes on in the background and its result is dropped.
		done := make(chan error, 1)
		go func() {
			if lk.mux != nil {
				done <- lk.mux.reach(cctx)
			} else {
				done <- pingPool(cctx, lk.conn)
			}
		}()
		var err error
		select {
		case err = <-done:
		case <-cctx.Done():
			err = cctx.Err()
		}
		switch {
		case err == nil:
			return nil
		case lk.closed.Load():
			return ErrLockerClosed
		case lockconn.ContextEnded(cctx) != nil:
			// The bound's error says less than the failure before it.
			return fmt.Errorf("%w: no answer from the server within %v (%v)", ErrUnavailable, 2*interval, err)
		case strings.HasPrefix(err.Error(), ErrUnavailable.Error()):
			return err
		}
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	})
}

// health returns the Locker's health probe.
func (lk *Locker) health() *healthProbe { return &lk.probe }

// connClosed is the health of a Locker on one connection or transaction:
// an error only when a pgx connection is known to be closed (its holds use
// it, so nothing is sent).
func (lk *Locker) connClosed() error {
	var closed bool
	switch c := lk.conn.(type) {
	case *pgx.Conn:
		closed = c.IsClosed()
	case *pgxpool.Conn:
		closed = c.Conn().IsClosed()
	case pgx.Tx:
		closed = c.Conn().IsClosed()
	}
	if closed {
		return fmt.Errorf("%w: the Locker's connection is closed", ErrUnavailable)
	}
	return nil
}

// pingPool pings a pool (a round trip on one of its connections, which it
// opens if it has none).
func pingPool(ctx context.Context, db any) error {
	switch p := db.(type) {
	case *pgxpool.Pool:
		return p.Ping(ctx)
	case *sql.DB:
		return p.PingContext(ctx)
	case *memlock.Session: // the in-memory double: down or up
		return p.Server().Down()
	}
	return nil
}

// reach checks that the multiplexer reaches its server on a lock
// connection (see Locker.CheckHealth): a check request on each open lock
// connection in turn until one answers, else on a new one.
func (m *mux) reach(ctx context.Context) error {
	if err := m.init(ctx); err != nil {
		return err
	}
	if m.perHold != nil {
		return m.db.PingContext(ctx)
	}
	var last error
	for i := range m.conns {
		c := m.lc.Peek(i)
		if c == nil || c.IsDead() || !c.HasConn() {
			continue
		}
		op := connOp{Ctx: ctx, Check: true}
		c.Do(&op)
		if op.Err == nil && op.OK {
			return nil
		}
		last = op.Err
		if ctx.Err() != nil {
			return last
		}
	}
	// None open, or none answered (each that did not is lost now): open
	// one, as a lock would.
	c := m.lc.Slot(0)
	if c == nil {
		return ErrLockerClosed
	}
	op := connOp{Ctx: ctx, Check: true}
	c.Do(&op)
	switch {
	case op.Err != nil && last != nil:
		return fmt.Errorf("%w; then: %w", last, op.Err)
	case op.Err != nil:
		return op.Err
	case !op.OK:
		return errors.Join(last, errors.New("pglock: the lock connection's check answered false"))
	}
	return nil
}
