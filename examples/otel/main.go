// Command otel shows otellock: a Locker's locks recorded with
// OpenTelemetry, as spans and as metrics exported for Prometheus. It takes a
// few locks (two invoices sent, a report found busy, a wait that times out),
// prints the spans they made, each under its parent, then scrapes its own
// /metrics and prints the pglock series. With -listen it goes on serving
// /metrics there until interrupted, for a Prometheus to scrape. It runs
// against DATABASE_URL (make demo finds or starts a server).
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/signal"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel"
	otelprometheus "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/pglockkit/kit/otellock"
	"github.com/pglockkit/kit/pglock"
)

func main() {
	listen := flag.String("listen", "", "after the demo, serve /metrics on this address (such as 127.0.0.1:9464) until interrupted")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Stdout, os.Getenv("DATABASE_URL"), *listen); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, w io.Writer, url, listen string) error {
	// The program's OpenTelemetry setup: a MeterProvider whose reader is
	// the Prometheus exporter and a TracerProvider whose spans a recorder
	// keeps (standing in for an exporter, so that the program can print
	// them), both made the global ones. otellock.New uses the global
	// providers.
	registry := prometheus.NewRegistry()
	exporter, err := otelprometheus.New(otelprometheus.WithRegisterer(registry),
		otelprometheus.WithoutScopeInfo()) // shorter lines for the demo
	if err != nil {
		return err
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter))
	defer mp.Shutdown(context.WithoutCancel(ctx))
	otel.SetMeterProvider(mp)
	spans := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	defer tp.Shutdown(context.WithoutCancel(ctx))
	otel.SetTracerProvider(tp)

	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return err
	}
	defer pool.Close()
	// Key names on spans, which are off by default (names often carry
	// customer identifiers); these are not secret, and easier to read.
	inst, err := otellock.New(otellock.WithKeyNames(true))
	if err != nil {
		return err
	}
	locker, err := pglock.NewLocker(pool, inst.Options()...)
	if err != nil {
		return err
	}
	defer locker.Close()
	stats, err := inst.RecordStats(locker)
	if err != nil {
		return err
	}
	defer stats.Unregister()

	if err := takeLocks(ctx, w, locker); err != nil {
		return err
	}
	printSpans(w, spans.Ended())

	metrics := promhttp.HandlerFor(registry, promhttp.HandlerOpts{})
	srv := httptest.NewServer(metrics)
	defer srv.Close()
	if err := printSeries(ctx, w, srv.URL); err != nil {
		return err
	}
	if listen == "" {
		return nil
	}
	fmt.Fprintf(w, "serving /metrics on http://%s/metrics until interrupted\n", listen)
	hs := &http.Server{Addr: listen, Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(rw, r)
			return
		}
		metrics.ServeHTTP(rw, r)
	}), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		_ = hs.Close()
	}()
	if err := hs.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// takeLocks sends two invoices under their locks (the sending, a span of the
// program's own, nests under the lock's), then, while a report's lock is
// held, tries it (busy) and waits 50 ms for it (timed out).
func takeLocks(ctx context.Context, w io.Writer, locker *pglock.Locker) error {
	tracer := otel.Tracer("github.com/pglockkit/kit/examples/otel")
	for _, invoice := range []string{"otel-demo:invoice:1", "otel-demo:invoice:2"} {
		err := locker.Do(ctx, invoice, func(ctx context.Context) error {
			_, send := tracer.Start(ctx, "send invoice")
			defer send.End()
			return nil
		})
		if err != nil {
			return err
		}
	}
	report, err := locker.NewLock("otel-demo:report")
	if err != nil {
		return err
	}
	if err := report.Acquire(ctx); err != nil {
		return err
	}
	defer report.Release(ctx)
	ran, err := locker.TryDo(ctx, "otel-demo:report", func(ctx context.Context) error { return nil })
	if err != nil {
		return err
	}
	second, err := locker.NewLock("otel-demo:report")
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	werr := second.Acquire(wctx)
	fmt.Fprintf(w, "2 invoices sent; the report, held: TryDo ran %v; a 50 ms wait: %v\n",
		ran, errors.Is(werr, context.DeadlineExceeded))
	return report.Release(ctx)
}

// printSpans prints the ended spans as a tracing backend shows them: each
// under its parent, in the order they started, with the key's name and the
// outcome that otellock records.
func printSpans(w io.Writer, ended []sdktrace.ReadOnlySpan) {
	recorded := map[string]bool{}
	for _, s := range ended {
		recorded[s.SpanContext().SpanID().String()] = true
	}
	children := map[string][]sdktrace.ReadOnlySpan{} // by parent span ID; "" for the roots
	for _, s := range ended {
		parent := s.Parent().SpanID().String()
		if !recorded[parent] {
			parent = ""
		}
		children[parent] = append(children[parent], s)
	}
	fmt.Fprintln(w, "spans, each under its parent:")
	var walk func(parent string, depth int)
	walk = func(parent string, depth int) {
		list := children[parent]
		slices.SortStableFunc(list, func(a, b sdktrace.ReadOnlySpan) int { return a.StartTime().Compare(b.StartTime()) })
		for _, s := range list {
			line := strings.Repeat("  ", depth+1) + s.Name()
			for _, a := range s.Attributes() {
				switch a.Key {
				case "pglock.key_name", "pglock.outcome", "error.type":
					line += " " + string(a.Key) + "=" + a.Value.String()
				}
			}
			fmt.Fprintln(w, line)
			walk(s.SpanContext().SpanID().String(), depth+1)
		}
	}
	walk("", 0)
}

// printSeries scrapes url and prints the pglock series (no histogram
// buckets), sorted.
func printSeries(ctx context.Context, w io.Writer, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var lines []string
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "pglock_") && !strings.Contains(l, "_bucket{") {
			lines = append(lines, l)
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	sort.Strings(lines)
	fmt.Fprintln(w, "GET /metrics, the pglock series:")
	for _, l := range lines {
		fmt.Fprintln(w, "  "+l)
	}
	return nil
}
