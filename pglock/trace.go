package pglock

import (
	"context"
	"fmt"
)

// Tracer traces a lock's blocking acquires and its Do and TryDo calls, for
// tracing systems (package otellock implements it with OpenTelemetry)
// without a dependency in pglock. Set it with [WithTracer].
type Tracer interface {
	// Start is called when an operation begins, with the caller's context.
	// The context it returns is used for the operation: for Do and TryDo it
	// is the parent of the function's context, so that the work's spans nest
	// under the operation's. end is called exactly once, when the operation
	// ends (for Do, after the release): held reports whether the lock was
	// taken (false for a TryDo that found it busy, with err nil), err is the
	// operation's error (for a panic in Do's function, an error that says
	// so; the panic goes on). Start and end must be quick and must not call
	// the Lock's methods.
	Start(ctx context.Context, op TraceOp) (_ context.Context, end func(held bool, err error))
}

// TraceOp describes an operation given to a [Tracer].
type TraceOp struct {
	// Name is "acquire" (a blocking Acquire, or Do's wait for the lock),
	// "do" or "trydo".
	Name string
	// Key, Scope and Mode are the lock's.
	Key   Key
	Scope Scope
	Mode  Mode
	// KeyName is the name the key was hashed from (see [Lock.Name]); it may
	// carry user data.
	KeyName string
}

// WithTracer sets a Tracer for the lock's blocking acquires, Dos and
// TryDos. The default is nil: nothing is traced, at no cost.
func WithTracer(t Tracer) Option {
	return func(c *config) { c.tracer = t }
}

// trace starts an operation of the lock's Tracer. Without one it returns ctx
// and a nil end.
func (l *Lock) trace(ctx context.Context, name string) (context.Context, func(bool, error)) {
	if l.cfg.tracer == nil || ctx == nil {
		return ctx, nil
	}
	tctx, end := l.cfg.tracer.Start(ctx, TraceOp{Name: name, Key: l.key, Scope: l.cfg.scope, Mode: l.cfg.mode, KeyName: l.name})
	if tctx == nil {
		tctx = ctx
	}
	return tctx, end
}

// endTraced ends a traced Do or TryDo from a deferred call: a panic of fn
// ends the operation with an error that says so, and goes on.
func endTraced(end func(bool, error), held *bool, err *error) {
	if v := recover(); v != nil {
		end(*held, fmt.Errorf("pglock: panic in the locked function: %v", v))
		panic(v)
	}
	end(*held, *err)
}
