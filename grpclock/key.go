package grpclock

import (
	"context"
	"errors"

	"google.golang.org/grpc/metadata"
)

// Keyer is implemented by request messages that name the entity a call
// works on. With no [WithKeyFunc], the interceptors lock the key that the
// request's LockKey returns; an empty key, or a request that is not a Keyer,
// means the call takes no lock.
//
// Add the method to a generated message in a file of your own next to the
// generated one (same package), so that protoc does not overwrite it:
//
//	// account_lockkey.go
//	package accountpb
//
//	func (r *TransferRequest) LockKey() string { return "account:" + r.GetFromAccountId() }
type Keyer interface {
	LockKey() string
}

// KeyFunc returns the lock key of a call: fullMethod is the call's method
// ("/package.Service/Method") and req its request message (for a stream, the
// first message the handler receives). ok false means the call takes no
// lock and runs as if the interceptor were not there. An error fails the
// call with codes.InvalidArgument; so does ok true with an empty key.
type KeyFunc func(ctx context.Context, fullMethod string, req any) (key string, ok bool, err error)

// StreamKeyFunc returns the lock key of a stream before its handler runs,
// from what is known then: the stream's context (its incoming metadata,
// peer, deadline) and its method. Its results mean what KeyFunc's do.
type StreamKeyFunc func(ctx context.Context, fullMethod string) (key string, ok bool, err error)

// messageKey is the default KeyFunc: the request's LockKey, if it has one.
func messageKey(_ context.Context, _ string, req any) (string, bool, error) {
	k, ok := req.(Keyer)
	if !ok {
		return "", false, nil
	}
	key := k.LockKey()
	return key, key != "", nil
}

// errEmptyKey is what a key function that returns ok with an empty key gets.
var errEmptyKey = errors.New("empty lock key")

// MetadataKey returns a StreamKeyFunc that reads the key from the stream's
// incoming metadata: the first value of the header name (case-insensitive,
// as gRPC metadata keys are). A stream without the header takes no lock.
// Use it with [WithStreamKeyFunc]; the client sets the header with
// metadata.AppendToOutgoingContext.
func MetadataKey(name string) StreamKeyFunc {
	return func(ctx context.Context, _ string) (string, bool, error) {
		vs := metadata.ValueFromIncomingContext(ctx, name)
		if len(vs) == 0 || vs[0] == "" {
			return "", false, nil
		}
		return vs[0], true, nil
	}
}
