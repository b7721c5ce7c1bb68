package echo5lock

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/labstack/echo/v5"

	"github.com/pglockkit/kit/internal/holdwriter"
	"github.com/pglockkit/kit/pglock"
)

type lockMiddleware struct {
	cfg      Config             // defaults filled in; Scope and Mode nil (see scope, mode)
	scope    pglock.Scope       // Config.Scope, else the Locker's
	mode     pglock.Mode        // Config.Mode, else the Locker's
	lockOpts [2][]pglock.Option // by mode
}

// errRollback is what the locked function returns when Commit says roll
// back, so that Lock.Do rolls the transaction back.
var errRollback = errors.New("echo5lock: commit rule said roll back")

func (m *lockMiddleware) handle(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c *echo.Context) error {
		cfg := &m.cfg
		if cfg.Skipper(c) {
			return next(c)
		}
		name, ok, err := cfg.KeyExtractor(c)
		if err != nil {
			m.log(slog.LevelDebug, "echo5lock: bad key", "", err)
			return cfg.ErrorHandler(c, fmt.Errorf("%w: %w", ErrKey, err))
		}
		if !ok {
			return next(c)
		}
		name = cfg.Namespace + name
		mode := m.mode
		if cfg.ModeFunc != nil {
			mode = cfg.ModeFunc(c)
			if mode != pglock.Exclusive && mode != pglock.Shared {
				err := fmt.Errorf("%w: ModeFunc returned %v", ErrInvalidConfig, mode)
				m.log(slog.LevelError, "echo5lock: bad mode", name, err)
				return echo.NewHTTPError(http.StatusInternalServerError, http.StatusText(http.StatusInternalServerError)).Wrap(err)
			}
		}
		lock, err := cfg.Locker.Lock(name, m.lockOpts[mode]...)
		if err != nil {
			return m.fail(c, name, fmt.Errorf("%w: %w", ErrDatabase, err))
		}
		if m.scope == pglock.Transaction {
			return m.inTransaction(c, next, lock, name)
		}
		return m.inSession(c, next, lock, name)
	}
}

// hold runs fn holding lock: Lock.Do when the middleware waits, Lock.TryDo
// when it does not. busy reports a TryDo that found the key held elsewhere.
func (m *lockMiddleware) hold(ctx context.Context, lock *pglock.Lock, fn func(context.Context) error) (busy bool, err error) {
	if m.cfg.Wait > 0 {
		return false, lock.Do(ctx, fn)
	}
	did, err := lock.TryDo(ctx, fn)
	return err == nil && !did, err
}

// inSession runs next holding a Session lock. The handler's request context
// is the lock's: it is cancelled with cause pglock.ErrLockLost if the lock's
// connection dies. A panic releases the lock and is raised again.
func (m *lockMiddleware) inSession(c *echo.Context, next echo.HandlerFunc, lock *pglock.Lock, name string) error {
	req := c.Request()
	defer c.SetRequest(req) // later middleware must not see the lock's context
	var herr error
	ran := false
	busy, err := m.hold(req.Context(), lock, func(ctx context.Context) error {
		ran = true
		c.SetRequest(req.WithContext(ctx))
		herr = next(c)
		return nil
	})
	c.SetRequest(req)
	switch {
	case busy:
		return m.busy(c, name, ErrBusy)
	case !ran:
		return m.notAcquired(c, name, err)
	case err != nil:
		m.log(slog.LevelWarn, "echo5lock: release failed after the handler ran", name, err)
	}
	return herr
}

// inTransaction runs next in the lock's transaction, with the response held
// back until the transaction has ended: the handler writes to an
// *echo.Response of its own on a holdwriter.Writer over the request's
// response, so that Echo's Response (and whatever outer middleware hooked
// on it) sees only what is sent, and the DenyHandler, the ErrorHandler and
// Echo's HTTPErrorHandler answer on the request's response as if the
// handler had written nothing.
func (m *lockMiddleware) inTransaction(c *echo.Context, next echo.HandlerFunc, lock *pglock.Lock, name string) error {
	req, orig := c.Request(), c.Response()
	var tw *holdwriter.Writer
	var herr error
	restore := func() {
		c.SetRequest(req) // later middleware must not see an ended tx
		c.SetResponse(orig)
	}
	returned := false
	defer func() {
		if returned {
			return
		}
		// A panic, raised again by Lock.Do after the rollback: the held
		// response must not go out; Recover, outside, answers instead.
		if tw != nil {
			tw.Discard()
		}
		restore()
	}()
	busy, err := m.hold(req.Context(), lock, func(ctx context.Context) error {
		tw = holdwriter.New(orig)
		resp := echo.NewResponse(tw, logger(c))
		resp.Status = http.StatusOK // as Echo sets it for each request
		c.SetResponse(resp)
		c.SetRequest(req.WithContext(ctx))
		herr = next(c)
		if !m.cfg.Commit(c, herr) {
			return errRollback
		}
		return nil
	})
	restore()
	returned = true

	switch {
	case busy:
		return m.busy(c, name, ErrBusy)
	case tw == nil: // the handler did not run
		return m.notAcquired(c, name, err)
	case err == nil || errors.Is(err, errRollback):
		if err != nil && err != errRollback { // Do joined a rollback error
			m.log(slog.LevelWarn, "echo5lock: rollback failed", name, err)
		}
		if err != nil && herr != nil {
			// Rolled back on the handler's error: the error is the answer,
			// not what the handler wrote before returning it.
			if !tw.Discard() {
				m.log(slog.LevelWarn, "echo5lock: rolled back after the response was flushed", name, herr)
			}
			return herr
		}
		if err := tw.Release(); err != nil {
			m.log(slog.LevelDebug, "echo5lock: sending the held response", name, err)
		}
		return herr
	default: // the commit failed
		err = fmt.Errorf("%w: %w", ErrDatabase, err)
		if tw.Discard() {
			return m.fail(c, name, err)
		}
		m.log(slog.LevelWarn, "echo5lock: commit failed after the response was flushed", name, err)
		return errors.Join(herr, err)
	}
}

// logger is the logger of the handler's *echo.Response (it reports a
// status written twice), never nil.
func logger(c *echo.Context) *slog.Logger {
	if l := c.Logger(); l != nil {
		return l
	}
	return slog.New(slog.DiscardHandler)
}

func (m *lockMiddleware) notAcquired(c *echo.Context, name string, err error) error {
	switch {
	case c.Request().Context().Err() != nil:
		m.log(slog.LevelDebug, "echo5lock: request ended while waiting", name, err)
		return echo.NewHTTPError(http.StatusServiceUnavailable, "request ended while waiting for the lock").
			Wrap(fmt.Errorf("%w: %w", ErrRequestEnded, err))
	case m.cfg.Wait > 0 && errors.Is(err, pglock.ErrNotAcquired) && errors.Is(err, context.DeadlineExceeded):
		return m.busy(c, name, fmt.Errorf("%w: %w", ErrBusy, err))
	default:
		return m.fail(c, name, fmt.Errorf("%w: %w", ErrDatabase, err))
	}
}

func (m *lockMiddleware) busy(c *echo.Context, name string, err error) error {
	m.log(slog.LevelDebug, "echo5lock: busy", name, err)
	if d := m.cfg.RetryAfter; d > 0 {
		secs := (d + time.Second - 1) / time.Second
		c.Response().Header().Set(echo.HeaderRetryAfter, strconv.FormatInt(int64(secs), 10))
	}
	return m.cfg.DenyHandler(c, name, err)
}

func (m *lockMiddleware) fail(c *echo.Context, name string, err error) error {
	m.log(slog.LevelWarn, "echo5lock: lock failed", name, err)
	return m.cfg.ErrorHandler(c, err)
}

func (m *lockMiddleware) log(level slog.Level, msg, name string, err error) {
	if m.cfg.Logger == nil {
		return
	}
	attrs := []slog.Attr{slog.String("key", name)}
	if err != nil {
		attrs = append(attrs, slog.Any("error", err))
	}
	m.cfg.Logger.LogAttrs(context.Background(), level, msg, attrs...)
}
