package otellock_test

import (
	"context"
	"errors"
	"testing"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/pglockkit/kit/otellock"
	"github.com/pglockkit/kit/pglock"
)

// Bad configuration is an error, never a panic.
func TestNewInvalidOptions(t *testing.T) {
	t.Parallel()
	for name, opt := range map[string]otellock.Option{
		"nil option":            nil,
		"empty key":             otellock.WithAttributes(attribute.String("", "x")),
		"replaces pglock.scope": otellock.WithAttributes(attribute.String("pglock.scope", "x")),
		"replaces pglock.key":   otellock.WithAttributes(attribute.Int64("pglock.key", 1)),
		"replaces error.type":   otellock.WithAttributes(attribute.String("error.type", "x")),
	} {
		if inst, err := otellock.New(opt); !errors.Is(err, otellock.ErrInvalidOption) || inst != nil {
			t.Errorf("%s: New = %v, %v; want nil, ErrInvalidOption", name, inst, err)
		}
	}
	inst, err := otellock.New(otellock.WithMeterProvider(nil), otellock.WithTracerProvider(nil))
	if err != nil {
		t.Fatalf("nil providers (the globals): %v", err)
	}
	if reg, err := inst.RecordStats(nil); !errors.Is(err, otellock.ErrNilLocker) || reg != nil {
		t.Errorf("RecordStats(nil) = %v, %v; want nil, ErrNilLocker", reg, err)
	}
}

// Without WithMeterProvider and WithTracerProvider, New uses the global
// providers, as OpenTelemetry's instrumentation libraries do. (Not
// parallel: it sets the globals.)
func TestNewUsesGlobalProviders(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	spans := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	t.Cleanup(func() {
		_ = mp.Shutdown(context.Background())
		_ = tp.Shutdown(context.Background())
	})
	otel.SetMeterProvider(mp)
	otel.SetTracerProvider(tp)

	inst, err := otellock.New()
	if err != nil {
		t.Fatal(err)
	}
	inst.Observer()(pglock.Event{Kind: pglock.EventLost})
	_, end := inst.Tracer().Start(context.Background(), pglock.TraceOp{Name: "do"})
	end(true, nil)

	tel := &telemetry{reader: reader}
	if got := total(tel.collect(t), "pglock.lock.lost"); got != 1 {
		t.Errorf("lost = %v through the global MeterProvider, want 1", got)
	}
	if got := spans.Ended(); len(got) != 1 || got[0].Name() != "pglock.do" {
		t.Errorf("spans through the global TracerProvider: %v", names(got))
	}
}
