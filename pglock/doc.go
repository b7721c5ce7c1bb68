// Package pglock is a distributed lock on PostgreSQL advisory locks: the lock
// that two replicas of a service take so that they do not do the same thing at
// once. It is a Go port of, and compatible with, the Python package
// postgresql-lock.
//
//	locker, err := pglock.NewLocker(pool) // *pgxpool.Pool, *sql.DB, ...
//	err = locker.Do(ctx, "invoice:42", func(ctx context.Context) error {
//		// only one process in the cluster runs this at a time
//		return nil
//	})
//
// # Which constructor
//
// Use [NewLocker] on your pool, once, and lock with [Locker.Do] (or
// [Locker.TryDo], or [Locker.NewLock] for a handle to Acquire and Release):
// its session locks cost no pool connection, and it bounds the server
// sessions and lock-table slots it uses. Use [NewLock] for a lock on a
// connection or transaction you own (a pgx.Tx, *pgx.Conn, *sql.Tx, ...): the
// lock runs there, in your transaction or on your session. [NewLock] on a pool
// works too, and pins one pool connection per hold.
//
// Both return handles: nothing is locked until Acquire, TryAcquire, Do or
// TryDo.
//
// # Keys
//
// PostgreSQL has one 64-bit advisory key space per database (and a second one
// of pairs of 32-bit integers). [KeyOf] maps a name to a key exactly as
// postgresql-lock does, so Go and Python services that name the same key
// contend on the same lock: the name's text (a string as is, an integer in
// decimal) is hashed with SHA-1 and the first 8 bytes of the digest, read as a
// big-endian signed integer, are the key. KeyOf("test") is
// -6248023315878667354. A []byte is hashed as its raw bytes (Python's
// str(b"...") form is not mimicked). [Int64Key] and [Int32PairKey] give raw
// keys, unhashed. [Key.LockTag] tells how a key appears in pg_locks. Keys are
// per database: locks in two databases of one server never meet. A
// [WithNamespace] prefix keeps two features of one database apart.
//
// # Scopes and modes
//
// A [Session] lock (the default) is held until it is released or its
// connection ends. A [Transaction] lock is held until its transaction commits
// or rolls back, and cannot be released earlier. [Exclusive] (the default)
// excludes every other holder; [Shared] admits other shared holders and
// excludes exclusive ones.
//
// # What a lock runs on
//
// [NewLock] and [NewLocker] take a *pgxpool.Pool, *pgxpool.Conn, *pgx.Conn,
// pgx.Tx, *sql.DB, *sql.Conn or *sql.Tx; anything else is an error at
// construction.
//
// A [Locker] on a pool (*pgxpool.Pool, or *sql.DB with pgx's database/sql
// driver) holds the session locks of all its Locks on a few connections of
// its own, so a held lock costs no pool connection: see "Lock connections"
// below. [NewLock] on a pool is the simple form: each hold takes one connection
// from the pool and keeps it until the lock is released, since the lock
// belongs to the connection. After a successful unlock the connection goes
// back to the pool holding nothing; a connection whose unlock failed, or whose
// outcome is unknown, is destroyed rather than returned still holding the
// lock. A Locker made with WithMultiplexing(false), and a Locker on a *sql.DB
// with another driver (lib/pq), work the same way.
//
// In Transaction scope on a pool or a connection the lock opens its own
// transaction (with pgx, Acquire and Do send BEGIN and the lock in one round
// trip) and hands it to
// the protected work: [TxFromContext] (pgx) or [SQLTxFromContext]
// (database/sql) inside Do, and [Lock.Tx] or [Lock.SQLTx]. The work commits
// or rolls back together with the lock. On a caller's transaction the lock
// joins it (pg_advisory_xact_lock), and Release leaves the transaction, and
// so the lock, to the caller; Session scope there is refused.
//
// # Lock connections
//
// One PostgreSQL session can hold thousands of advisory locks; a pool
// connection per held lock would cap a process at its pool size and deadlock
// handlers that need the same pool for their work. So a Locker on a pool
// multiplexes its session locks:
//
//   - Lock connections. The Locker opens [WithLockConns] connections of its
//     own (2 by default) with the pool's connection settings, outside the
//     pool, on first use, and holds its keys on them; a key goes to the same
//     one unless that one is busy while another is free (or not opened
//     yet), where the key then goes from then on, so that goroutines on
//     distinct keys run side by side; its unlock goes where it was taken.
//     [Locker.Close] closes them. A lock connection that
//     holds 64 locks or more runs its statements inside an open transaction
//     block, which session locks ignore: PostgreSQL walks every lock a
//     session holds at the end of each transaction, the implicit one of each
//     statement included, so the cost of a lock stays flat however many are
//     held. The block writes nothing, is renewed every 5 s and ends when the
//     connection goes idle (idle_in_transaction_session_timeout then bounds a
//     silent client, as idle_session_timeout does outside it).
//   - Exclusion in the process. PostgreSQL stacks a session's own locks (a
//     session that takes a key twice holds it twice), so the Locker keeps a
//     table of keys: two of its Locks never both hold an exclusive key; the
//     second waits in the process, in FIFO order, or is told the key is busy
//     by TryAcquire. Shared holders in the process share one server-side
//     shared lock, unlocked when the last one lets go; a shared holder does
//     not join while an exclusive one of the process waits, nor while one of
//     another process waits in the server: a shared hold that others keep
//     joining is checked every 100 ms (a shared try on another lock
//     connection, which the server refuses while an exclusive request
//     waits), and once a writer waits nobody joins and the hold drains, as
//     it would with a session per reader (with WithLockConns(1) the check
//     borrows a free waiting connection; while none is free, joins go
//     unchecked). The release of a shared holder that is not the last proves by a statement
//     that the session still lives, so a loss is reported to every holder.
//   - Shared round trips. Lock and unlock requests that goroutines make of one
//     lock connection at the same time travel in one statement: concurrency
//     raises throughput instead of queueing behind one socket. A lock
//     connection runs its statements through pgconn, below pgx's Conn
//     (prepared, arguments and answers in binary); with a pgx QueryTracer in
//     the pool's config, or another query mode than the default, its lock
//     connections go through pgx's Conn instead, so that the tracer sees
//     their statements (at some cost: bench/README.md).
//   - Waiting in the server's queue. A key that another session holds (another
//     replica, psql, the Python package) is waited for with the blocking
//     function, so waiters of every process are served in the server's order:
//     one goroutine per key waits in the server (the others of the process
//     queue behind it), on a waiting connection, which keeps the lock once it
//     is granted, until it is released; a grant is confirmed by one round
//     trip before it is reported, so a grant that arrives from a session the
//     server has ended is not taken as held. At most [WithWaitConns] (4 by
//     default) waiting connections are open, waiting or holding; a wait that
//     finds them all taken tries its key now and then on its lock connection
//     until one is free. A wait lasts as long as its context allows: the
//     Locker's sessions set lock_timeout and statement_timeout themselves,
//     whatever the role or database sets. While a session of another process
//     contends for a key (it was seen to hold or wait for it within the last
//     second), the process stays in the server's queue as a process with a
//     session per waiter would: an acquire waits there at once, without a
//     try first (a free key is then taken at once, on a waiting connection,
//     when two waiting connections are free), and a holder on a waiting
//     connection that lets go while another goroutine of the process waits
//     for the key sends that goroutine's wait on its own connection in the
//     same write as its unlock, so that the process is queued again from the
//     moment its hold ends; a session of another process that was queued
//     first is still granted the key first.
//   - One watch per lock connection. A lock connection that dies or goes
//     silent loses every lock on it at once: each [Lock.Lost] closes, each Do
//     context ends with cause [ErrLockLost], no new lock is granted on it, and
//     the next acquire opens a new connection.
//   - A lock-table guard. Advisory locks live in the server's lock table,
//     which every session of the server shares; when it is full every session
//     fails with "out of shared memory", new connections included. A Locker
//     holds at most [WithMaxLocks] session locks (by default a quarter of the
//     table: max_locks_per_transaction * (max_connections +
//     max_prepared_transactions) / 4, read from the server) and refuses more
//     with [ErrTooManyLocks]; waiters do not count until granted. Since the
//     table is the whole server's, a Locker that holds a thirty-second of
//     it or more also counts the advisory locks of every session of the
//     server (pg_locks: once a second, or every ten seconds while they are
//     below half the limit, and after it takes a sixty-fourth of the table
//     or an eighth of what it holds) and refuses more once they reach three quarters
//     of the table, so that replicas together cannot fill it; WithMaxLocks
//     above that is an error. The Locks that [NewLock] makes (on a pool, or
//     stacked on the caller's connection or transaction, where no Locker
//     caps them) and those of a Locker that does not multiplex share one
//     such guard per server in each process, which starts counting once they
//     hold 64 locks together, on the session of the next lock. A statement
//     that fails with "out of shared memory" fails its acquires only
//     ([ErrTooManyLocks]), and the connection and its other locks stay.
//   - Nothing waits on a lock connection. Its statements never wait for a
//     lock (its lock_timeout is 20 ms: a fencing token behind a migration's
//     table lock fails at once and is tried again between attempts), and each
//     is bounded on the socket by twice the check interval, like the watch:
//     a connection that goes silent mid-statement is lost within the same
//     bound as an idle one, before the server frees its locks.
//
// A session pays for the locks it holds: PostgreSQL walks all of them at the
// end of each of its transactions, so every lock or unlock statement on a
// lock connection holding 5,000 locks costs about 0.3 ms of server time, and
// at 10,000 about 1 ms (PostgreSQL 15 here; 20 us with none). A Locker that
// holds thousands of locks at once should spread them over more lock
// connections.
//
// A lock connection whose client vanishes (a cut network, a killed process
// behind a proxy that keeps TCP open) is ended by the server within
// [AbandonedSessionTimeout] of silence, which frees its locks, and not before
// the client has seen the loss: the Locker sets
// server-side TCP keepalives and, on PostgreSQL 14 and later,
// idle_session_timeout on it, and keeps it busy while it holds locks.
//
// Transaction scope is not multiplexed: its transaction is the work's
// connection, taken from the pool for the hold. [Locker.Stats] tells how many
// connections, locks and waiters a Locker has now.
//
// A Locker on one connection or transaction (*pgx.Conn, *pgxpool.Conn,
// pgx.Tx, *sql.Conn, *sql.Tx) is safe for concurrent use too: its holds take
// turns on the connection, each keeping it from the start of its acquire to
// its release, so that the protected work can use it; other goroutines'
// acquires (TryAcquire too) wait for it until their contexts end. It holds
// one lock at a time, so an acquire made while holding one waits as well.
// One connection does one thing at a time: use a pool for concurrent work.
//
// # Waiting and cancelling
//
// [Lock.Acquire] waits in the server's queue until the lock is granted or the
// context ends: on a connection of its own (a Lock made by NewLock) it sends the
// blocking function at once, one round trip whether the key is free or not;
// a Locker's Lock first tries the key on its lock connection (with others'
// requests) and waits on a waiting connection only when another session
// holds it (or at once, for a key that another process contends for: see
// "Lock connections"). A waiting goroutine costs no goroutine of the
// library: the context is watched with context.AfterFunc. A cancelled wait is stopped with a
// PostgreSQL cancel request rather than by closing the connection (which is
// what pgx does with a cancelled query): a pinned or caller's connection stays
// usable. The server may grant the lock in the instant the cancel arrives, so
// after an interrupted wait the lock is looked up in pg_locks and given back:
// when Acquire fails, the lock is not held. The error matches both
// [ErrNotAcquired] and the context's error. On a caller's transaction the wait
// runs under a savepoint, so a cancelled wait leaves the transaction usable.
//
// On *sql.DB and *sql.Conn with pgx's database/sql driver (pgx/v5/stdlib)
// the lock reaches the *pgx.Conn underneath (sql.Conn.Raw) and waits the same
// way. database/sql itself offers no way to interrupt a statement and keep
// the connection, so with other drivers (lib/pq), and on a caller's *sql.Tx,
// a wait polls the non-blocking function with a growing pause (5 ms to
// 100 ms) instead: the same guarantees, but no FIFO order among waiters and
// up to 100 ms of latency.
//
// [Lock.TryAcquire] never waits. [Lock.Release] is safe to call at any time,
// more than once, and with an ended context: the statements that end a hold
// run under their own bound ([WithReleaseTimeout]).
//
// # Knowing that a lock was lost
//
// A session lock lives exactly as long as its connection. While a session lock
// on a pool is held its connection is watched (a Locker's lock connection
// once for all the locks on it): a connection the server closes
// (pg_terminate_backend, a restart, a failover) is noticed at once, or 50 ms
// into the hold for a connection that died sooner (with
// drivers other than pgx's, within the check interval), and one that goes
// silent within twice the check interval ([WithLostCheckInterval],
// 500 ms by default, so within 1 s). Then [Lock.Lost] is closed, the context
// given to Do's function is cancelled with cause [ErrLockLost], and Release
// returns an error matching ErrLockLost.
//
// Between the moment a connection dies and the moment its holder notices,
// the server may already have given the lock to another process: two holders
// can overlap for up to that bound (plus the time the holder takes to react
// to its context). Work that must never overlap should use Transaction scope,
// where the work and the lock commit together: a holder whose connection died
// cannot commit anything. Connections the caller owns (a *pgx.Conn, a
// *sql.Conn) are not watched, since the caller uses them concurrently; there a
// loss is reported at release.
//
// # Do and errors
//
// [Lock.Do] is Python's with statement: acquire, run, release. When the
// function fails or panics the lock's transaction is rolled back first (see
// [WithRollbackOnError]); a panic is re-raised. [Lock.HandleError] is the same
// rollback for code that manages Acquire and Release itself. Do owns its
// hold: while its function runs, Release and HandleError on the same Lock
// return [ErrInDo] and change nothing; a function that commits or rolls back
// the lock's own transaction itself ends the lock with it, and Do says so
// with [ErrTxEnded].
//
// Errors wrap the sentinels of this package ([ErrNotAcquired], [ErrLockLost],
// [ErrNotHeld], [ErrAlreadyHeld], [ErrUnsupportedConn], [ErrInvalidKey],
// [ErrInvalidOption], [ErrNilFunc], [ErrLockerClosed], [ErrTooManyLocks],
// [ErrTransactionPooler], [ErrUnavailable], [ErrNotPrimary], [ErrInDo], [ErrTxEnded],
// [ErrLeaderRunning], [ErrLeaderInDoubt], [ErrFenced], [ErrSchema], [ErrDeadlock], [ErrSelfDeadlock])
// with %w; match them with errors.Is.
// Database errors stay reachable with errors.As (*pgconn.PgError).
//
// # Re-entrancy
//
// PostgreSQL stacks locks per session: a connection that takes a key twice
// holds it twice and must unlock twice. A [Lock] value is not re-entrant:
// Acquire on a held Lock returns [ErrAlreadyHeld]. Two Locks of one Locker
// exclude each other, whatever the Locker runs on; two Locks made with [NewLock]
// on one caller's connection stack, as PostgreSQL does.
//
// Do is re-entrant through its context, as a nested with_advisory_lock of
// the same name is in Ruby: a Do or TryDo of a key inside the function of
// an enclosing Do of that key, on the same database, runs at once in the
// enclosing hold, which it does not end. So a service function that locks
// an account can be called both on its own and from a handler that
// httplock already holds on that account. A nesting the enclosing hold
// cannot cover (Shared held, Exclusive asked; Session scope held,
// Transaction scope asked) fails at once with [ErrSelfDeadlock] (which
// matches [ErrDeadlock]): without it, the nested lock would wait on another
// session for the hold of the goroutine that waits, until its context
// ended. A wait that PostgreSQL's deadlock detector ends (two sessions each
// waiting for the other, SQLSTATE 40P01) fails with [ErrDeadlock] too.
//
// # Deadlocks between holders
//
// A wait made inside a hold (in the function of a Do, or in a context from
// [ContextWithHold]) is a wait of that holder. When holders wait for each
// other in a cycle (A holds k1 and waits for k2, B holds k2 and waits for
// k1), one of the waits fails with [ErrDeadlock] within about
// deadlock_timeout (1 s by default) of the cycle's closing, and the others
// go on: in one process or across processes, on lock connections, with a
// connection per hold, in either scope. PostgreSQL cannot see such a cycle
// by itself: a hold lives on one session (a lock connection, or the hold's
// pool connection) and the next wait of its holder on another, which holds
// nothing. So the library finds it: such a wait names, in a comment of its
// statement, the keys its context holds, and every deadlock_timeout while it
// waits it reads pg_locks and pg_stat_activity (one statement on a lock
// connection, else on a connection of the pool or *sql.DB) and looks for a
// cycle through itself, its own process's waits included (those in a
// Locker's key table, which no server sees). Waits made outside any hold
// cost nothing: they cannot close a cycle. The cost of the others is that
// statement every deadlock_timeout while they wait, and a wait statement
// that skips pgx's statement cache. A cycle is only seen through holds that
// contexts carry: a goroutine that holds a Lock from Acquire and waits for
// another with an unrelated context is not known to hold anything (pass
// ContextWithHold(ctx, lock) to say it is); the waits of the other
// processes must run as a role that may read their statements in
// pg_stat_activity (the same role, or pg_read_all_stats). The in-memory
// double (pglocktest) ends such cycles too.
//
// What it does not see (the waits then last until their contexts end): a
// Shared wait queued behind an Exclusive one that closes the cycle (the
// graph meets holds, not the server's queue order); a cycle across
// processes whose every wait of one process is queued in its Locker's key
// table behind another of its goroutines (no server, and no other process,
// sees those); and a Semaphore's wait for a slot, which is granted when any
// slot frees (its waits are not checked at all). Two Lockers of one
// process on two databases whose nested waits use the same keys in the
// same shape can be taken for one cycle. Each wait inside a hold reads
// pg_locks once per deadlock_timeout: a thousand such waits at once are a
// thousand reads a second.
//
// # Key sets
//
// [Locker.DoAll] holds several keys at once, all or nothing, and
// [Locker.TryDoAll] holds none of them when one is busy. The keys are taken
// in one canonical order, and a wait holds lower keys only, so that two
// callers whose sets overlap cannot each hold what the other waits for.
//
// # Semaphores
//
// [Locker.Semaphore] makes a counted lock: at most N holders of a name at
// once across every process (at most 3 exports at once in the fleet, at most
// N calls per tenant). It is N slot keys and a queue key: an acquire takes a
// free slot; when none is free it queues in the server's FIFO queue, and the
// head of that queue waits for every slot at once, in the server, so it is
// granted as soon as any slot frees and no waiter starves. See [Semaphore].
//
// # Leader election
//
// [Locker.Leader] makes a [Leader]: of all the processes that run
// [Leader.Run] for a key, one at a time leads and runs the function given to
// Run, with a context that ends when its term does (the lock lost, the
// caller stopping); the others wait in the server's queue and the next one is
// elected at once when a term ends. A leader whose function fails steps
// down and campaigns again after a backoff; one whose function returns nil
// is done. [LeaderConfig] has OnElected and OnDeposed callbacks in the
// manner of client-go's leaderelection, and [Leader.IsLeader] tells a
// scheduler whether to run. The lock is an ordinary Session-scope lock of
// the Locker, so it costs no pool connection and shows in pg_locks.
//
// Every replica can say who leads: a Leader's session carries its identity
// (LeaderConfig.Identity, by default "host:pid") as its application_name, so
// [Leader.CurrentLeader], LeaderConfig.OnNewLeader, `pglock locks` and
// pg_stat_activity all name the leader, read from the server. For
// Kubernetes, [HealthHandler] serves [Leader.CheckHealth] (wire it to the
// liveness probe: it fails only while this replica believes it leads and the
// server does not confirm it) and [Locker.CheckHealth] (the readiness probe:
// it fails while the Locker cannot reach its server, which a restart would
// not cure).
//
// # Fencing tokens and exactly-once runs
//
// A lock bounds who runs, not what lands. Three tools, by what the work is:
//
//   - Work inside PostgreSQL, in one transaction: Transaction scope. The lock
//     and the work commit together; a holder whose connection died cannot
//     commit anything. Nothing else is needed.
//   - Work inside PostgreSQL but not in the lock's transaction (Session
//     scope, another connection): a fencing token ([WithToken]) and
//     [CheckFence] in the work's transaction. A stale holder's transaction
//     fails with [ErrFenced] once a newer token was granted, and one that
//     passed its check holds the next grant back until it commits.
//   - Work outside PostgreSQL (an API, a file store): pass [Lock.Token] with
//     each write and have the other side refuse a token lower than the
//     highest it has seen. This is the only protection against a holder
//     paused past its loss; no lock library can give it without the other
//     side's help.
//
// A scheduled job that must run once per tick, whatever the replicas'
// clocks: [ClaimTick] in the job's transaction records (job, scheduled time)
// and refuses a second run of it; cronlock and gocronlock do it for you
// (their Transaction-scope jobs with ticks on).
//
// Tokens and ticks keep their state in the pglock schema: create it with
// [Migrate] or `pglock migrate` (plain locks need nothing).
//
// # Running in production
//
// Connections. A [Locker] on a pool holds its session locks on
// [WithLockConns] lock connections (2 by default) and waits for busy keys on
// at most [WithWaitConns] more (4), which keep what they waited for until it
// is released; each [Leader] that campaigns or leads has one more: sessions
// of its own, outside the pool, opened with the pool's settings in the
// background (bounded by the pool's ConnectTimeout, else the release
// timeout). So a default Locker uses at most 6 server sessions, plus one per
// running Leader ([LockerStats] counts them by role, with the budget as
// MaxSessions): count them in the server's max_connections for every
// replica. A session that has held nothing for half
// [AbandonedSessionTimeout] is closed (the next use opens another), and one
// the server ends is replaced only once the server is done with it.
//
// Timeouts. The Locker's own sessions set lock_timeout and statement_timeout
// themselves, so a wait there lasts as long as its context allows. A wait on
// a connection of the pool or the caller's ([NewLock], WithMultiplexing(false),
// Transaction scope) runs under that connection's settings: a lock_timeout
// set for the role, the database or in the pool's RuntimeParams ends it
// early, with SQLSTATE 55P03 (the error matches [ErrNotAcquired]). [NewLock] on a pool takes one pool
// connection per hold, for as long as the hold: size the pool for the holds
// and for the work's own connections, or use a Locker. Transaction scope
// takes one pool connection per hold (the work's transaction) in both.
//
// Poolers. A session lock needs a server session of its own: connect
// directly, or through a session pooler (PgBouncer's pool_mode = session,
// whose server_reset_query, DISCARD ALL by default, drops a departed
// client's locks: keep it). A transaction pooler (pool_mode = transaction or
// statement) hands each transaction to any server session, so two clients
// could both "hold" a key: Session scope through one is refused with
// [ErrTransactionPooler]. It is detected at a connection's first session
// lock: one statement compares the server's pg_backend_pid() with the pid of
// the connection's cancel key (they differ only through a pooler) and claims
// the server session for the connection (a session setting, pglock.session);
// through a pooler, a session claimed by another client, or a probe (a second
// connection that the pooler hands the session just used, or moves between
// sessions), proves transaction pooling. Through a pooler, every lock
// statement then proves in itself that it runs on the session the connection
// claimed (its pid and the claim), and takes nothing otherwise: a pooler that
// fools the probe (one that resets sessions after every transaction,
// server_reset_query_always) is refused at the first lock. The outcome is
// remembered per connection; through a session pooler the probe costs one short connection
// per connection (bounded by 1 s when the pooler has no free session). It needs
// pgx (pgxpool, pgx.Conn, or database/sql with pgx's stdlib driver): with
// other drivers a transaction pooler goes unseen. Transaction scope works
// through session and transaction pooling; statement pooling allows no
// transaction block, so there both scopes fail with [ErrTransactionPooler]
// (a configuration error, not [ErrUnavailable]). pgx's default exec mode caches prepared
// statements, which a transaction pooler moves between sessions: with
// PgBouncer before 1.21 (Debian 12 ships 1.18) set default_query_exec_mode
// to exec (or simple_protocol) in the connection string; PgBouncer 1.21 and
// later with max_prepared_statements > 0 takes the default.
//
// Abandoned locks. A client that vanishes (a dead network, a frozen host)
// keeps its session, and its locks, on the server until the server notices:
// about 2 h 11 min with the default TCP keepalives, forever behind a
// middlebox that keeps the TCP session open, and forever for a frozen
// process (SIGSTOP, a paused VM: its kernel still answers keepalives). Only
// the server's idle timeouts end such a session, so every hold on
// connections the library owns has one:
//
//   - A multiplexing Locker sets, on its lock connections,
//     tcp_keepalives_idle (half the bound), tcp_keepalives_interval (1 s),
//     tcp_keepalives_count (2), on PostgreSQL 12 and later tcp_user_timeout
//     (the bound), and on 14 and later idle_session_timeout (the bound), so
//     that the server ends an abandoned session within
//     [AbandonedSessionTimeout] (6 s, or four check intervals if longer),
//     always after the client itself has seen the loss (twice the check
//     interval). A setting the pool's configuration gives (RuntimeParams) is
//     kept.
//   - A Session-scope hold on a pool connection of its own ([NewLock] on a
//     *pgxpool.Pool or *sql.DB, a Locker with [WithMultiplexing](false))
//     sets idle_session_timeout to the same bound for the hold (PostgreSQL
//     14 and later; *sql.DB with pgx's driver), in the lock statement, and
//     the unlock puts back the value it had, so the connection returns to
//     the pool as it came; neither costs a round trip.
//   - A Transaction-scope hold on a pool (the lock's own transaction) sets
//     idle_in_transaction_session_timeout with SET LOCAL, which the
//     transaction's end undoes, to [AbandonedTransactionTimeout] (1 min, or
//     four check intervals if longer), unless the session already has a
//     bound (a nonzero value from the server, role, database or the pool's
//     RuntimeParams), which is kept.
//
// In Session scope the watch's checks keep a live holder's session busy, so
// it is never cut. In Transaction scope the work's transaction is idle
// between the work's statements, and the bound ends it too when the work
// stays idle in it that long (a call to another service, say): its next
// statement, and the commit, fail and Do returns an error matching
// [ErrLockLost]; nothing it did commits. That is the trade-off of the
// minute. Work that needs longer sets it in its transaction (SET LOCAL
// idle_in_transaction_session_timeout = '10min', or '0' for no bound), or
// in the pool's RuntimeParams for all of them. A frozen holder's Lost closes
// at once when it resumes: a Session-scope hold's watch reads the server's
// farewell; a Transaction-scope hold is watched from the kernel's side
// (Linux: the socket's state, without reading from the connection the work
// uses; elsewhere the loss shows at the next statement).
//
// Connections the caller owns keep the caller's settings, and are not
// watched; bound them yourself. On a *pgx.Conn, *pgxpool.Conn or *sql.Conn
// (Session scope), SET idle_session_timeout = '6s' (PostgreSQL 14 and
// later) on it and send a statement more often than that while it holds
// (the server ends the session after that much silence); on a pgx.Tx or
// *sql.Tx, SET LOCAL idle_in_transaction_session_timeout = '6s' in it. TCP
// keepalives (tcp_keepalives_idle, tcp_keepalives_interval,
// tcp_keepalives_count, in postgresql.conf or the pool's RuntimeParams) free
// a vanished client's locks, never a frozen one's.
//
// The lock table. Every advisory lock held takes a slot in the server's
// shared lock table, max_locks_per_transaction x (max_connections +
// max_prepared_transactions) slots (6,400 with the defaults), shared by every
// session: a full table fails every statement that needs a lock, in every
// session, with "out of shared memory". A Locker holds at most a quarter of
// it (see [WithMaxLocks], [ErrTooManyLocks]); raise
// max_locks_per_transaction for more.
//
// Restarts and failover. A restart ends every session: the server frees
// every lock, and each holder's Lost closes at once (the server closes the
// connection). An idle pool connection that the restart killed is destroyed
// and replaced when an acquire finds it dead, so the first acquires after a
// restart succeed; while the server is down they fail with [ErrUnavailable]
// (which tells "down" from "busy"). Advisory locks are not replicated: a
// promoted standby starts with none, and the old primary's holders see Lost
// when their connections die (within twice the check interval when the
// network goes silent). A primary is never demoted in place: it restarts to
// follow the new primary, which ends its sessions (their holds are lost),
// and from then on it is a standby, refused as below.
//
// Primaries only. A hot standby grants advisory locks of its own, which
// exclude no one who locks on the primary, so every connection the library
// locks on is checked once, before its first lock, to be a primary
// (pg_is_in_recovery() false, asked in a statement the library sends anyway
// where there is one; on a caller's *sql.Tx, and with a database/sql driver
// other than pgx's, where the connection cannot be reached to remember the
// answer, once per hold); on a standby the acquire fails with [ErrNotPrimary]
// (which matches [ErrUnavailable]: a failover may be under way), a pool's
// connection there is destroyed, and the connection is checked again at its
// next use, since a standby may be promoted. A Locker's own connections on a
// host list (host=a,b) connect to the primary among the hosts, as
// target_session_attrs=primary does; give a pool that NewLock uses on a
// host list that setting yourself. CockroachDB, whose advisory lock
// functions lock nothing, is refused ([ErrUnsupportedConn]).
//
// Fencing tokens across a failover. With asynchronous replication a promoted
// standby may lack the last commits of the old primary, its last tokens
// among them; tokens are offset by the server's timeline (times 2^48), which
// a promotion raises, so the new primary's tokens are above every token the
// old one granted, and [CheckFence] on the new primary refuses the old
// holders' tokens once a new one was granted for their key. Exactly-once
// ticks ([ClaimTick]) are records: one claimed on the old primary whose
// commit did not reach the standby can run again after the failover; use
// synchronous replication (synchronous_commit = on with a synchronous
// standby) where a tick must never run twice.
//
// # Logging
//
// [WithLogger] takes a *slog.Logger (nil, the default, logs nothing).
// Acquired, busy, not acquired and released are logged at Debug level and a
// lost lock or failed release at Warn, with the key, scope, mode and wait.
//
// # What it does not do
//
// It does not stop a paused holder's writes to a system outside the database
// by itself (that system must check the fencing token: see "Fencing tokens
// and exactly-once runs"), renew or lease anything (a PostgreSQL lock needs
// no renewal), or retry a busy lock: it is reported, and the caller decides.
//
// # Where the code is
//
// This package holds the public API and its semantics, the backends of each
// kind of connection, and the multiplexer that ties a Lock to a Locker's own
// sessions. The session machinery is in internal packages that import
// nothing of this one: pglock/internal/lockconn (the lock and waiting
// connections, their statements, sets and session count), keytable (one
// turn per key, FIFO), connwatch (watches of idle connections), pooler
// (connection poolers), waitgraph (the deadlock check's graph) and memlock
// (the test double's table). docs/how-it-works.md in the repository maps
// the files by concern.
package pglock
