package pglock

import (
	"context"
	"log/slog"
	"time"
)

// EventKind says what happened to a lock.
type EventKind int

const (
	// EventAcquired: the lock is now held.
	EventAcquired EventKind = iota + 1
	// EventBusy: TryAcquire (or TryDo) found the lock held elsewhere.
	EventBusy
	// EventNotAcquired: Acquire gave up (context, wait timeout or error).
	EventNotAcquired
	// EventReleased: the hold ended normally.
	EventReleased
	// EventReleaseFailed: ending the hold failed (Event.Err says why).
	EventReleaseFailed
	// EventLost: the connection of a held lock died.
	EventLost
)

var eventNames = [...]string{"", "acquired", "busy", "not acquired", "released", "release failed", "lost"}

// String returns the event's name, as logged: "acquired", "busy", ...
func (k EventKind) String() string {
	if k < 1 || int(k) >= len(eventNames) {
		return "unknown"
	}
	return eventNames[k]
}

// Event is one thing that happened to a lock, for metrics and tracing (see
// [WithObserver]).
type Event struct {
	// Kind says what happened.
	Kind EventKind
	// Key, Scope and Mode are the lock's.
	Key   Key
	Scope Scope
	Mode  Mode
	// KeyName is the name the key was hashed from (see [Lock.Name]); it may
	// carry user data.
	KeyName string
	// Wait is how long Acquire or TryAcquire took, for EventAcquired, EventBusy
	// and EventNotAcquired.
	Wait time.Duration
	// Held is how long the hold lasted, for EventReleased and
	// EventReleaseFailed (to the release) and EventLost (to the loss).
	Held time.Duration
	// Err is the error, for EventNotAcquired, EventReleaseFailed and EventLost.
	Err error
}

// WithObserver sets a function called synchronously with every [Event] of
// the lock: hook metrics or tracing to it without adding a dependency to
// pglock. It must be quick and must not call the Lock's methods. EventLost is
// delivered from the goroutine that watches the connection. The default is
// nil: no observer.
func WithObserver(fn func(Event)) Option {
	return func(c *config) { c.observer = fn }
}

// emit logs an event and hands it to the observer.
// d is the wait for EventAcquired, EventBusy and EventNotAcquired, else the
// hold's length.
func (l *Lock) emit(kind EventKind, d time.Duration, err error) {
	var wait, held time.Duration
	switch kind {
	case EventAcquired, EventBusy, EventNotAcquired:
		wait = d
	default:
		held = d
	}
	if l.cfg.observer != nil {
		l.cfg.observer(Event{Kind: kind, Key: l.key, Scope: l.cfg.scope, Mode: l.cfg.mode, KeyName: l.name, Wait: wait, Held: held, Err: err})
	}
	if l.log == nil {
		return
	}
	level := slog.LevelDebug
	if kind == EventLost || kind == EventReleaseFailed {
		level = slog.LevelWarn
	}
	attrs := make([]slog.Attr, 0, 3)
	if wait > 0 {
		attrs = append(attrs, slog.Duration("wait", wait))
	}
	if held > 0 {
		attrs = append(attrs, slog.Duration("held", held))
	}
	if err != nil {
		attrs = append(attrs, slog.Any("error", err))
	}
	l.log.LogAttrs(context.Background(), level, "pglock: "+kind.String(), attrs...)
}
