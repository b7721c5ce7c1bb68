// Package pglocktest is a test double for pglock: a real *pglock.Locker
// that runs on an in-memory lock table instead of PostgreSQL, with hooks
// that inject the faults a test needs (a lock lost, a key busy, the
// database unavailable).
//
//	srv := pglocktest.NewServer()
//	locker, err := pglocktest.NewLocker(srv) // give it to the code under test
//	...
//	key, _ := locker.Key("invoice:42")
//	srv.Lose(key) // every hold of the key is lost now
//
// # What is real
//
// Only the lock table is in memory: the Locker, its Locks, Do and TryDo,
// re-entrant Do, key sets (DoAll), Semaphores, Leaders, events and logging
// are pglock's own code, and every adapter (httplock, echolock, cronlock,
// riverlock, grpclock...) takes the Locker unchanged. The table keeps
// PostgreSQL's rules for advisory locks in Session scope:
//
//   - Exclusive excludes everything, Shared admits Shared; TryAcquire never
//     waits.
//   - Waiters are granted in FIFO order, with no barging: a Shared acquire
//     does not pass an Exclusive one queued before it, and a try fails
//     while a conflicting acquire waits.
//   - A wait ends with its context: the error matches
//     [pglock.ErrNotAcquired] and the context's error, and nothing is held.
//   - Each Locker made by [NewLocker] is one replica, with a session of its
//     own: two Lockers on one [Server] exclude each other as two processes
//     on one database do. Locks of one Locker exclude each other too.
//   - [pglock.Locker.Close] ends the Locker's holds (they are lost) and
//     waits. Fencing tokens ([pglock.WithToken]) count up per key.
//
// The same conformance tests run against a Locker on PostgreSQL and on the
// double (see this package's tests).
//
// # Faults
//
// [Server.Lose] makes the holds of a key lost now: Lost() closes and a
// Do's context is cancelled with a cause matching [pglock.ErrLockLost], as
// when the server ends a holder's session. [Server.FailNext] makes the next
// acquire of a key fail (with [pglock.ErrUnavailable], as with the database
// down). [Server.BusyNext] makes the next acquire find the key busy, and
// [Server.HoldElsewhere] holds it as another replica until released.
// [Server.SetDown] takes the whole server down and back up, as a database
// that stops and restarts: every hold is lost, every wait ends, and every
// acquire fails with [pglock.ErrUnavailable] until it is up again.
// [Server.SetDelay] makes every acquire take a while, as a slow network
// does. [Server.Holders], [Server.Waiters] and [Server.Keys] show the table.
// Nested Do of replicas that wait for each other in a cycle end as they do
// on PostgreSQL: one fails with [pglock.ErrDeadlock] within about a second.
//
// Keys are [pglock.Key] values as the Locker takes them, namespace included:
// use [pglock.Locker.Key] to get one from a name, or [Server.Keys] to find
// what an adapter locked.
//
// # What it does not do
//
// Transaction scope: there is no transaction to run the work in, so a
// Locker or Lock in Transaction scope is refused with an error matching
// [pglock.ErrUnsupportedConn]; test it against PostgreSQL. Nor does it
// model what only a server has: connections and their limits
// ([pglock.LockerStats] counts held keys and queued acquires only), the lock
// table's size, poolers, standbys, fences and tick claims in the pglock
// schema ([pglock.CheckFence], [pglock.ClaimTick] need a database), or the
// short window after a real loss in which two holders can overlap (a Lose
// is reported before the key is granted to anyone else).
package pglocktest
