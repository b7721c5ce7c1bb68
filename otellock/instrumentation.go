package otellock

import (
	"errors"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.40.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/pglockkit/kit/pglock"
)

// ScopeName is the instrumentation scope (the meter's and tracer's name) of
// everything this package records.
const ScopeName = "github.com/pglockkit/kit/otellock"

// Instrumentation records the locks of the Lockers it is given to as
// OpenTelemetry metrics and spans. Make it with [New], pass
// [Instrumentation.Options] to pglock.NewLocker (or pglock.New), and call
// [Instrumentation.RecordStats] for a Locker's gauges. It is safe for
// concurrent use. Several Lockers may share one; to tell their figures
// apart, give each an Instrumentation of its own with [WithAttributes].
type Instrumentation struct {
	meter  metric.Meter
	tracer trace.Tracer
	extra  []attribute.KeyValue // WithAttributes
	names  bool                 // WithKeyNames

	// Event instruments (see observer.go).
	acquisitions metric.Int64Counter
	wait         metric.Float64Histogram
	hold         metric.Float64Histogram
	lost         metric.Int64Counter
	held         metric.Int64UpDownCounter
	sets         eventSets

	// Locker instruments (see stats.go).
	conns       metric.Int64ObservableUpDownCounter
	queued      metric.Int64ObservableUpDownCounter
	usage       metric.Int64ObservableUpDownCounter
	limit       metric.Int64ObservableUpDownCounter
	utilization metric.Float64ObservableGauge
	statSets    statSets

	// Server lock-table instruments (see locktable.go).
	advisory metric.Int64ObservableUpDownCounter
	capacity metric.Int64ObservableUpDownCounter
	tableUse metric.Float64ObservableGauge
}

// New makes the instruments and returns an Instrumentation. Without options
// it uses the global MeterProvider and TracerProvider. An invalid option is
// an error matching [ErrInvalidOption]; an error of the MeterProvider is
// returned too.
func New(opts ...Option) (*Instrumentation, error) {
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	in := &Instrumentation{
		meter:  cfg.mp.Meter(ScopeName, metric.WithSchemaURL(semconv.SchemaURL)),
		tracer: cfg.tp.Tracer(ScopeName, trace.WithSchemaURL(semconv.SchemaURL)),
		extra:  cfg.attrs,
		names:  cfg.keyNames,
	}
	if err := errors.Join(in.newEventInstruments(), in.newStatInstruments(), in.newLockTableInstruments()); err != nil {
		return nil, err
	}
	in.sets = newEventSets(in.extra)
	in.statSets = newStatSets(in.extra)
	return in, nil
}

// Options returns the pglock options that instrument a Locker or a Lock:
// pglock.WithObserver([Instrumentation.Observer]) for the metrics and
// pglock.WithTracer([Instrumentation.Tracer]) for the spans. Options given
// after them override them: to have an observer of your own as well, call
// Observer from it.
func (in *Instrumentation) Options() []pglock.Option {
	return []pglock.Option{pglock.WithObserver(in.Observer()), pglock.WithTracer(in.Tracer())}
}
