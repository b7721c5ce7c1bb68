package bench

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Ceiling: what the wire allows on distinct keys, beside raw pgx and the
// lock connections (a default Locker), N goroutines each on a key of its
// own, in alternating rounds as in BenchmarkContention:
//
//   - raw: raw pgx, one pinned pool connection per goroutine
//     (pg_advisory_lock, pg_advisory_unlock);
//   - pgconn: the same sessions, each statement through pgconn with its
//     prepared statement and its argument and result in binary (what pgx's
//     Conn costs above the protocol);
//   - pipelined: two sessions shared by the N goroutines, each goroutine
//     writing its statement on the socket at once, whatever is in flight,
//     and the answers read in order (a hand-written protocol client, as a
//     pipelining lock connection would be);
//   - mux: Locker.Do on a default Locker (two lock connections, one
//     statement in flight each: requests that arrive meanwhile wait, then
//     share the next).
//
// The sides other than mux are not pglock: they bound what a lock
// connection could reach (see bench/README.md). Reported per side as in
// BenchmarkContention, with s/raw-grants, s/raw-grants-median and
// s/raw-p99.
func BenchmarkCeiling(b *testing.B) {
	for _, n := range []int{2, 8, 32} {
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			b.Run("paired", func(b *testing.B) { ceiling(b, callerCtx(b), n) })
		})
	}
}

func ceiling(b *testing.B, ctx context.Context, n int) {
	pool := pgtest.Pool(b, int32(n))
	warmPool(ctx, b, pool, n)
	mux := newLocker(b, pool)
	pipes := make([]*pipeConn, 2)
	for i := range pipes {
		p, err := dialPipeConn(ctx, pool)
		must(b, err)
		b.Cleanup(p.close)
		pipes[i] = p
	}
	sides := []*contender{
		{name: "raw", loop: rawLoop(pool)},
		{name: "pgconn", loop: pgconnLoop(pool)},
		{name: "pipelined", loop: func(ctx context.Context, w int, k pglock.Key, until time.Time, held func(time.Time) error) error {
			return pipes[w%len(pipes)].loop(k, until, held)
		}},
		{name: "mux", loop: lockerLoop(mux)},
	}
	runRounds(b, ctx, pool, sides, n, false)
	rawRate, rawP99 := sides[0].report(b)
	for _, s := range sides[1:] {
		rate, p99 := s.report(b)
		b.ReportMetric(rate/rawRate, s.name+"/raw-grants")
		b.ReportMetric(s.medianRatio(sides[0]), s.name+"/raw-grants-median")
		b.ReportMetric(p99/rawP99, s.name+"/raw-p99")
	}
}

// pgconnLoop is the same through pgconn, below pgx's Conn: prepared
// statements, the argument and the result in binary.
func pgconnLoop(pool *pgxpool.Pool) grantLoop {
	return func(ctx context.Context, w int, k pglock.Key, until time.Time, held func(time.Time) error) error {
		c, err := pool.Acquire(ctx)
		if err != nil {
			return err
		}
		defer c.Release()
		lock, err := c.Conn().Prepare(ctx, "ceiling_lock", "SELECT pg_advisory_lock($1::bigint)")
		if err != nil {
			return err
		}
		unlock, err := c.Conn().Prepare(ctx, "ceiling_unlock", "SELECT pg_advisory_unlock($1::bigint)")
		if err != nil {
			return err
		}
		pc := c.Conn().PgConn()
		arg := binary.BigEndian.AppendUint64(nil, uint64(k.Int64()))
		args, binaryFormat := [][]byte{arg}, []int16{1}
		run := func(sd *pgconn.StatementDescription) error {
			_, err := pc.ExecStatement(ctx, sd, args, binaryFormat, binaryFormat).Close()
			return err
		}
		for time.Now().Before(until) {
			t0 := time.Now()
			if err := run(lock); err != nil {
				return err
			}
			herr := held(t0)
			if err := run(unlock); err != nil {
				return err
			}
			if herr != nil {
				return herr
			}
		}
		return nil
	}
}

// pipeConn is a session taken from pgconn (Hijack) and spoken to by hand:
// each request's statement (Bind, Execute, Sync of a prepared statement) is
// written at once, under mu so that the wire's order is pending's; the
// first goroutine to find no reader reads the answers in order, hands each
// to its goroutine, and passes the reading on when its own has come.
type pipeConn struct {
	nc net.Conn
	br *bufio.Reader

	mu      sync.Mutex
	pending []*pipeReq
	reading bool
	buf     []byte
}

// pipeReq is a statement written and not yet answered.
type pipeReq struct {
	done chan struct{}
	lead bool // handed the reading
	ok   bool
	err  error
}

// errPipeServer is an ErrorResponse on a pipeConn.
var errPipeServer = errors.New("bench: the server answered an error")

func dialPipeConn(ctx context.Context, pool *pgxpool.Pool) (*pipeConn, error) {
	pc, err := pgconn.ConnectConfig(ctx, pool.Config().ConnConfig.Config.Copy())
	if err != nil {
		return nil, err
	}
	for name, sql := range map[string]string{
		"ceiling_try":    "SELECT pg_try_advisory_lock($1::bigint)",
		"ceiling_unlock": "SELECT pg_advisory_unlock($1::bigint)",
	} {
		if _, err := pc.Prepare(ctx, name, sql, nil); err != nil {
			pc.Close(ctx)
			return nil, err
		}
	}
	hc, err := pc.Hijack()
	if err != nil {
		return nil, err
	}
	return &pipeConn{nc: hc.Conn, br: bufio.NewReaderSize(hc.Conn, 8192)}, nil
}

func (p *pipeConn) close() { _ = p.nc.Close() }

// loop takes and gives back k until the time is past until.
func (p *pipeConn) loop(k pglock.Key, until time.Time, held func(time.Time) error) error {
	for time.Now().Before(until) {
		t0 := time.Now()
		ok, err := p.do("ceiling_try", k.Int64())
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("pipelined try of %s: not granted (one key per goroutine)", k)
		}
		herr := held(t0)
		if _, err := p.do("ceiling_unlock", k.Int64()); err != nil {
			return err
		}
		if herr != nil {
			return herr
		}
	}
	return nil
}

// do runs the prepared statement stmt with the bigint k and returns its
// bool.
func (p *pipeConn) do(stmt string, k int64) (bool, error) {
	r := &pipeReq{}
	p.mu.Lock()
	if _, err := p.nc.Write(p.message(stmt, k)); err != nil {
		p.mu.Unlock()
		return false, err
	}
	p.pending = append(p.pending, r)
	reader := !p.reading
	if reader {
		p.reading = true
	} else {
		r.done = make(chan struct{})
	}
	p.mu.Unlock()
	if !reader {
		<-r.done
		if !r.lead {
			return r.ok, r.err
		}
	}
	for {
		ok, err := p.answer()
		p.mu.Lock()
		h := p.pending[0]
		p.pending = p.pending[1:]
		h.ok, h.err = ok, err
		if h != r {
			p.mu.Unlock()
			close(h.done)
			continue
		}
		if len(p.pending) > 0 {
			next := p.pending[0]
			next.lead = true
			p.mu.Unlock()
			close(next.done)
		} else {
			p.reading = false
			p.mu.Unlock()
		}
		return r.ok, r.err
	}
}

// message is Bind (unnamed portal, stmt, k in binary, the result in
// binary), Execute and Sync, in p's buffer.
func (p *pipeConn) message(stmt string, k int64) []byte {
	b := append(p.buf[:0], 'B', 0, 0, 0, 0, 0)
	b = append(append(b, stmt...), 0)
	b = binary.BigEndian.AppendUint16(b, 1) // one format: binary
	b = binary.BigEndian.AppendUint16(b, 1)
	b = binary.BigEndian.AppendUint16(b, 1) // one parameter
	b = binary.BigEndian.AppendUint32(b, 8)
	b = binary.BigEndian.AppendUint64(b, uint64(k))
	b = binary.BigEndian.AppendUint16(b, 1) // one result format: binary
	b = binary.BigEndian.AppendUint16(b, 1)
	binary.BigEndian.PutUint32(b[1:], uint32(len(b)-1))
	b = append(b, 'E', 0, 0, 0, 9, 0, 0, 0, 0, 0) // Execute, no row limit
	b = append(b, 'S', 0, 0, 0, 4)                // Sync
	p.buf = b
	return b
}

// answer reads the messages of one statement's answer, up to ReadyForQuery,
// and returns its one bool.
func (p *pipeConn) answer() (bool, error) {
	var head [5]byte
	var body []byte
	ok, err := false, error(nil)
	for {
		if _, rerr := io.ReadFull(p.br, head[:]); rerr != nil {
			return false, rerr
		}
		n := int(binary.BigEndian.Uint32(head[1:])) - 4
		if cap(body) < n {
			body = make([]byte, n)
		}
		body = body[:n]
		if _, rerr := io.ReadFull(p.br, body); rerr != nil {
			return false, rerr
		}
		switch head[0] {
		case 'D': // one column: its length (4 bytes), then the bool
			if len(body) == 7 {
				ok = body[6] == 1
			}
		case 'E':
			err = errPipeServer
		case 'Z':
			return ok, err
		}
	}
}
