package lockconn

import (
	"context"
	"time"
)

// A lock connection that holds many locks runs its statements inside an
// open transaction block. PostgreSQL walks a session's whole local lock table
// at the end of every transaction, the implicit one of each statement
// included, so outside a block every statement on a connection holding N
// locks pays for N (about 55 ns each: 0.7 ms at 10,000 held); inside one it
// pays nothing, and session locks ignore the block (they survive its commit
// and rollback, and an unlock frees the key at once). A block opens once
// the connection holds blockFrom locks; it ends when the connection holds
// fewer than half of that, before any other use of the connection (a
// fencing token writes, and must commit), after a failed statement (rolled
// back), when the connection goes idle (the watch's first ping, after a
// quiet check interval, commits instead: see idlePing), and it is renewed
// after blockMaxAge of constant use. So no transaction stays open for long:
// the block writes nothing (no transaction ID); between its statements it
// keeps the snapshot of the last one (the unnamed portal of the extended
// protocol), which a busy connection renews with every statement and an
// idle one drops within a check interval; pg_stat_activity shows it "idle
// in transaction" only between statements. The server ends a silent
// client's session as before (idle_in_transaction_session_timeout, set with
// idle_session_timeout: see Owner.Connect). Through a pooler (proof) the
// connection never opens a block.
const (
	blockFrom   = 64
	blockMaxAge = 5 * time.Second
)

// block opens, renews or ends the connection's transaction block before a
// statement (see blockFrom), in one extra round trip when it does.
func (c *Conn) block() error {
	if c.slot < 0 || c.proof != nil {
		return nil
	}
	c.mu.Lock()
	holds := c.holds
	c.mu.Unlock()
	var q string
	switch st := c.conn.PgConn().TxStatus(); {
	case st == 'E' && holds >= blockFrom:
		q = "ROLLBACK; BEGIN"
	case st == 'E':
		q = "ROLLBACK"
	case st == 'I' && holds >= blockFrom:
		q = "BEGIN"
	case st == 'T' && holds < blockFrom/2:
		q = "COMMIT"
	case st == 'T' && time.Since(c.blockAt) >= blockMaxAge:
		q = "COMMIT; BEGIN"
	default:
		return nil
	}
	if _, err := c.conn.PgConn().Exec(context.Background(), q).ReadAll(); err != nil {
		return err
	}
	c.blockAt = time.Now()
	return nil
}

// idlePing is the watch's ping of an idle lock connection: it ends an open
// transaction block instead (a round trip too, off the callers' path), so
// that an idle connection keeps no snapshot (that of its last statement's
// portal) and is not left idle in transaction; the next lock request opens
// a new one. The watch runs only while the goroutine that owns the
// connection leaves it alone.
func (c *Conn) idlePing(ctx context.Context) error {
	if c.conn.PgConn().TxStatus() != 'I' {
		return c.conn.PgConn().Exec(ctx, "COMMIT").Close()
	}
	return c.conn.Ping(ctx)
}

// endBlock ends the connection's transaction block, if one is open, before
// a use of the connection that is not a lock request (see blockFrom).
func (c *Conn) endBlock() error {
	if c.conn == nil {
		return nil
	}
	q := "COMMIT"
	switch c.conn.PgConn().TxStatus() {
	case 'I':
		return nil
	case 'E':
		q = "ROLLBACK"
	}
	_, err := c.conn.PgConn().Exec(context.Background(), q).ReadAll()
	return err
}
