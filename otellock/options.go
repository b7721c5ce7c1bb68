package otellock

import (
	"errors"
	"fmt"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

var (
	// ErrInvalidOption is returned by [New] for an option it cannot use: a
	// nil Option, an attribute with an empty key, or one that would replace
	// an attribute this package sets (pglock.scope, pglock.mode,
	// pglock.outcome, pglock.key, pglock.key_pair, pglock.key_name, pglock.connection.type,
	// error.type).
	ErrInvalidOption = errors.New("otellock: invalid option")

	// ErrNilLocker is returned by [Instrumentation.RecordStats] for a nil
	// *pglock.Locker.
	ErrNilLocker = errors.New("otellock: nil *pglock.Locker")
)

// Option configures [New].
type Option func(*config)

type config struct {
	mp       metric.MeterProvider
	tp       trace.TracerProvider
	attrs    []attribute.KeyValue
	keyNames bool
}

// WithMeterProvider sets the MeterProvider that makes the instruments. nil
// (the default) means the global one, otel.GetMeterProvider(), as it is when
// New is called (the global provider forwards to one set later).
func WithMeterProvider(mp metric.MeterProvider) Option {
	return func(c *config) { c.mp = mp }
}

// WithTracerProvider sets the TracerProvider that makes the spans. nil (the
// default) means the global one, otel.GetTracerProvider(), as it is when New
// is called (the global provider forwards to one set later).
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(c *config) { c.tp = tp }
}

// WithAttributes adds attributes to every measurement and span, for example
// to tell two Lockers of one process apart:
// attribute.String("pglock.locker", "jobs"). Keep them few and of low
// cardinality: every distinct set is a time series. The default is none.
// Given more than once, the attributes add up.
func WithAttributes(attrs ...attribute.KeyValue) Option {
	return func(c *config) { c.attrs = append(c.attrs, attrs...) }
}

// WithKeyNames records, on spans only, the name a lock's key was hashed
// from (pglock.Lock.Name, namespace included) as pglock.key_name. Off by
// default: names often carry customer or tenant identifiers, which traces
// should not hold unless you decide they may. Never on metrics (one series
// per name would be unbounded).
func WithKeyNames(on bool) Option {
	return func(c *config) { c.keyNames = on }
}

func newConfig(opts []Option) (*config, error) {
	c := &config{}
	for _, o := range opts {
		if o == nil {
			return nil, fmt.Errorf("%w: nil Option", ErrInvalidOption)
		}
		o(c)
	}
	if c.mp == nil {
		c.mp = otel.GetMeterProvider()
	}
	if c.tp == nil {
		c.tp = otel.GetTracerProvider()
	}
	for _, a := range c.attrs {
		if !a.Valid() {
			return nil, fmt.Errorf("%w: an attribute with an empty key", ErrInvalidOption)
		}
		if ownKey(a.Key) {
			return nil, fmt.Errorf("%w: attribute %q is set by otellock itself", ErrInvalidOption, a.Key)
		}
	}
	return c, nil
}
