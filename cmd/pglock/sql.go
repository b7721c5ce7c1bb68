package main

import (
	"flag"
	"fmt"

	"github.com/pglockkit/kit/pglock"
)

const sqlUsage = `usage: pglock sql

Sql prints SQL that creates two functions computing pglock's key rule in the
database, so that psql, PL/pgSQL, pg_cron jobs and programs in any language
can take the same locks as pglock (and postgresql-lock in Python) and find
them in pg_locks:

	pglock_key(name text) bigint      the key of a name, as "pglock key" prints it
	pglock_key_tag(name text)         its classid, objid, objsubid in pg_locks

It creates the pgcrypto extension if missing (for its SHA-1 digest; a
trusted extension from PostgreSQL 13, part of the server package on Debian).
Install them with psql:

	pglock sql | psql "$DATABASE_URL"

then, for example:

	SELECT pg_advisory_lock(pglock_key('cron:nightly-report'));

It needs no database.
`

func (c *cli) sqlCommand(args []string) int {
	fset := flag.NewFlagSet("sql", flag.ContinueOnError)
	if code, done := c.parse(fset, args, sqlUsage); done {
		return code
	}
	if fset.NArg() > 0 {
		return c.usageError("sql", "unexpected argument %q", fset.Arg(0))
	}
	if _, err := fmt.Fprint(c.stdout, pglock.KeyFunctionsSQL); err != nil {
		return c.fail(exitUsage, "sql", "%v", err)
	}
	return exitOK
}
