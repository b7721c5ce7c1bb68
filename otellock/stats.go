package otellock

import (
	"context"
	"errors"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/pglockkit/kit/pglock"
)

// The instruments of a Locker's figures (pglock.Locker.Stats).
const (
	connsName       = "pglock.locker.connection.count"
	queuedName      = "pglock.locker.queued"
	usageName       = "pglock.locker.server_lock.usage"
	limitName       = "pglock.locker.server_lock.limit"
	utilizationName = "pglock.locker.server_lock.utilization"
)

func (in *Instrumentation) newStatInstruments() error {
	m := in.meter
	var err, e error
	in.conns, e = m.Int64ObservableUpDownCounter(connsName, metric.WithUnit("{connection}"),
		metric.WithDescription("Open connections of a multiplexing Locker's own, by pglock.connection.type: lock (they hold its session locks) or wait, and for wait by pglock.connection.state: waiting (for a busy key), holding (what they waited for), idle, or leader (a Leader's own, campaigning or leading)."))
	err = errors.Join(err, e)
	in.queued, e = m.Int64ObservableUpDownCounter(queuedName, metric.WithUnit("{waiter}"),
		metric.WithDescription("Goroutines waiting in the process for a key that another Lock of the Locker holds or is taking."))
	err = errors.Join(err, e)
	in.usage, e = m.Int64ObservableUpDownCounter(usageName, metric.WithUnit("{lock}"),
		metric.WithDescription("Session locks the Locker holds or is taking in the server: its entries in the server's shared lock table."))
	err = errors.Join(err, e)
	in.limit, e = m.Int64ObservableUpDownCounter(limitName, metric.WithUnit("{lock}"),
		metric.WithDescription("The cap on the Locker's session locks (pglock.WithMaxLocks; by default a quarter of the server's lock table), once known."))
	err = errors.Join(err, e)
	in.utilization, e = m.Float64ObservableGauge(utilizationName, metric.WithUnit("1"),
		metric.WithDescription("pglock.locker.server_lock.usage over pglock.locker.server_lock.limit: at 1, acquires fail with pglock.ErrTooManyLocks."))
	return errors.Join(err, e)
}

// statSets are the attribute sets of a Locker's figures.
type statSets struct {
	base, lockConns                     metric.MeasurementOption
	waiting, holding, idle, leaderConns metric.MeasurementOption
}

func newStatSets(extra []attribute.KeyValue) statSets {
	with := func(more ...attribute.KeyValue) metric.MeasurementOption {
		return metric.WithAttributeSet(attribute.NewSet(append(append([]attribute.KeyValue(nil), extra...), more...)...))
	}
	return statSets{
		base:        with(),
		lockConns:   with(connTypeKey.String("lock")),
		waiting:     with(connTypeKey.String("wait"), connStateKey.String("waiting")),
		holding:     with(connTypeKey.String("wait"), connStateKey.String("holding")),
		idle:        with(connTypeKey.String("wait"), connStateKey.String("idle")),
		leaderConns: with(connTypeKey.String("wait"), connStateKey.String("leader")),
	}
}

// RecordStats reports lk's figures (pglock.Locker.Stats) at each collection
// until the returned registration is unregistered: call Unregister when
// closing the Locker. The figures, with the attributes of WithAttributes
// only (they are the Locker's, not a lock's):
//
//   - pglock.locker.connection.count {connection}: its own connections, by
//     pglock.connection.type "lock" (LockConns) and "wait" (WaitConns), the
//     latter by pglock.connection.state "waiting", "holding", "idle" and
//     "leader" (WaitingConns, HoldingConns, IdleConns, LeaderConns); 0 for
//     a Locker that does not multiplex (on one connection, or
//     pglock.WithMultiplexing(false)).
//   - pglock.locker.queued {waiter}: goroutines queued in the process for a
//     key that another of its Locks holds or is taking (Queued).
//   - pglock.locker.server_lock.usage and .limit {lock}: the session locks it
//     holds or is taking in the server's shared lock table (ServerLocks), and
//     its cap (MaxLocks, reported once known: after the first lock connection
//     opened).
//   - pglock.locker.server_lock.utilization (a gauge, unit 1): usage over
//     limit, the lock table health to alert on (at 1, acquires fail with
//     pglock.ErrTooManyLocks), reported with the limit.
//
// These are UpDownCounters (a gauge in Prometheus), as OpenTelemetry's
// conventions make counts of things in use, and a Gauge for the ratio.
// Each Locker of a process needs attributes of its own (an Instrumentation
// per Locker, with WithAttributes): two Lockers recorded with the same
// attributes would report one series, with one of their values.
func (in *Instrumentation) RecordStats(lk *pglock.Locker) (metric.Registration, error) {
	if lk == nil {
		return nil, ErrNilLocker
	}
	s := in.statSets
	return in.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st := lk.Stats()
		o.ObserveInt64(in.conns, int64(st.LockConns), s.lockConns)
		o.ObserveInt64(in.conns, int64(st.WaitingConns), s.waiting)
		o.ObserveInt64(in.conns, int64(st.HoldingConns), s.holding)
		o.ObserveInt64(in.conns, int64(st.IdleConns), s.idle)
		o.ObserveInt64(in.conns, int64(st.LeaderConns), s.leaderConns)
		o.ObserveInt64(in.queued, int64(st.Queued), s.base)
		o.ObserveInt64(in.usage, int64(st.ServerLocks), s.base)
		if st.MaxLocks > 0 {
			o.ObserveInt64(in.limit, int64(st.MaxLocks), s.base)
			o.ObserveFloat64(in.utilization, float64(st.ServerLocks)/float64(st.MaxLocks), s.base)
		}
		return nil
	}, in.conns, in.queued, in.usage, in.limit, in.utilization)
}
