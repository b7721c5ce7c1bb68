package otellock

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/pglockkit/kit/pglock"
)

// Tracer returns the pglock.Tracer that makes a span of each blocking
// Acquire ("pglock.acquire"), Do ("pglock.do", with Do's wait for the lock
// as its child "pglock.acquire") and TryDo ("pglock.trydo"): give it to
// pglock.WithTracer (Options does). TryAcquire makes no span.
//
// Each span is a child of the span in the caller's context (the request's,
// the job's, the call's: adapters pass theirs to Locker.Do), and the
// function given to Do or TryDo runs in the span's context, so that the
// work's spans are its children. A span has the attributes pglock.scope,
// pglock.mode and pglock.key (the key's int64, see pglock.Key.Int64, and
// pglock.key_pair true for a pair key; the key's name only with
// WithKeyNames), those of WithAttributes, and, when it ends,
// pglock.outcome (acquired, busy, cancelled or error: whether the lock was
// taken). An operation that returns an error (for Do, the function's error
// too) sets error.type, records the error and sets the span's status to
// Error; a busy TryDo is not an error.
func (in *Instrumentation) Tracer() pglock.Tracer {
	return (*tracer)(in)
}

type tracer Instrumentation

func spanName(op string) string {
	switch op {
	case "acquire":
		return "pglock.acquire"
	case "do":
		return "pglock.do"
	case "trydo":
		return "pglock.trydo"
	}
	return "pglock." + op
}

// Start implements pglock.Tracer.
func (t *tracer) Start(ctx context.Context, op pglock.TraceOp) (context.Context, func(held bool, err error)) {
	attrs := make([]attribute.KeyValue, 0, 4+len(t.extra))
	attrs = append(attrs,
		scopeKey.String(op.Scope.String()),
		modeKey.String(op.Mode.String()),
		keyKey.Int64(op.Key.Int64()))
	if op.Key.IsPair() {
		attrs = append(attrs, keyPairKey.Bool(true))
	}
	if t.names && op.KeyName != "" {
		attrs = append(attrs, keyNameKey.String(op.KeyName))
	}
	attrs = append(attrs, t.extra...)
	ctx, span := t.tracer.Start(ctx, spanName(op.Name),
		trace.WithSpanKind(trace.SpanKindInternal), trace.WithAttributes(attrs...))
	return ctx, func(held bool, err error) {
		if span.IsRecording() {
			span.SetAttributes(outcomeKey.String(outcome(held, err)))
			if err != nil {
				span.SetAttributes(errorTypeKey.String(errorType(err)))
				span.RecordError(err)
				span.SetStatus(codes.Error, err.Error())
			}
		}
		span.End()
	}
}
