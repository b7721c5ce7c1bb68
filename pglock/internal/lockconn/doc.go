// Package lockconn holds a multiplexing Locker's own connections to the
// server: lock connections, each of which holds the session locks of many
// Locks at once, and waiting connections, each used by one goroutine to
// wait in the server's queue and then hold what it got. It keeps the sets
// of them (lock connections by slot, waiting connections idle or in use),
// picks the lock connection for a key's try, sends the lock and unlock
// requests, opens, watches and closes the sessions, and counts them. It does
// not import pglock: pglock's mux (its Owner) decides, with the key table
// (package keytable), whose turn it is and what a request is for, and names
// a key to Group.Pick by two numbers of its hash; a Conn runs the requests
// it is given.
//
// # What it keeps
//
//   - One goroutine owns a connection at a time. A request (Conn.Do) that
//     finds the connection free owns it until its request is done; others
//     queue, and are served in the statement of the goroutine that owns it,
//     or handed the connection in the order they came. Nothing else uses the
//     connection meanwhile: its watch (connwatch) runs only while nobody
//     owns it, and is stopped before a use.
//   - Requests are batched up to the first Fn: the owner sends every queued
//     lock, unlock, check and probe request in one statement (one round
//     trip), up to the first use of the connection alone (Op.Fn), which
//     runs alone, in its turn. A request of a key set lingers a moment for
//     the rest of its set (SetBatch).
//   - A request sent alone, or a batch, goes straight through pgconn: its
//     prepared statement, kept per connection, its arguments and its answer
//     in binary (direct.go); a connection whose config has a pgx tracer or
//     another query mode than the default goes through pgx's QueryRow and
//     Query, so that the tracer sees it and the mode is kept; through a
//     pooler every statement is the proven batch statement, through pgx's
//     Query.
//   - Nothing sent on a lock connection waits for anything but the network:
//     requests use the non-blocking functions, each statement is bounded by
//     a socket deadline (Config.StatementBound), and a silent connection is
//     lost within that bound, busy or idle.
//   - A statement that failed half way takes nothing: every key of its
//     batch that the session may hold is given back, or the connection is
//     lost with every lock on it. A loss is told to the owner (Owner.Lost)
//     after the connection is marked dead and takes no more requests; the
//     key table then refuses a grant recorded on it (keytable.ConnState).
//   - Through a pooler, a statement runs only on the server session its
//     connection claimed (pooler.Proof); one that finds another makes the
//     owner refuse every later connect (Owner.Refuse).
//   - A key's try goes to its home lock connection: its slot by hash, or
//     where a try of its bucket of hints last moved to; while the home runs
//     a statement, a free lock connection (or one not opened yet) takes it
//     and becomes the bucket's home (Group.Pick). A hold lives where it was
//     taken, whatever the home.
//   - A counted wait takes a place among Config.WaitConns (Group.Places)
//     before its waiting connection, and the connection keeps the place
//     while it holds what it waited for; idle and placed waiting
//     connections together stay within Config.WaitConns; a Leader's
//     campaign connection (no place) is never kept for another wait
//     (Group.PutWaitConn).
//   - Once the Locker is closed (Group.Shut) the sets take no connection
//     and keep none; Close closes what they had side by side
//     (Group.CloseAll). Lock order: the owner's mutex, then the sets'
//     (Group.setsMu), then a Conn's, then the session count's.
//   - Every session is counted from the start of its connect until it is
//     closed, and the Locker's Close waits for them all, connects under way
//     included (Group.WaitSessions); a session the Locker closes on purpose
//     is waited for until the server has ended it (EndSession).
//
// # Files
//
//	group.go     Owner, Config, Group: what the connections of a Locker share; the session count; Shut, CloseAll, Counts
//	slots.go     the lock connections by slot, and the one a key's try goes to (Pick, hints)
//	waiting.go   the waiting connections: their places, the idle ones kept, those in use
//	conn.go      the queue of requests and the connection's life (open, lost, closed)
//	batch.go     the statement that runs a batch of requests, and what its failure means
//	direct.go    the statements of a request alone and of a batch, through pgconn
//	block.go     the transaction block a connection holding many locks runs its statements in
//	setbatch.go  the requests of one key set, which share statements
package lockconn
