package otellock_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/otellock"
	"github.com/pglockkit/kit/pglock"
)

// BenchmarkAcquireRelease compares Acquire + Release of a Locker's Lock
// (lock connections, Session scope, an uncontended key, a cancellable
// context) with the instrumentation ("otel") and without it ("raw": the
// same pglock, uninstrumented), on one pool, on two keys. "sdk" records
// with OpenTelemetry's SDK: every span sampled and exported as it ends (to
// an exporter that drops it), every measurement aggregated (a ManualReader
// that is never read); "noop" uses no-op providers, the cost of the hooks
// alone. (The SDK's batch span processor, the usual production choice, also
// wakes its goroutine for every span; on a 2-core machine shared with the
// server that costs more than the recording itself.) The paired sub-benchmark alternates the two in
// one loop and reports otel/raw, the figure to trust on a shared machine
// (scripts/benchratio.awk). Run alone, each side also reports cpu-ns/op, the
// process's CPU time per operation (the server's is not in it), which swings
// less than wall time.
func BenchmarkAcquireRelease(b *testing.B) {
	for _, providers := range []struct {
		name string
		opts func(b *testing.B) []otellock.Option
	}{
		{"sdk", sdkProviders},
		{"noop", func(*testing.B) []otellock.Option {
			return []otellock.Option{
				otellock.WithMeterProvider(metricnoop.NewMeterProvider()),
				otellock.WithTracerProvider(tracenoop.NewTracerProvider()),
			}
		}},
	} {
		b.Run(providers.name, func(b *testing.B) {
			setup := func(b *testing.B) (instrumented, plain func()) {
				ctx, cancel := context.WithCancel(context.Background())
				b.Cleanup(cancel)
				pool := pgtest.Pool(b, 4)
				inst, err := otellock.New(providers.opts(b)...)
				if err != nil {
					b.Fatal(err)
				}
				withOtel := benchLocker(b, pool, inst.Options()...)
				without := benchLocker(b, pool)
				instrumented = acquireRelease(b, ctx, withOtel)
				plain = acquireRelease(b, ctx, without)
				instrumented() // open the lock connections before timing
				plain()
				return instrumented, plain
			}
			alone := func(b *testing.B, op func()) {
				b.ReportAllocs()
				cpu := locktest.CPUTime()
				for b.Loop() {
					op()
				}
				b.ReportMetric(float64(locktest.CPUTime()-cpu)/float64(b.N), "cpu-ns/op")
			}
			b.Run("otel", func(b *testing.B) {
				op, _ := setup(b)
				alone(b, op)
			})
			b.Run("raw", func(b *testing.B) {
				_, op := setup(b)
				alone(b, op)
			})
			b.Run("paired", func(b *testing.B) {
				instrumented, plain := setup(b)
				pgtest.Paired(b, "otel", instrumented, plain)
			})
		})
	}
}

// sdkProviders returns the SDK's providers, shut down when b ends: spans
// sampled and exported to nowhere as they end, metrics aggregated.
func sdkProviders(b *testing.B) []otellock.Option {
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
	tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()), sdktrace.WithSyncer(discard{}))
	b.Cleanup(func() {
		_ = tp.Shutdown(context.Background())
		_ = mp.Shutdown(context.Background())
	})
	return []otellock.Option{otellock.WithMeterProvider(mp), otellock.WithTracerProvider(tp)}
}

// BenchmarkHooks measures the instrumentation alone, without a database:
// what an Acquire + Release adds to the caller's CPU time with the SDK (see
// sdkProviders). "span" is one traced operation (Start and its end), "events"
// the two events of a hold (EventAcquired, EventReleased).
func BenchmarkHooks(b *testing.B) {
	inst, err := otellock.New(sdkProviders(b)...)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b.Run("span", func(b *testing.B) {
		tr := inst.Tracer()
		op := pglock.TraceOp{Name: "acquire", Key: pglock.Int64Key(42)}
		b.ReportAllocs()
		for b.Loop() {
			_, end := tr.Start(ctx, op)
			end(true, nil)
		}
	})
	b.Run("events", func(b *testing.B) {
		observe := inst.Observer()
		b.ReportAllocs()
		for b.Loop() {
			observe(pglock.Event{Kind: pglock.EventAcquired, Wait: time.Millisecond})
			observe(pglock.Event{Kind: pglock.EventReleased, Held: time.Millisecond})
		}
	})
}

// benchLocker returns a Locker on pool (it holds its locks on lock
// connections of its own), closed when b ends.
func benchLocker(b *testing.B, pool *pgxpool.Pool, opts ...pglock.Option) *pglock.Locker {
	lk, err := pglock.NewLocker(pool, opts...)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = lk.Close() })
	return lk
}

// acquireRelease returns one Acquire + Release of a fresh key's Lock.
func acquireRelease(b *testing.B, ctx context.Context, lk *pglock.Locker) func() {
	l, err := lk.NewLock(pgtest.UniqueKey(b))
	if err != nil {
		b.Fatal(err)
	}
	return func() {
		if err := l.Acquire(ctx); err != nil {
			b.Fatal(err)
		}
		if err := l.Release(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

// discard is a span exporter that drops every span.
type discard struct{}

func (discard) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error { return nil }
func (discard) Shutdown(context.Context) error                             { return nil }
