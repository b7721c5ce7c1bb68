package otellock_test

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/otellock"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// telemetry is one test's OpenTelemetry SDK with in-memory exporters: a
// ManualReader for metrics and a SpanRecorder for spans.
type telemetry struct {
	reader *sdkmetric.ManualReader
	mp     *sdkmetric.MeterProvider
	spans  *tracetest.SpanRecorder
	tp     *sdktrace.TracerProvider
	inst   *otellock.Instrumentation
}

func newTelemetry(tb testing.TB, opts ...otellock.Option) *telemetry {
	tb.Helper()
	t := &telemetry{reader: sdkmetric.NewManualReader(), spans: tracetest.NewSpanRecorder()}
	t.mp = sdkmetric.NewMeterProvider(sdkmetric.WithReader(t.reader))
	t.tp = sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(t.spans))
	tb.Cleanup(func() {
		_ = t.mp.Shutdown(context.Background())
		_ = t.tp.Shutdown(context.Background())
	})
	inst, err := otellock.New(append([]otellock.Option{
		otellock.WithMeterProvider(t.mp), otellock.WithTracerProvider(t.tp),
	}, opts...)...)
	if err != nil {
		tb.Fatal(err)
	}
	t.inst = inst
	return t
}

// point is one data point of a collection, of any aggregation: value is a
// sum's or a gauge's; count and sum are a histogram's.
type point struct {
	metric string
	unit   string
	kind   string // "sum", "updown", "gauge", "histogram"
	attrs  attribute.Set
	value  float64
	count  uint64
	sum    float64
}

func (p point) attr(k string) (string, bool) {
	v, ok := p.attrs.Value(attribute.Key(k))
	if !ok {
		return "", false
	}
	return v.String(), true
}

func (p point) String() string {
	return fmt.Sprintf("%s{%s} value=%v count=%d", p.metric, p.attrs.Encoded(attribute.DefaultEncoder()), p.value, p.count)
}

// collect reads every data point of the otellock scope now.
func (t *telemetry) collect(tb testing.TB) []point {
	tb.Helper()
	var rm metricdata.ResourceMetrics
	if err := t.reader.Collect(context.Background(), &rm); err != nil {
		tb.Fatal(err)
	}
	var out []point
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name != otellock.ScopeName {
			tb.Errorf("unexpected scope %q", sm.Scope.Name)
			continue
		}
		for _, m := range sm.Metrics {
			base := point{metric: m.Name, unit: m.Unit}
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				base.kind = "sum"
				if !d.IsMonotonic {
					base.kind = "updown"
				}
				for _, dp := range d.DataPoints {
					p := base
					p.attrs, p.value = dp.Attributes, float64(dp.Value)
					out = append(out, p)
				}
			case metricdata.Gauge[float64]:
				base.kind = "gauge"
				for _, dp := range d.DataPoints {
					p := base
					p.attrs, p.value = dp.Attributes, dp.Value
					out = append(out, p)
				}
			case metricdata.Histogram[float64]:
				base.kind = "histogram"
				for _, dp := range d.DataPoints {
					p := base
					p.attrs, p.count, p.sum = dp.Attributes, dp.Count, dp.Sum
					out = append(out, p)
				}
			default:
				tb.Errorf("%s: unexpected aggregation %T", m.Name, m.Data)
			}
		}
	}
	return out
}

// named returns the points of one metric, in a stable order.
func named(points []point, name string) []point {
	var out []point
	for _, p := range points {
		if p.metric == name {
			out = append(out, p)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].attrs.Encoded(attribute.DefaultEncoder()) < out[j].attrs.Encoded(attribute.DefaultEncoder())
	})
	return out
}

// byAttr sums a metric's values (or a histogram's counts) by the value of
// attribute k ("" when a point lacks it).
func byAttr(points []point, name, k string) map[string]float64 {
	out := map[string]float64{}
	for _, p := range named(points, name) {
		v, _ := p.attr(k)
		if p.kind == "histogram" {
			out[v] += float64(p.count)
		} else {
			out[v] += p.value
		}
	}
	return out
}

// total sums a metric's values (or a histogram's counts).
func total(points []point, name string) float64 {
	var n float64
	for _, v := range byAttr(points, name, "") {
		n += v
	}
	return n
}

func dump(points []point) string {
	var b strings.Builder
	for _, p := range points {
		b.WriteString("\n\t" + p.String())
	}
	return b.String()
}

// spanAttr returns a span's attribute k.
func spanAttr(s sdktrace.ReadOnlySpan, k string) (attribute.Value, bool) {
	for _, kv := range s.Attributes() {
		if string(kv.Key) == k {
			return kv.Value, true
		}
	}
	return attribute.Value{}, false
}

// ownSpans returns the spans of the otellock scope, in the order they ended.
func (t *telemetry) ownSpans() []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
	for _, s := range t.spans.Ended() {
		if s.InstrumentationScope().Name == otellock.ScopeName {
			out = append(out, s)
		}
	}
	return out
}
