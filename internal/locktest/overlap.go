package locktest

import "sync/atomic"

// Overlap counts the calls running at once (between Enter and Leave) and
// remembers the most seen. Its zero value is ready to use.
type Overlap struct{ cur, max atomic.Int64 }

// Enter counts one more call running.
func (o *Overlap) Enter() {
	n := o.cur.Add(1)
	for {
		m := o.max.Load()
		if n <= m || o.max.CompareAndSwap(m, n) {
			return
		}
	}
}

// Leave counts one call fewer.
func (o *Overlap) Leave() { o.cur.Add(-1) }

// Now returns how many calls are running.
func (o *Overlap) Now() int64 { return o.cur.Load() }

// Max returns the most calls that ran at once.
func (o *Overlap) Max() int64 { return o.max.Load() }
