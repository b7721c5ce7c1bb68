/*
Pglock runs commands under PostgreSQL advisory locks, and shows who holds
them: flock(1) for every machine that talks to the same database.

Usage:

	pglock [--database-url URL] <command> [arguments]

The commands are:

	run     run a command while holding a lock
	locks   list the advisory locks of the database and who waits for them
	key     print the advisory key that a name maps to
	sql     print SQL functions that compute the key rule in the database
	migrate create or upgrade the pglock schema (fencing tokens, ticks)
	help    show help for a command

Install it with

	go install github.com/pglockkit/kit/cmd/pglock@latest

# Connecting

The database is --database-url (a URL or a key=value DSN), else
$DATABASE_URL, else libpq's environment variables (PGHOST, PGPORT,
PGDATABASE, PGUSER, PGPASSWORD, PGSSLMODE, PGAPPNAME, ~/.pgpass...), read
as pgx reads them. --database-url may be given before the command or after
it. pglock's connections are named "pglock" in pg_stat_activity unless the
URL or PGAPPNAME names them otherwise (PGAPPNAME=nightly-report pglock run
... labels a job). A connection attempt gives up after 10 seconds unless
connect_timeout or PGCONNECT_TIMEOUT says otherwise. Advisory locks belong
to one database: two commands contend only if they name the same database.

# Run a command under a lock

	pglock run [--wait DURATION | --no-wait] [--shared] [--xact]
	           [--kill-after DURATION] KEY -- COMMAND [ARGS...]

Run takes the lock KEY, runs COMMAND while it holds it, and releases it
when COMMAND exits. KEY is a name, mapped to a 64-bit key exactly as
pglock.KeyOf and the Python package postgresql-lock map it (see "pglock
key"), so a Go service, a Python service and a shell script that name the
same key take the same lock. Flags go before KEY, and "--" separates KEY
from COMMAND. Any crontab line becomes a singleton across the cluster:

	0 * * * * pglock run --no-wait report:hourly -- /usr/local/bin/report

By default run waits as long as it takes. --no-wait gives up at once when
another session holds the key, and --wait DURATION (30s, 5m...) after that
long; --wait 0 is --no-wait. Both then exit 75 (EX_TEMPFAIL) with one line
on standard error, without running COMMAND. --shared takes the lock in
shared mode: shared holders run together, an exclusive one runs alone.

The lock is a session lock on a connection that pglock keeps for the run.
With --xact it is a transaction lock (pg_advisory_xact_lock) in a
transaction that stays open, idle, while COMMAND runs, and is committed when
COMMAND ends. For COMMAND it behaves exactly like the default; unlike a
session lock, it holds through a pooler in transaction mode (PgBouncer's
pool_mode = transaction), since the open transaction pins one server
connection. pglock pings that connection every 0.5 s, which also keeps
idle_in_transaction_session_timeout (if longer than that) from ending it. An
open transaction holds back vacuum's cleanup horizon: prefer the default for
commands that run for hours on a busy database.

COMMAND gets pglock's standard input, output and error. SIGINT, SIGTERM
and SIGHUP sent to pglock are forwarded to COMMAND; pglock waits for
COMMAND and exits with its status. A signal ignored when pglock starts
(nohup ignores SIGHUP; a non-interactive shell's background job, SIGINT)
stays ignored, by pglock and by COMMAND. A signal that arrives while pglock
still waits for the lock stops the wait: COMMAND never runs and pglock
exits 128+N.

Where COMMAND runs depends on the terminal. When standard input is a
terminal whose foreground process group is pglock's (an interactive shell
runs pglock in the foreground), COMMAND stays in pglock's process group, as
under flock(1): it may read the terminal, Ctrl-Z stops it with pglock and fg
continues both, and Ctrl-C reaches it directly from the terminal, once:
pglock does not forward a SIGINT that arrives while its group is the
terminal's foreground group, since the terminal sent it to COMMAND too (so a
"kill -INT" of pglock itself is not forwarded then either: send SIGTERM, or
signal the process group). SIGTERM, SIGHUP and a lost lock's SIGTERM and
SIGKILL go to COMMAND alone, not to the group, which holds pglock (and maybe
the rest of a shell pipeline). pglock does not hand the terminal to a
process group of COMMAND's (tcsetpgrp): COMMAND stopped by Ctrl-Z in a group
of its own would leave pglock waiting and the shell unaware.

Otherwise (no terminal, or pglock in the background) COMMAND gets a process
group of its own, and signals go to that group, so a shell's children get
them too. A COMMAND that then reads the terminal is stopped (SIGTTIN), as
any background job is.

A session lock lives as long as its connection, and pglock watches it while
COMMAND runs. If the server ends the session (pg_terminate_backend, a
restart, a failover) or the connection breaks, pglock notices at once (a
connection that goes silent, within about a second; under --xact, at the
next ping, or when a ping gets no answer for 5 s). It then prints one line,
which says that the lock's database connection "ended" (the server closed
it, or it broke) or, when pglock got no answer in time (a server or
network gone silent: a timeout), that it "stopped answering"; it
sends SIGTERM to COMMAND (to its process group, unless COMMAND shares
pglock's at a terminal), and SIGKILL if COMMAND still runs after
--kill-after (10s by default; 0 never kills); it waits for COMMAND and
exits 70 whatever COMMAND's status. From the moment the lock is lost another
pglock may take it, so COMMAND can overlap with the next holder for as long
as it takes to stop: make COMMAND stop promptly on SIGTERM, and keep work
that must never overlap in the database, in a transaction that checks the
lock. pglock also exits 70 when the loss is only noticed at release, after
COMMAND has ended.

# List locks

	pglock locks [--json] [--key NAME ...] [--watch [--interval D]]

Locks lists every advisory lock of the current database, held or waited
for, read from pg_locks and pg_stat_activity (with --key NAME, only the
key that NAME maps to, labelled with NAME; NAME is hashed as it is: include
an adapter's namespace, such as "cron:"): the key, the mode (exclusive or shared), whether it
is held or waited for, the session's pid, application_name and client
address (a pglock Leader's session carries the Leader's identity as its
application_name: the holder of a Leader's key names the replica that
leads), since when, and who waits behind whom (pg_blocking_pids). A key of
the bigint space (objsubid 1) is shown as its int64; one of the (integer,
integer) space (objsubid 2) as "a,b". Since PostgreSQL does not record when
a lock was granted, SINCE is, for a waiting session, when the wait began
(pg_locks.waitstart on PostgreSQL 14 and later, else query_start); for a
holder, when its current transaction began (xact_start) or, if it is not in
one, when its connection began (backend_start). QUEUE names the pids a
waiting session waits for ("behind 123") and the pids that wait for a
holder ("blocks 456"). The table is aligned with text/tabwriter; --json
prints an array of objects with every column (key, int64 or pair, name,
classid, objid, objsubid, mode, granted, pid, application_name, user,
client_addr, client_port, state, backend_start, xact_start, query_start,
wait_start, since, blocked_by, waiters, and query, the statement of a
waiting session). Without the pg_read_all_stats role, other users'
sessions show no client address or times, and their query reads
"<insufficient privilege>".

Below the table, a line counts the advisory locks of the whole server
against the size of its lock table, and a warning follows when they take
more than half of it:

	advisory locks, all databases: 7,001 of 12,800 lock-table slots (54.7%)
	warning: the lock table is more than half full: a full table fails every session of the server with 'out of shared memory'; raise max_locks_per_transaction or hold fewer locks

The count is the number of advisory rows of pg_locks, which shows the lock
table of the whole server: every database, held or waited for, one row per
holder and per waiter (sessions that share a key, in shared mode or in its
queue, share one entry of the table but count once each). --key does not
change it. The size is max_locks_per_transaction * (max_connections +
max_prepared_transactions), read with current_setting: the size that
PostgreSQL documents, and the least it reserves (it adds room for its
background processes and may borrow spare shared memory), so the line errs
towards alarm. The same formula sizes pglock.WithMaxLocks's default cap.
--json without --watch prints the array of locks alone, as it always did;
the count is in the snapshots of --watch --json.

A full lock table stops every session of the server, not only the
application that fills it. Every lock that a process cannot keep in its
few fast-path slots takes an entry of that one table in shared memory,
sized when the server starts and shared by every database: every advisory
lock (they never take the fast path), and the table locks of a query that
touches many tables or partitions, of DDL and of autovacuum. A session lock
keeps its entry until it is unlocked or its session ends, idle or not.
When no entry is left, any session of any database that needs one more
fails with "ERROR: out of shared memory" (HINT: You might need to increase
max_locks_per_transaction): queries, migrations, autovacuum. Raising
max_locks_per_transaction takes a restart; ending the sessions that hold
the locks (pg_terminate_backend) frees their entries at once. The usual
cause is an application that takes a lock per row or item and forgets to
release it.

	pglock locks --watch [--interval D] [--json] [--key NAME ...]

With --watch, locks takes a snapshot every D (1s by default; from 100ms to
1h: reading pg_locks takes every lock-manager partition's lock in turn, so
a busy server should not be polled much faster) until SIGINT (Ctrl-C) or
SIGTERM, and then exits 0. It keeps one connection for the whole watch; a
database error, or a snapshot without an answer within 10 seconds, ends it
with one line on standard error and status 2. The table gains two columns:
SESSION, the session's pg_stat_activity.state (active, idle, idle in
transaction...), and QUERY, the statement of a waiting session, on one
line and cut at 100 characters; SINCE and QUEUE come before the session's
columns, so that a narrow terminal cuts the least useful ones. When
standard output is a terminal, each snapshot redraws the screen in place
(ANSI escape sequences: cursor home, each line erased and rewritten, the
rest of the screen erased; no alternate screen, the cursor not hidden, so
nothing to restore, and the last snapshot stays on the screen), its lines
cut at the terminal's width, and rows beyond its height counted on one
line. Otherwise (a file, a pipe) each snapshot is printed whole after a
line with its time, and a blank line separates snapshots. With --json,
each line is one snapshot, a JSON object (JSON Lines):

	{"time": "...", "locks": [...], "health": {"advisory_locks": 7001, "capacity": 12800,
	  "max_locks_per_transaction": 64, "max_connections": 200,
	  "max_prepared_transactions": 0, "percent": 54.6953125, "warning": "..."}}

where locks is the array of --json and warning is there only above half.

# Print keys

	pglock key [--json] STRING...

Key prints, for each STRING, the int64 key it maps to (as pglock.KeyOf
computes it: SHA-1 of the UTF-8 text, the first 8 bytes read as a
big-endian signed integer) and its two 32-bit halves as signed integers,
HIGH and LOW, which pg_locks shows as classid and objid (as unsigned oids)
with objsubid 1. The halves are not a key of the (integer, integer) space:
pg_advisory_lock(HIGH, LOW) is another lock. It needs no database.

	$ pglock key test
	                 INT64         HIGH         LOW  NAME
	  -6248023315878667354  -1454731291  -860775514  test

# The key rule in SQL

	pglock sql | psql "$DATABASE_URL"

Sql prints SQL (pglock.KeyFunctionsSQL) that creates pglock_key(text), the
bigint key of a name, and pglock_key_tag(text), its columns in pg_locks,
with pgcrypto's SHA-1 digest (the extension is created if missing), so that
psql, PL/pgSQL, pg_cron jobs and other languages take the same locks:

	SELECT pg_advisory_lock(pglock_key('cron:nightly-report'));

It needs no database.

# The pglock schema

	pglock migrate

Migrate creates or upgrades the schema that fencing tokens and exactly-once
ticks keep their state in (see pglock.Migrate); safe to run from many
replicas at once.

# Exit status

	0       locks, key: done; locks --watch: stopped by SIGINT or SIGTERM
	0-255   run: COMMAND's status; 128+N when signal N killed it
	2       usage error, bad URL, unreachable database, or a database error
	        before COMMAND started (one line on standard error)
	70      run: the lock was lost; COMMAND got SIGTERM (EX_SOFTWARE)
	75      run: the lock is held elsewhere, with --no-wait or after --wait
	        (EX_TEMPFAIL)
	126     run: COMMAND could not be started
	127     run: COMMAND was not found
	128+N   run: signal N stopped pglock while it waited for the lock

COMMAND may itself exit 2, 70 or 75: pglock's own failures are the ones
that print a line starting with "pglock" on standard error.

# What it does not do

pglock does not retry, queue jobs or remember runs: wrap it in a loop or a
scheduler for that. It does not lock across databases or servers. It does
not stop COMMAND's grandchildren that leave its process group, nor, at a
terminal, the ones COMMAND leaves behind when it exits on SIGTERM. It does not
fence COMMAND's effects outside PostgreSQL against the short overlap after
a lost lock. If pglock itself is killed with SIGKILL (or crashes), its
session ends and frees the lock while COMMAND may still run (on Linux
COMMAND gets SIGTERM, see below, but may take time to stop or ignore it):
supervise pglock, not COMMAND.

# When pglock dies

On Linux, COMMAND is started with a parent death signal
(prctl PR_SET_PDEATHSIG): if pglock dies while COMMAND runs (kill -9, the
OOM killer, a crash), the kernel sends SIGTERM to COMMAND, which the freed
lock no longer protects. SIGTERM, not SIGKILL, so that COMMAND may clean
up; pglock is gone, so --kill-after does not apply. The signal goes to
COMMAND alone, not to its process group: a shell COMMAND should pass it on
to its children (or exec the last one), and a COMMAND that traps or ignores
SIGTERM (or that inherits it ignored from pglock's parent) keeps running.
pglock starts COMMAND, and waits for it, on an operating-system thread that
it keeps for that alone, since Linux sends the signal when the thread that
started the child exits, not only when the process does. Other systems have
no such signal: there COMMAND keeps running after pglock dies.
*/
package main
