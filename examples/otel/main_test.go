package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/pglockkit/kit/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// The example takes its locks, prints their spans, each under its parent,
// and the pglock series of its own /metrics, as Prometheus reads them; make
// demo runs it.
func TestOtel(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), &out, pgtest.URL(t), ""); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	for _, want := range []string{
		"2 invoices sent; the report, held: TryDo ran false; a 50 ms wait: true",
		"spans, each under its parent:\n" +
			"  pglock.do pglock.key_name=otel-demo:invoice:1 pglock.outcome=acquired\n" +
			"    pglock.acquire pglock.key_name=otel-demo:invoice:1 pglock.outcome=acquired\n" +
			"    send invoice\n" +
			"  pglock.do pglock.key_name=otel-demo:invoice:2 pglock.outcome=acquired\n" +
			"    pglock.acquire pglock.key_name=otel-demo:invoice:2 pglock.outcome=acquired\n" +
			"    send invoice\n" +
			"  pglock.acquire pglock.key_name=otel-demo:report pglock.outcome=acquired\n" +
			"  pglock.trydo pglock.key_name=otel-demo:report pglock.outcome=busy\n" +
			"  pglock.acquire pglock.key_name=otel-demo:report pglock.outcome=cancelled error.type=timeout\n",
		`pglock_lock_acquisitions_total{pglock_mode="exclusive",pglock_outcome="acquired",pglock_scope="session"} 3`,
		`pglock_lock_acquisitions_total{pglock_mode="exclusive",pglock_outcome="busy",pglock_scope="session"} 1`,
		`pglock_lock_acquisitions_total{error_type="timeout",pglock_mode="exclusive",pglock_outcome="cancelled",pglock_scope="session"} 1`,
		`pglock_lock_held{pglock_mode="exclusive",pglock_scope="session"} 0`,
		`pglock_lock_hold_duration_seconds_count{pglock_mode="exclusive",pglock_scope="session"} 3`,
		`pglock_lock_wait_duration_seconds_count{pglock_mode="exclusive",pglock_outcome="acquired",pglock_scope="session"} 3`,
		`pglock_locker_connection_count{pglock_connection_type="lock"}`,
		"pglock_locker_queued 0",
		"pglock_locker_server_lock_usage 0",
		"pglock_locker_server_lock_limit ",
		"pglock_locker_server_lock_utilization_ratio 0",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}
