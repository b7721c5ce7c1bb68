package otellock

import (
	"context"
	"errors"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/pglockkit/kit/pglock"
)

// The instruments of lock events (pglock.WithObserver).
const (
	acquisitionsName = "pglock.lock.acquisitions"
	waitName         = "pglock.lock.wait.duration"
	holdName         = "pglock.lock.hold.duration"
	lostName         = "pglock.lock.lost"
	heldName         = "pglock.lock.held"
)

// Explicit bucket boundaries, in seconds (the SDK's default ones suit
// milliseconds). An uncontended acquire takes a round trip (about 0.1 ms on
// loopback, a few ms across a network); a busy key is waited for until its
// holder lets go. Holds last from a round trip to the length of a leader's
// term. A View can replace them.
var (
	waitBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}
	holdBuckets = []float64{0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600}
)

func (in *Instrumentation) newEventInstruments() error {
	m := in.meter
	var err, e error
	in.acquisitions, e = m.Int64Counter(acquisitionsName, metric.WithUnit("{acquisition}"),
		metric.WithDescription("Attempts to take a lock, by outcome: acquired, busy (TryAcquire or TryDo found it held elsewhere), cancelled (the context or the wait timeout ended the wait), error."))
	err = errors.Join(err, e)
	in.wait, e = m.Float64Histogram(waitName, metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(waitBuckets...),
		metric.WithDescription("How long an attempt to take a lock took, by outcome: the wait for a busy key, or one round trip."))
	err = errors.Join(err, e)
	in.hold, e = m.Float64Histogram(holdName, metric.WithUnit("s"), metric.WithExplicitBucketBoundaries(holdBuckets...),
		metric.WithDescription("How long a lock was held, from its acquire to its release (error.type is set when the release failed, lock_lost for a lost lock)."))
	err = errors.Join(err, e)
	in.lost, e = m.Int64Counter(lostName, metric.WithUnit("{lock}"),
		metric.WithDescription("Held locks lost because their connection died or the server ended their session."))
	err = errors.Join(err, e)
	in.held, e = m.Int64UpDownCounter(heldName, metric.WithUnit("{lock}"),
		metric.WithDescription("Locks held now: acquired and not yet released (a lost lock counts until its Lock is released)."))
	return errors.Join(err, e)
}

// eventSets are the attribute sets of the frequent measurements, made once
// (indexed by pglock.Scope and pglock.Mode, both 0 or 1), so that recording
// an event does not allocate.
type eventSets struct {
	base     [2][2]measure // scope, mode
	acquired [2][2]measure // and outcome
	busy     [2][2]measure
}

// measure is an attribute set as the options of Add and Record, ready to
// pass: a variadic call with a slice allocates nothing.
type measure struct {
	add []metric.AddOption
	rec []metric.RecordOption
}

func newMeasure(set attribute.Set) measure {
	o := metric.WithAttributeSet(set)
	return measure{add: []metric.AddOption{o}, rec: []metric.RecordOption{o}}
}

func newEventSets(extra []attribute.KeyValue) eventSets {
	var s eventSets
	for sc := range 2 {
		for md := range 2 {
			ev := pglock.Event{Scope: pglock.Scope(sc), Mode: pglock.Mode(md)}
			s.base[sc][md] = newMeasure(lockSet(ev, extra))
			s.acquired[sc][md] = newMeasure(lockSet(ev, extra, outcomeKey.String(outcomeAcquired)))
			s.busy[sc][md] = newMeasure(lockSet(ev, extra, outcomeKey.String(outcomeBusy)))
		}
	}
	return s
}

// lockSet is the attribute set of a measurement of ev's lock: its scope and
// mode, never its key.
func lockSet(ev pglock.Event, extra []attribute.KeyValue, more ...attribute.KeyValue) attribute.Set {
	kv := make([]attribute.KeyValue, 0, 2+len(extra)+len(more))
	kv = append(kv, scopeKey.String(ev.Scope.String()), modeKey.String(ev.Mode.String()))
	kv = append(kv, extra...)
	kv = append(kv, more...)
	return attribute.NewSet(kv...)
}

// Observer returns the function that records lock events as metrics: give it
// to pglock.WithObserver (Options does), or call it from an observer of your
// own. Every measurement has the attributes pglock.scope and pglock.mode
// (and those of WithAttributes), never the lock's key:
//
//   - EventAcquired, EventBusy, EventNotAcquired: pglock.lock.acquisitions
//     +1 and pglock.lock.wait.duration, with pglock.outcome (acquired, busy,
//     cancelled or error) and, for cancelled and error, error.type;
//     EventAcquired also adds 1 to pglock.lock.held.
//   - EventReleased, EventReleaseFailed: pglock.lock.hold.duration (with
//     error.type for a failed release) and pglock.lock.held -1. A lost lock
//     ends here too, when its Lock is released (Release, or Do returning),
//     with error.type lock_lost.
//   - EventLost: pglock.lock.lost +1.
func (in *Instrumentation) Observer() func(pglock.Event) {
	return in.observe
}

func (in *Instrumentation) observe(ev pglock.Event) {
	ctx := context.Background()
	sc, md := int(ev.Scope), int(ev.Mode)
	known := sc >= 0 && sc < 2 && md >= 0 && md < 2
	base := func() measure {
		if known {
			return in.sets.base[sc][md]
		}
		return newMeasure(lockSet(ev, in.extra))
	}
	switch ev.Kind {
	case pglock.EventAcquired, pglock.EventBusy, pglock.EventNotAcquired:
		var m measure
		switch {
		case ev.Kind == pglock.EventAcquired && known:
			m = in.sets.acquired[sc][md]
		case ev.Kind == pglock.EventBusy && known:
			m = in.sets.busy[sc][md]
		default:
			m = newMeasure(attemptSet(ev, in.extra))
		}
		in.acquisitions.Add(ctx, 1, m.add...)
		in.wait.Record(ctx, ev.Wait.Seconds(), m.rec...)
		if ev.Kind == pglock.EventAcquired {
			in.held.Add(ctx, 1, base().add...)
		}
	case pglock.EventReleased:
		b := base()
		in.hold.Record(ctx, ev.Held.Seconds(), b.rec...)
		in.held.Add(ctx, -1, b.add...)
	case pglock.EventReleaseFailed:
		failed := newMeasure(lockSet(ev, in.extra, errorTypeKey.String(errorType(ev.Err))))
		in.hold.Record(ctx, ev.Held.Seconds(), failed.rec...)
		in.held.Add(ctx, -1, base().add...)
	case pglock.EventLost:
		in.lost.Add(ctx, 1, base().add...)
	}
}

// attemptSet is the attribute set of an attempt that is not one of the
// precomputed ones (a failed attempt, or an unknown scope or mode).
func attemptSet(ev pglock.Event, extra []attribute.KeyValue) attribute.Set {
	var held bool
	var err error
	switch ev.Kind {
	case pglock.EventAcquired:
		held = true
	case pglock.EventNotAcquired:
		err = ev.Err
		if err == nil { // not expected; never count it as busy
			err = pglock.ErrNotAcquired
		}
	}
	o := outcome(held, err)
	if err == nil {
		return lockSet(ev, extra, outcomeKey.String(o))
	}
	return lockSet(ev, extra, outcomeKey.String(o), errorTypeKey.String(errorType(err)))
}
