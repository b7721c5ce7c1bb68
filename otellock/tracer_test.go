package otellock_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/pglockkit/kit/otellock"
	"github.com/pglockkit/kit/pglock"
)

// The Tracer's spans, driven as pglock drives it, without a database: the
// name, the parent, the attributes (a pair key flagged), the outcome and the
// status of each way an operation ends.
func TestTracerSpans(t *testing.T) {
	t.Parallel()
	tel := newTelemetry(t, otellock.WithAttributes(attribute.String("pglock.locker", "jobs")))
	tr := tel.inst.Tracer()
	parentCtx, parent := tel.tp.Tracer("test").Start(context.Background(), "job")
	pair := pglock.Int32PairKey(1, 2)
	ops := []struct {
		op      pglock.TraceOp
		held    bool
		err     error
		outcome string
		errType string
		status  codes.Code
	}{
		{pglock.TraceOp{Name: "acquire", Key: pair}, true, nil, "acquired", "", codes.Unset},
		{pglock.TraceOp{Name: "trydo", Key: pair, Mode: pglock.Shared}, false, nil, "busy", "", codes.Unset},
		{pglock.TraceOp{Name: "do", Key: pair, Scope: pglock.Transaction}, true, errors.New("work failed"), "acquired", "_OTHER", codes.Error},
		{pglock.TraceOp{Name: "do", Key: pair}, true, fmt.Errorf("pglock: release key 1,2: %w", pglock.ErrLockLost), "acquired", "lock_lost", codes.Error},
		{pglock.TraceOp{Name: "acquire", Key: pair}, false, fmt.Errorf("%w: key 1,2: %w", pglock.ErrNotAcquired, context.DeadlineExceeded), "cancelled", "timeout", codes.Error},
		{pglock.TraceOp{Name: "acquire", Key: pair}, false, fmt.Errorf("%w: key 1,2: %w", pglock.ErrNotAcquired, pglock.ErrLockerClosed), "error", "locker_closed", codes.Error},
		{pglock.TraceOp{Name: "future", Key: pair}, true, nil, "acquired", "", codes.Unset},
	}
	for _, o := range ops {
		ctx, end := tr.Start(parentCtx, o.op)
		if !trace.SpanFromContext(ctx).SpanContext().IsValid() || trace.SpanFromContext(ctx) == trace.SpanFromContext(parentCtx) {
			t.Fatalf("%s: Start did not return the span's context", o.op.Name)
		}
		end(o.held, o.err)
	}
	parent.End()

	spans := tel.ownSpans()
	if len(spans) != len(ops) {
		t.Fatalf("%d spans, want %d", len(spans), len(ops))
	}
	for i, s := range spans {
		o := ops[i]
		if want := "pglock." + o.op.Name; s.Name() != want {
			t.Errorf("span %d: name %q, want %q", i, s.Name(), want)
		}
		if s.Parent().SpanID() != parent.SpanContext().SpanID() {
			t.Errorf("%s: not a child of the caller's span", s.Name())
		}
		want := map[string]string{
			"pglock.key":      fmt.Sprint(pair.Int64()),
			"pglock.key_pair": "true",
			"pglock.scope":    o.op.Scope.String(),
			"pglock.mode":     o.op.Mode.String(),
			"pglock.outcome":  o.outcome,
			"pglock.locker":   "jobs",
		}
		if o.errType != "" {
			want["error.type"] = o.errType
		}
		got := map[string]string{}
		for _, kv := range s.Attributes() {
			got[string(kv.Key)] = kv.Value.String()
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s (%d): attributes %v, want %v", s.Name(), i, got, want)
		}
		if s.Status().Code != o.status {
			t.Errorf("%s (%d): status %v, want %v", s.Name(), i, s.Status().Code, o.status)
		}
		if o.err != nil && s.Status().Description != o.err.Error() {
			t.Errorf("%s (%d): status description %q", s.Name(), i, s.Status().Description)
		}
	}
}

// With a TracerProvider that records nothing, the Tracer still returns a
// context and an end that may be called.
func TestTracerNoop(t *testing.T) {
	t.Parallel()
	inst, err := otellock.New(otellock.WithTracerProvider(noop.NewTracerProvider()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, end := inst.Tracer().Start(context.Background(), pglock.TraceOp{Name: "do"})
	if ctx == nil {
		t.Fatal("nil context")
	}
	end(false, errors.New("x"))
}

// A key's name is on spans only when WithKeyNames allows it.
func TestTracerKeyNames(t *testing.T) {
	t.Parallel()
	op := pglock.TraceOp{Name: "acquire", Key: pglock.Int64Key(7), KeyName: "http:customer-42"}
	for _, on := range []bool{false, true} {
		tel := newTelemetry(t, otellock.WithKeyNames(on))
		_, end := tel.inst.Tracer().Start(context.Background(), op)
		end(true, nil)
		spans := tel.ownSpans()
		if len(spans) != 1 {
			t.Fatalf("%d spans, want 1", len(spans))
		}
		var name string
		for _, kv := range spans[0].Attributes() {
			if kv.Key == "pglock.key_name" {
				name = kv.Value.AsString()
			}
		}
		if want := map[bool]string{false: "", true: op.KeyName}[on]; name != want {
			t.Errorf("WithKeyNames(%v): pglock.key_name %q, want %q", on, name, want)
		}
	}
}
