package lockconn

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// SetBatch gathers the tries (or the unlocks) of one key set on the lock
// connections: a request of the set that finds its lock connection free
// waits there (lingers), as its owner, until every other request of the
// set is queued on a lock connection or has ended without one, for at most
// setLinger, so that the set's requests share statements instead of the
// first going alone.
type SetBatch struct {
	pending atomic.Int32 // tries of the set not yet queued or ended
	ready   chan struct{}
}

// NewSetBatch returns the batch of a key set of n requests.
func NewSetBatch(n int) *SetBatch {
	b := &SetBatch{ready: make(chan struct{})}
	b.pending.Store(int32(n))
	return b
}

// setLinger bounds how long a try of a key set lingers for the others.
const setLinger = time.Millisecond

// SetMember is one try of a SetBatch; it arrives once.
type SetMember struct {
	b    *SetBatch
	once sync.Once
}

// Member returns a new member of b: one request of the set.
func (b *SetBatch) Member() *SetMember { return &SetMember{b: b} }

// setMemberKey is the context key of a try's SetMember.
type setMemberKey struct{}

// WithSetMember returns a context that says its request is m (see
// SetMemberOf).
func WithSetMember(ctx context.Context, m *SetMember) context.Context {
	return context.WithValue(ctx, setMemberKey{}, m)
}

// setMember returns the key-set request that o is, or nil.
func (o *Op) setMember() *SetMember {
	if !o.isRequest() {
		return nil
	}
	if o.Member != nil {
		return o.Member
	}
	return SetMemberOf(o.Ctx)
}

// SetMemberOf returns the key-set request that ctx is the context of, or
// nil.
func SetMemberOf(ctx context.Context) *SetMember {
	if ctx == nil {
		return nil
	}
	m, _ := ctx.Value(setMemberKey{}).(*SetMember)
	return m
}

// Arrive counts m as queued (or ended); it reports whether every try of
// the set has arrived. Safe on a nil m.
func (m *SetMember) Arrive() bool {
	if m == nil {
		return true
	}
	m.once.Do(func() {
		if m.b.pending.Add(-1) == 0 {
			close(m.b.ready)
		}
	})
	return m.b.pending.Load() == 0
}

// linger waits until every try of m's set has arrived, or setLinger.
func (m *SetMember) linger() {
	t := time.NewTimer(setLinger)
	defer t.Stop()
	select {
	case <-m.b.ready:
	case <-t.C:
	}
}
