// Package keytable is a Locker's in-process table of keys: the exclusion
// among the Locks of one process that share a server session, which
// PostgreSQL does not give them (a session that takes a key twice holds it
// twice). pglock's lock connections (mux.go, package lockconn) run on it.
// It does not import pglock: pglock imports it. It sends nothing to a
// server; it records what its callers did there, and decides who goes next.
//
// # What it guards
//
//   - One turn per key. At most one goroutine at a time, the owner of the
//     key's turn, takes or gives back the server's lock on the key. Enter
//     gives the turn (AdmitTurn), and the owner ends it with Granted (now it
//     holds the key), PassTurn (it holds nothing), HandOff (its exclusive
//     hold goes to the next waiter without an unlock) or RelayTo (the next
//     waiter gets the turn with a wait already in the server's queue). Leave
//     by the last holder gives the turn back to it, to unlock.
//   - FIFO. The others queue behind the turn in the order they came, and are
//     let in in that order; a try (Enter with wait false) is told at once
//     that the key is busy, or, with Config.SharedTries, waits for the
//     answer of a shared try in flight.
//   - Shared holders reference-counted. Shared holders of the process share
//     one server-side shared lock: a shared request joins a shared hold
//     (AdmitJoined) unless someone is queued before it (an exclusive waiter
//     of the process is not starved), the hold's connection was lost, or the
//     hold drains; the last holder to Leave unlocks it. Joiners bypass the
//     server's queue, so a hold that has let others join for
//     SharedJoinRecheck is checked for exclusive waiters of other sessions
//     (AdmitProbe, then Probed); once one is found, or (without
//     Config.Probes) past the recheck, nobody joins and the hold drains.
//   - What the server holds vs what each waiter was told. An entry records
//     what the server holds for the process: holders (a count, with their
//     mode) and the connection the lock lives on, or a turn under way (the
//     server's lock being taken or given back). Each waiter is told exactly
//     once, on its own channel, what it got (an Admission); a waiter whose
//     context ends as it is let in keeps a grant that came first and passes
//     a turn on, so that nothing is held that nobody knows of. A connection
//     lost (LoseConn) marks every key on it lost and calls the holders'
//     watches; a grant or hand-off recorded on a connection already lost is
//     refused, so a grant that arrives on a session in doubt is not held.
//
// An entry exists while its key is held, taken or queued for; it is deleted
// when the last of them is gone. The table also remembers the keys that a
// session of another process was seen to contend for lately (MarkHot,
// IsHot, for HotFor), which the multiplexer uses to stay in the server's
// queue for them. Close ends every wait with Config.Closed.
//
// The table is generic over what its user holds: the key (K), the
// connection a key is held on (C, see Conn), the holder that watches for a
// loss (H) and the wait a turn is relayed with (R); it never looks into
// them, but for a connection's ConnState.
package keytable
