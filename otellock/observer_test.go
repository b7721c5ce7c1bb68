package otellock_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pglockkit/kit/pglock"
)

// The observer turns each kind of event into its measurements, with the
// outcome and error.type that the event's error says, without a database.
func TestObserverEvents(t *testing.T) {
	t.Parallel()
	tel := newTelemetry(t)
	observe := tel.inst.Observer()
	key := pglock.Int64Key(42)
	// notAcquired wraps errs as pglock does: "pglock: lock not acquired:
	// key 42: <errs>".
	notAcquired := func(errs ...any) error {
		return fmt.Errorf("%w: key 42"+strings.Repeat(": %w", len(errs)), append([]any{pglock.ErrNotAcquired}, errs...)...)
	}
	events := []pglock.Event{
		{Kind: pglock.EventAcquired, Key: key, Wait: 2 * time.Millisecond},
		{Kind: pglock.EventAcquired, Key: key, Scope: pglock.Transaction, Mode: pglock.Shared, Wait: time.Millisecond},
		{Kind: pglock.EventBusy, Key: key, Wait: time.Millisecond},
		{Kind: pglock.EventNotAcquired, Key: key, Wait: time.Second, Err: notAcquired(context.DeadlineExceeded)},
		{Kind: pglock.EventNotAcquired, Key: key, Wait: time.Second, Err: notAcquired(context.Canceled)},
		{Kind: pglock.EventNotAcquired, Key: key, Err: notAcquired(pglock.ErrTooManyLocks)},
		{Kind: pglock.EventNotAcquired, Key: key, Err: notAcquired(&pgconn.PgError{Code: "53200"})},
		{Kind: pglock.EventNotAcquired, Key: key, Err: notAcquired(pglock.ErrUnavailable, errors.New("dial: refused"))},
		{Kind: pglock.EventLost, Key: key, Held: 3 * time.Second, Err: errors.New("connection closed")},
		{Kind: pglock.EventReleaseFailed, Key: key, Held: 4 * time.Second, Err: fmt.Errorf("pglock: release key 42: %w", pglock.ErrLockLost)},
		{Kind: pglock.EventReleased, Key: key, Scope: pglock.Transaction, Mode: pglock.Shared, Held: 5 * time.Second},
	}
	for _, ev := range events {
		observe(ev)
	}
	points := tel.collect(t)

	if got, want := byAttr(points, "pglock.lock.acquisitions", "pglock.outcome"),
		map[string]float64{"acquired": 2, "busy": 1, "cancelled": 2, "error": 3}; !equalCounts(got, want) {
		t.Errorf("acquisitions by outcome = %v, want %v", got, want)
	}
	if got, want := byAttr(points, "pglock.lock.acquisitions", "error.type"),
		map[string]float64{"": 3, "timeout": 1, "cancelled": 1, "too_many_locks": 1, "53200": 1, "unavailable": 1}; !equalCounts(got, want) {
		t.Errorf("acquisitions by error.type = %v, want %v", got, want)
	}
	if got, want := byAttr(points, "pglock.lock.wait.duration", "pglock.outcome"),
		map[string]float64{"acquired": 2, "busy": 1, "cancelled": 2, "error": 3}; !equalCounts(got, want) {
		t.Errorf("wait.duration counts by outcome = %v, want %v", got, want)
	}
	var waitSum float64
	for _, p := range named(points, "pglock.lock.wait.duration") {
		waitSum += p.sum
	}
	if want := 2.004; waitSum < want-1e-9 || waitSum > want+1e-9 {
		t.Errorf("wait.duration sum = %v s, want %v", waitSum, want)
	}
	if got, want := byAttr(points, "pglock.lock.hold.duration", "error.type"),
		map[string]float64{"": 1, "lock_lost": 1}; !equalCounts(got, want) {
		t.Errorf("hold.duration by error.type = %v, want %v", got, want)
	}
	if got, want := byAttr(points, "pglock.lock.held", "pglock.scope"),
		map[string]float64{"session": 0, "transaction": 0}; !equalCounts(got, want) {
		t.Errorf("held by scope = %v, want %v", got, want)
	}
	if got := total(points, "pglock.lock.lost"); got != 1 {
		t.Errorf("lost = %v, want 1", got)
	}
	if got := byAttr(points, "pglock.lock.acquisitions", "pglock.mode"); got["shared"] != 1 || got["exclusive"] != 7 {
		t.Errorf("acquisitions by mode = %v", got)
	}
	for _, p := range points {
		if _, ok := p.attr("pglock.key"); ok {
			t.Errorf("a metric carries the key: %v", p)
		}
	}
}

// A scope or mode that pglock does not define (a newer pglock) is recorded
// with its name, not dropped, and does not panic.
func TestObserverUnknownScope(t *testing.T) {
	t.Parallel()
	tel := newTelemetry(t)
	observe := tel.inst.Observer()
	observe(pglock.Event{Kind: pglock.EventAcquired, Scope: pglock.Scope(7), Mode: pglock.Mode(-1)})
	observe(pglock.Event{Kind: pglock.EventReleased, Scope: pglock.Scope(7), Mode: pglock.Mode(-1)})
	observe(pglock.Event{Kind: pglock.EventNotAcquired, Scope: pglock.Scope(7)}) // no Err: still not busy
	observe(pglock.Event{Kind: pglock.EventKind(99)})                            // ignored
	points := tel.collect(t)
	if got := byAttr(points, "pglock.lock.acquisitions", "pglock.outcome"); got["acquired"] != 1 || got["error"] != 1 || len(got) != 2 {
		t.Errorf("acquisitions by outcome = %v%s", got, dump(points))
	}
	if got := total(points, "pglock.lock.held"); got != 0 {
		t.Errorf("held = %v, want 0", got)
	}
	if got := total(points, "pglock.lock.hold.duration"); got != 1 {
		t.Errorf("hold.duration count = %v, want 1", got)
	}
}
