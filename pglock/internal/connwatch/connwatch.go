// Package connwatch watches the connections that hold pglock's locks, so
// that a lock whose connection dies, or goes silent, is known lost soon: a
// blocked read on an idle connection (a server that closes it is noticed at
// once), a ping after each quiet interval (a silent one within two), and,
// for a connection the protected work uses meanwhile (a lock's own
// transaction), a look at the kernel's socket every interval. Each starts
// after Delay: most holds end sooner and never pay for a goroutine. It does
// not import pglock: pglock imports it.
package connwatch

import (
	"context"
	"errors"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// rewatches are the rewatches of holds on pool connections of their own
// (pgxBackend.watch), stopped and kept for the next hold.
var rewatches = sync.Pool{New: func() any {
	r := new(Rewatch)
	r.StopFn = r.Stop
	return r
}}

// PutRewatch stops r and keeps it for another hold, forgetting its
// connection and its hold.
func PutRewatch(r *Rewatch) {
	r.Stop()
	r.w.mu.Lock()
	r.w.conn, r.w.nc, r.w.lost, r.w.ping = nil, nil, nil, nil
	r.w.mu.Unlock()
	rewatches.Put(r)
}

// Delay is how long a hold lasts before its connection is watched: most
// holds (a request, a job step) end sooner and never pay for a goroutine and
// a blocked read. A connection that dies during the delay is noticed when the
// watch starts.
const Delay = 50 * time.Millisecond

// After runs run in its own goroutine after delay. The returned function
// cancels it if it has not started, else interrupts it, and waits for it.
func After(delay time.Duration, run, interrupt func()) func() {
	var wg sync.WaitGroup
	wg.Add(1)
	t := time.AfterFunc(delay, func() {
		defer wg.Done()
		run()
	})
	return func() {
		if t.Stop() {
			wg.Done()
		} else {
			interrupt()
		}
		wg.Wait()
	}
}

// Conn watches an idle pinned connection. It blocks reading from it, so
// that a connection the server closes (pg_terminate_backend, shutdown) is
// noticed at once; after each quiet interval it pings, so that a connection
// that went silent is noticed within two intervals.
type Conn struct {
	interval time.Duration
	lost     func(error)
	// ping is the ping after a quiet interval (nil: conn.Ping).
	ping func(ctx context.Context) error

	mu       sync.Mutex
	conn     *pgx.Conn
	nc       net.Conn
	reading  bool
	stopping bool
}

func (w *Conn) Attach(conn *pgx.Conn) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.conn, w.nc = conn, conn.PgConn().Conn()
}

// run watches until stop is called or the connection dies.
func (w *Conn) Run() {
	for {
		w.mu.Lock()
		if w.stopping {
			w.mu.Unlock()
			return
		}
		w.reading = true
		// Both: the write side may keep the deadline of a lock connection's
		// last statement (lockconn's Conn.exec leaves it).
		_ = w.nc.SetDeadline(time.Now().Add(w.interval))
		w.mu.Unlock()

		// No context: the read deadline above bounds the wait, and a timeout
		// leaves the connection usable.
		err := w.conn.PgConn().WaitForNotification(context.Background())

		w.mu.Lock()
		w.reading = false
		_ = w.nc.SetDeadline(time.Time{})
		stopping := w.stopping
		w.mu.Unlock()

		var netErr net.Error
		timedOut := errors.As(err, &netErr) && netErr.Timeout()
		switch {
		case err != nil && !timedOut:
			w.lost(err)
			return
		case stopping:
			return
		case err == nil:
			continue // a notification: not ours to handle
		}
		ctx, cancel := context.WithTimeout(context.Background(), w.interval)
		if w.ping != nil {
			err = w.ping(ctx)
		} else {
			err = w.conn.Ping(ctx)
		}
		cancel()
		if err != nil {
			w.lost(err)
			return
		}
	}
}

// stop asks run to return soon: it interrupts a blocked read.
func (w *Conn) Stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stopping = true
	if w.reading {
		_ = w.nc.SetReadDeadline(time.Now())
	}
}

// delayed runs a watch after a delay, armed and stopped many times (a lock
// connection used and left idle, holds of one Lock, or of Locks that take
// it from a pool): its timer and wait group are reused, so that arming it
// costs no allocation. Not safe for concurrent use: the goroutine that owns
// the connection arms and stops it. run and interrupt (which asks run to
// return soon) are set before the first arm.
//
// Arming and stopping leave the timer alone when they can: a stop leaves it
// set, and an arm that finds it set to fire by its own start keeps it; the
// timer's function then looks at what is armed now, sets itself again for
// the rest of the delay or does nothing. Setting a timer can wake the
// runtime's network poller (a thread, a system call); a connection used
// many times a second would pay that on every use, where this pays it about
// once per delay.
type delayed struct {
	run, interrupt func()

	t  *time.Timer
	wg sync.WaitGroup // counts a run under way

	mu sync.Mutex
	// armed: armed and not stopped since; run starts at due.
	armed bool
	due   time.Time
	// pending: t is set to call fire, at fireAt at the latest. (It may be
	// set while pending is false, never the other way round.)
	pending bool
	fireAt  time.Time
	// started: run started for this arm (it runs once per arm, however
	// many times the timer fires).
	started bool
}

// arm starts run after delay, unless stop comes first. The last arm must
// have been stopped.
func (d *delayed) arm(delay time.Duration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.armed, d.due, d.started = true, time.Now().Add(delay), false
	if d.pending && !d.fireAt.After(d.due) {
		return // it fires by then, and sets itself again for the rest
	}
	d.pending, d.fireAt = true, d.due
	if d.t == nil {
		d.t = time.AfterFunc(delay, d.fire)
		return
	}
	d.t.Reset(delay)
}

// fire is the timer's function: it runs the armed watch when it is due.
func (d *delayed) fire() {
	d.mu.Lock()
	switch {
	case d.started:
		// A second call (arm set the timer again as it fired): the watch
		// is under way, or ran.
		d.mu.Unlock()
		return
	case !d.armed:
		d.pending = false
		d.mu.Unlock()
		return
	}
	if rest := time.Until(d.due); rest > 0 {
		// Armed again since the timer was set: the rest of the delay.
		d.pending, d.fireAt = true, d.due
		d.t.Reset(rest)
		d.mu.Unlock()
		return
	}
	d.pending, d.started = false, true
	d.wg.Add(1)
	d.mu.Unlock()
	defer d.wg.Done()
	d.run()
}

// stop ends the watch, if armed: a run under way is interrupted and waited
// for; one not started never starts.
func (d *delayed) stop() {
	d.mu.Lock()
	if !d.armed {
		d.mu.Unlock()
		return
	}
	d.armed = false
	started := d.started
	d.mu.Unlock()
	if started {
		d.interrupt() // nothing to interrupt if it returned already
	}
	d.wg.Wait()
}

// Rewatch is a Conn armed and stopped many times (see delayed), as a
// lock connection is used and left idle, or as holds on pool connections of
// their own come and go. Like After, it starts watching after
// Delay (or the interval, if shorter). Its zero value is ready.
type Rewatch struct {
	w Conn
	d delayed
	// StopFn is stop, for the holds that hand it out (pgxBackend.watch).
	StopFn func()
}

// arm starts watching conn after the delay; lost is called if it dies.
// ping, if not nil, replaces conn.Ping. The watch of the last arm must be
// stopped.
func (r *Rewatch) Arm(conn *pgx.Conn, interval time.Duration, lost func(error), ping func(context.Context) error) {
	r.w.mu.Lock()
	r.w.interval, r.w.lost, r.w.ping = interval, lost, ping
	r.w.conn, r.w.nc, r.w.stopping = conn, conn.PgConn().Conn(), false
	r.w.mu.Unlock()
	if r.d.run == nil {
		r.d.run, r.d.interrupt = r.w.Run, r.w.Stop
	}
	r.d.arm(min(Delay, interval))
}

// stop ends the watch, if armed, and waits for it.
func (r *Rewatch) Stop() { r.d.stop() }

// ErrPeerClosed is the loss a peer watch reports.
var ErrPeerClosed = errors.New("pglock: the server closed the connection")

// Peer watches the connection of a hold in the lock's own transaction,
// which the protected work uses meanwhile: it never reads or writes on it
// (that would take the work's replies), but asks the kernel every interval
// whether the server has closed it (as it does when it ends the session of a
// frozen holder: see AbandonedTransactionTimeout), and calls lost if so. A
// process resumed after a freeze checks at once: the ticker is overdue.
// Where the kernel cannot tell (see peerClosed), the watch ends at its
// start. Like the other watches it starts after Delay, so that a short
// hold pays no system call.
func Peer(nc net.Conn, interval time.Duration, lost func(error)) func() {
	stop := make(chan struct{})
	return After(min(Delay, interval), func() {
		runPeer(nc, interval, lost, stop)
	}, func() { close(stop) })
}

// runPeer is the watch of Peer, until stop is closed.
func runPeer(nc net.Conn, interval time.Duration, lost func(error), stop <-chan struct{}) {
	if tc, ok := nc.(interface{ NetConn() net.Conn }); ok {
		nc = tc.NetConn()
	}
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		closed, ok := peerClosed(rc)
		if !ok {
			return
		}
		if closed {
			select {
			case <-stop: // the hold ended first: not a loss
			default:
				lost(ErrPeerClosed)
			}
			return
		}
		select {
		case <-stop:
			return
		case <-t.C:
		}
	}
}

// PeerWatch is Peer armed and stopped many times (see delayed), for
// the holds of Locks in their own transactions on pool connections
// (pgxBackend.watch), which take one from a pool of them and give it back
// when they end (Lock.dropHold): a short hold costs no allocation.
type PeerWatch struct {
	d delayed

	// Set by arm, read by run (the delayed's mutex orders them).
	nc       net.Conn
	interval time.Duration
	lost     func(error)

	mu       sync.Mutex
	stopCh   chan struct{} // closed by interrupt; made again by the next arm
	stopDone bool

	StopFn func() // stop, for the holds that hand it out
}

// arm starts watching nc after the delay; lost is called if the server
// closes it.
func (p *PeerWatch) Arm(nc net.Conn, interval time.Duration, lost func(error)) {
	p.nc, p.interval, p.lost = nc, interval, lost
	p.mu.Lock()
	if p.stopCh == nil || p.stopDone {
		p.stopCh, p.stopDone = make(chan struct{}), false
	}
	p.mu.Unlock()
	p.d.arm(min(Delay, interval))
}

func (p *PeerWatch) run() {
	p.mu.Lock()
	stop := p.stopCh
	p.mu.Unlock()
	runPeer(p.nc, p.interval, p.lost, stop)
}

func (p *PeerWatch) interrupt() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.stopDone {
		close(p.stopCh)
		p.stopDone = true
	}
}

// stop ends the watch, if armed, and waits for it.
func (p *PeerWatch) Stop() { p.d.stop() }

// peerWatches are the peer watches of holds in their own transactions on
// pool connections, stopped and kept for the next hold.
var peerWatches = sync.Pool{New: func() any {
	p := new(PeerWatch)
	p.d.run, p.d.interrupt, p.StopFn = p.run, p.interrupt, p.Stop
	return p
}}

// PutPeerWatch stops p and keeps it for another hold, forgetting its
// connection and its hold.
func PutPeerWatch(p *PeerWatch) {
	p.Stop()
	p.nc, p.lost = nil, nil
	peerWatches.Put(p)
}

// NewConn returns a watch of a connection (see Conn): lost is called if it
// dies; after each quiet interval it pings. Attach it, then Run it.
func NewConn(interval time.Duration, lost func(error)) *Conn {
	return &Conn{interval: interval, lost: lost}
}

// GetRewatch returns a stopped Rewatch from a pool of them (give it back
// with PutRewatch).
func GetRewatch() *Rewatch { return rewatches.Get().(*Rewatch) }

// GetPeerWatch returns a stopped PeerWatch from a pool of them (give it
// back with PutPeerWatch).
func GetPeerWatch() *PeerWatch { return peerWatches.Get().(*PeerWatch) }
