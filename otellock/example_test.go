package otellock_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"os"
	"sort"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/pglockkit/kit/otellock"
	"github.com/pglockkit/kit/pglock"
)

func examplePool() *pgxpool.Pool {
	pool, err := pgxpool.New(context.Background(), os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	return pool
}

// A Locker instrumented with OpenTelemetry. A program sets its providers
// once (otel.SetMeterProvider) and calls otellock.New() without options;
// here a ManualReader stands in for an exporter, so that the example can
// print what was recorded.
func Example() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer mp.Shutdown(ctx)

	inst, err := otellock.New(otellock.WithMeterProvider(mp))
	if err != nil {
		log.Fatal(err)
	}
	locker, err := pglock.NewLocker(pool, inst.Options()...)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	stats, err := inst.RecordStats(locker) // the Locker's gauges
	if err != nil {
		log.Fatal(err)
	}
	defer stats.Unregister()
	table, err := inst.RecordLockTable(pool, 0) // the server's lock table
	if err != nil {
		log.Fatal(err)
	}
	defer table.Unregister()

	err = locker.Do(ctx, "example:otel:invoice:42", func(ctx context.Context) error {
		return nil // send the invoice
	})
	if err != nil {
		log.Fatal(err)
	}
	printMetrics(reader, "pglock.lock.acquisitions", "pglock.lock.hold.duration", "pglock.lock.held", "pglock.locker.server_lock.usage")
	// Output:
	// pglock.lock.acquisitions {pglock.mode=exclusive,pglock.outcome=acquired,pglock.scope=session}: 1
	// pglock.lock.held {pglock.mode=exclusive,pglock.scope=session}: 0
	// pglock.lock.hold.duration {pglock.mode=exclusive,pglock.scope=session}: count 1
	// pglock.locker.server_lock.usage {}: 0
}

// A lock's spans nest under the span of the request (or job, or call) whose
// context is given to Do, and the work's spans nest under the lock's.
// Adapters such as httplock pass the request's context.
func ExampleInstrumentation_Tracer() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()
	spans := tracetest.NewSpanRecorder() // stands in for an exporter
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	defer tp.Shutdown(ctx)
	tracer := tp.Tracer("example")

	inst, err := otellock.New(otellock.WithTracerProvider(tp))
	if err != nil {
		log.Fatal(err)
	}
	locker, err := pglock.NewLocker(pool, inst.Options()...)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()

	ctx, request := tracer.Start(ctx, "POST /orders/{id}/pay") // an HTTP instrumentation's span
	err = locker.Do(ctx, "example:otel:order:42", func(ctx context.Context) error {
		_, charge := tracer.Start(ctx, "charge")
		defer charge.End()
		return nil
	})
	request.End()
	if err != nil {
		log.Fatal(err)
	}

	name := map[string]string{}
	for _, s := range spans.Ended() {
		name[s.SpanContext().SpanID().String()] = s.Name()
	}
	for _, s := range spans.Ended() {
		if parent, ok := name[s.Parent().SpanID().String()]; ok {
			fmt.Printf("%s, in %s\n", s.Name(), parent)
		} else {
			fmt.Println(s.Name())
		}
	}
	// Output:
	// pglock.acquire, in pglock.do
	// charge, in pglock.do
	// pglock.do, in POST /orders/{id}/pay
	// POST /orders/{id}/pay
}

// An observer of your own beside OpenTelemetry's: pglock.WithObserver takes
// one function, so it calls the Instrumentation's. Events come
// synchronously, and EventLost from the goroutine that watches the
// connection: alert from it, quickly.
func ExampleInstrumentation_Observer() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()

	inst, err := otellock.New() // the global providers
	if err != nil {
		log.Fatal(err)
	}
	otelEvents := inst.Observer()
	locker, err := pglock.NewLocker(pool, pglock.WithTracer(inst.Tracer()),
		pglock.WithObserver(func(ev pglock.Event) {
			otelEvents(ev)
			if ev.Kind == pglock.EventLost {
				slog.Warn("lock lost: its work may overlap another holder's", "key", ev.Key, "held", ev.Held, "error", ev.Err)
			}
			fmt.Println("event:", ev.Kind)
		}))
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	if err := locker.Do(ctx, "example:otel:report", func(ctx context.Context) error { return nil }); err != nil {
		log.Fatal(err)
	}
	// Output:
	// event: acquired
	// event: released
}

// Options are pglock options: they go with pglock's own, here a logger that
// logs acquires and releases at Debug level and lost locks at Warn.
func ExampleInstrumentation_Options() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()
	inst, err := otellock.New()
	if err != nil {
		log.Fatal(err)
	}

	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		Level:       slog.LevelDebug,
		ReplaceAttr: withoutTimes, // for the example's output only
	}))
	locker, err := pglock.NewLocker(pool, append(inst.Options(), pglock.WithLogger(logger))...)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	if err := locker.Do(ctx, "example:otel:export", func(ctx context.Context) error { return nil }); err != nil {
		log.Fatal(err)
	}
	// Output:
	// level=DEBUG msg="pglock: acquired" key=5786633177593900409 scope=session mode=exclusive
	// level=DEBUG msg="pglock: released" key=5786633177593900409 scope=session mode=exclusive
}

// withoutTimes drops the attributes that change from run to run.
func withoutTimes(groups []string, a slog.Attr) slog.Attr {
	switch a.Key {
	case slog.TimeKey, "wait", "held":
		return slog.Attr{}
	}
	return a
}

// printMetrics prints the data points of the named metrics: a sum's or
// gauge's value, a histogram's count.
func printMetrics(reader *sdkmetric.ManualReader, names ...string) {
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		log.Fatal(err)
	}
	var lines []string
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if !contains(names, m.Name) {
				continue
			}
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, dp := range d.DataPoints {
					lines = append(lines, fmt.Sprintf("%s {%s}: %d", m.Name, dp.Attributes.Encoded(attribute.DefaultEncoder()), dp.Value))
				}
			case metricdata.Histogram[float64]:
				for _, dp := range d.DataPoints {
					lines = append(lines, fmt.Sprintf("%s {%s}: count %d", m.Name, dp.Attributes.Encoded(attribute.DefaultEncoder()), dp.Count))
				}
			}
		}
	}
	sort.Strings(lines)
	for _, l := range lines {
		fmt.Println(l)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
