package bench

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
)

// recorder is a pgx query tracer that records the statements a pool's
// connections send while it is on: what the library sends for one
// operation, replayed by raw pgx (sameAs). Off, it costs an atomic load per
// statement, on both sides of a comparison. It copies each statement's
// argument slice, not what a pointer argument points to: the per-hold paths
// it records pass plain values. (A lock connection's statements are not
// recorded: they go through pgconn, which a tracer does not see, unless the
// pool has a tracer, when they go through pgx with pointers the connection
// reuses.)
type recorder struct {
	on    atomic.Bool
	mu    sync.Mutex
	stmts []recorded
}

// recorded is one statement: its text and arguments.
type recorded struct {
	sql  string
	args []any
}

// TraceQueryStart records the statement when the recorder is on.
func (r *recorder) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	if r.on.Load() {
		r.mu.Lock()
		r.stmts = append(r.stmts, recorded{sql: data.SQL, args: append([]any(nil), data.Args...)})
		r.mu.Unlock()
	}
	return ctx
}

// TraceQueryEnd does nothing.
func (r *recorder) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

// tracedPool is pgtest.Pool with a recorder on its connections (and on a
// Locker's lock connections, which copy the pool's configuration).
func tracedPool(b *testing.B, maxConns int32) *pgxpool.Pool {
	cfg, err := pgxpool.ParseConfig(pgtest.URL(b))
	must(b, err)
	cfg.MaxConns = maxConns
	cfg.ConnConfig.Tracer = &recorder{}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	must(b, err)
	b.Cleanup(pool.Close)
	return pool
}

// sameAs returns raw pgx doing what lib does on pool (a tracedPool), with
// the same SQL: one pool connection, the statements lib sent in one call
// (after two calls to warm it: a connection's first use checks it once),
// each sent as lib sent it (with arguments: a prepared statement, as pgx's
// default mode; without: the simple protocol), then the connection back to
// the pool. lib must send every statement of its operation through pgx's
// query methods on pool's connections (not the PgConn beneath).
func sameAs(b *testing.B, ctx context.Context, pool *pgxpool.Pool, lib func(b *testing.B)) func(b *testing.B) {
	rec, ok := pool.Config().ConnConfig.Tracer.(*recorder)
	if !ok {
		b.Fatal("sameAs needs a tracedPool")
	}
	lib(b)
	lib(b)
	rec.mu.Lock()
	rec.stmts = nil
	rec.mu.Unlock()
	rec.on.Store(true)
	lib(b)
	rec.on.Store(false)
	rec.mu.Lock()
	stmts := rec.stmts
	rec.stmts = nil
	rec.mu.Unlock()
	if len(stmts) == 0 {
		b.Fatal("sameAs: the library's operation sent no statement through pgx's query methods")
	}
	if testing.Verbose() {
		for _, s := range stmts {
			b.Logf("same SQL: %s %v", s.sql, s.args)
		}
	}
	return func(b *testing.B) {
		c, err := pool.Acquire(ctx)
		must(b, err)
		defer c.Release()
		for _, s := range stmts {
			_, err := c.Exec(ctx, s.sql, s.args...)
			must(b, err)
		}
	}
}
