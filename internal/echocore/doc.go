// Package echocore is the middleware that packages echolock (Echo v4) and
// echo5lock (Echo v5) share: config validation and defaults, the choice of
// scope and mode, the request's run under pglock's Lock.Do or Lock.TryDo,
// the response held back in Transaction scope (package holdwriter), the
// Retry-After of busy answers, and the sorting of failures into the
// adapter's sentinel errors. It does not import Echo: each adapter
// describes its Echo major in a [Framework] (how to read and replace the
// request, how to hold its response back, how to make an HTTP error) and
// converts its Config into a [Config] over its context type.
//
// It is internal support, not an API: the adapters' doc comments are the
// promises, this package keeps them. Package httplock, the net/http twin,
// writes its answers instead of returning them and keeps its own flow.
package echocore
