package echocore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/pglockkit/kit/internal/holdwriter"
	"github.com/pglockkit/kit/pglock"
)

// Handle wraps next: it names the request's key, takes the lock (waiting or
// not, as configured), runs next holding it, and ends the hold. Answers
// other than next's are returned as errors, never written: a busy key goes
// to the DenyHandler, a key or database error to the ErrorHandler.
func (m *Middleware[C]) Handle(next func(C) error) func(C) error {
	return func(c C) error {
		cfg, e := &m.cfg, &m.fw.Errors
		if cfg.Skipper(c) {
			return next(c)
		}
		name, ok, err := cfg.KeyExtractor(c)
		if err != nil {
			m.log(slog.LevelDebug, "bad key", "", err)
			return cfg.ErrorHandler(c, fmt.Errorf("%w: %w", e.Key, err))
		}
		if !ok {
			return next(c)
		}
		name = cfg.Namespace + name
		mode := m.mode
		if cfg.ModeFunc != nil {
			mode = cfg.ModeFunc(c)
			if mode != pglock.Exclusive && mode != pglock.Shared {
				err := fmt.Errorf("%w: ModeFunc returned %v", e.InvalidConfig, mode)
				m.log(slog.LevelError, "bad mode", name, err)
				return m.fw.HTTPError(http.StatusInternalServerError, http.StatusText(http.StatusInternalServerError), err)
			}
		}
		lock, err := cfg.Locker.NewLock(name, m.lockOpts[mode]...)
		if err != nil {
			return m.fail(c, name, fmt.Errorf("%w: %w", e.Database, err))
		}
		return m.run(c, next, lock, name)
	}
}

// run runs next holding lock: Lock.Do when the middleware waits, Lock.TryDo
// when it does not. The handler's request context is the lock's (in Session
// scope it is cancelled with cause pglock.ErrLockLost if the lock's
// connection dies; in Transaction scope it carries the transaction).
//
// In Transaction scope the handler writes through a holdwriter.Writer
// (Framework.Hold) that holds its response back until the transaction has
// ended. The request and the response are given back as soon as the hold
// ends, before the DenyHandler or the ErrorHandler may write an answer of
// their own, which must reach the client, not the held-back writer.
func (m *Middleware[C]) run(c C, next func(C) error, lock *pglock.Lock, name string) error {
	h := &hold[C]{m: m, c: c, next: next, req: m.fw.Request(c)}
	defer h.panicked()
	busy := false
	var err error
	if m.cfg.Wait > 0 {
		err = lock.Do(h.req.Context(), h.locked)
	} else {
		var did bool
		did, err = lock.TryDo(h.req.Context(), h.locked)
		busy = err == nil && !did
	}
	h.restore()
	h.returned = true

	tw, herr := h.tw, h.herr
	switch {
	case busy:
		return m.busy(c, name, m.fw.Errors.Busy)
	case !h.ran:
		return m.notAcquired(c, name, err)
	case tw == nil: // Session scope: the response is the handler's
		if err != nil {
			m.log(slog.LevelWarn, "release failed after the handler ran", name, err)
		}
		return herr
	case err == nil || errors.Is(err, m.errRollback):
		if err != nil && err != m.errRollback { // Do joined a rollback error
			m.log(slog.LevelWarn, "rollback failed", name, err)
		}
		if err != nil && herr != nil {
			// Rolled back on the handler's error: the error is the answer,
			// not what the handler wrote before returning it.
			if !m.discard(c, tw) {
				m.log(slog.LevelWarn, "rolled back after the response was flushed", name, herr)
			}
			return herr
		}
		if err := tw.Release(); err != nil {
			m.log(slog.LevelDebug, "sending the held response", name, err)
		}
		return herr
	default: // the commit failed
		err = fmt.Errorf("%w: %w", m.fw.Errors.Database, err)
		if m.discard(c, tw) {
			return m.fail(c, name, err)
		}
		m.log(slog.LevelWarn, "commit failed after the response was flushed", name, err)
		return errors.Join(herr, err)
	}
}

// hold is one request's run under its lock.
type hold[C any] struct {
	m        *Middleware[C]
	c        C
	next     func(C) error
	req      *http.Request      // the request as it came
	ran      bool               // the handler ran
	herr     error              // what it returned
	tw       *holdwriter.Writer // in Transaction scope, its response held back
	giveBack func()             // gives c its response back (Framework.Hold)
	returned bool               // the lock's Do or TryDo returned
}

// locked is the function run holding the lock.
func (h *hold[C]) locked(ctx context.Context) error {
	h.ran = true
	if h.m.scope == pglock.Transaction {
		h.tw, h.giveBack = h.m.fw.Hold(h.c)
	}
	h.m.fw.SetRequest(h.c, h.req.WithContext(ctx))
	h.herr = h.next(h.c)
	if h.tw != nil && !h.m.cfg.Commit(h.c, h.herr) {
		return h.m.errRollback
	}
	return nil
}

// restore gives c its request and response back: later middleware must not
// see the lock's context or an ended transaction.
func (h *hold[C]) restore() {
	h.m.fw.SetRequest(h.c, h.req)
	if h.giveBack != nil {
		h.giveBack()
	}
}

// panicked, deferred, restores c after a panic, raised again by Lock.Do
// after the release or rollback: the held response must not go out;
// Recover, outside, answers instead.
func (h *hold[C]) panicked() {
	if h.returned {
		return
	}
	h.restore()
	if h.tw != nil {
		h.m.discard(h.c, h.tw)
	}
}

// discard drops the held response so that an error handler writes the
// answer. It reports false when part of the response was flushed already
// (then nothing can be taken back).
func (m *Middleware[C]) discard(c C, tw *holdwriter.Writer) bool {
	if !tw.Discard() {
		return false
	}
	if m.fw.Reset != nil {
		m.fw.Reset(c)
	}
	return true
}

// notAcquired answers a request whose handler did not run.
func (m *Middleware[C]) notAcquired(c C, name string, err error) error {
	e := &m.fw.Errors
	switch {
	case m.fw.Request(c).Context().Err() != nil:
		m.log(slog.LevelDebug, "request ended while waiting", name, err)
		return m.fw.HTTPError(http.StatusServiceUnavailable, "request ended while waiting for the lock",
			fmt.Errorf("%w: %w", e.RequestEnded, err))
	case m.cfg.Wait > 0 && errors.Is(err, pglock.ErrNotAcquired) && errors.Is(err, context.DeadlineExceeded):
		return m.busy(c, name, fmt.Errorf("%w: %w", e.Busy, err))
	default:
		return m.fail(c, name, fmt.Errorf("%w: %w", e.Database, err))
	}
}

// busy answers a busy key through the DenyHandler, after setting
// Retry-After; err matches Errors.Busy.
func (m *Middleware[C]) busy(c C, name string, err error) error {
	m.log(slog.LevelDebug, "busy", name, err)
	if d := m.cfg.RetryAfter; d > 0 {
		m.fw.Header(c).Set("Retry-After", retryAfter(d))
	}
	return m.cfg.DenyHandler(c, name, err)
}

// retryAfter returns d as a Retry-After value: whole seconds, rounded up.
func retryAfter(d time.Duration) string {
	return strconv.FormatInt(int64((d+time.Second-1)/time.Second), 10)
}

func (m *Middleware[C]) fail(c C, name string, err error) error {
	m.log(slog.LevelWarn, "lock failed", name, err)
	return m.cfg.ErrorHandler(c, err)
}

// log logs msg, prefixed with the adapter's name, with the key name and
// err, when the Config has a Logger.
func (m *Middleware[C]) log(level slog.Level, msg, name string, err error) {
	if m.cfg.Logger == nil {
		return
	}
	attrs := []slog.Attr{slog.String("key", name)}
	if err != nil {
		attrs = append(attrs, slog.Any("error", err))
	}
	m.cfg.Logger.LogAttrs(context.Background(), level, m.fw.Name+": "+msg, attrs...)
}
