package main

import (
	"context"
	"flag"
	"fmt"
	"strings"

	"github.com/pglockkit/kit/pglock"
)

const migrateUsage = `usage: pglock migrate [--database-url URL]

Migrate creates the pglock schema in the database, or upgrades it to the
version this pglock needs (pglock.SchemaVersion). Plain locks need no
schema; fencing tokens (pglock.WithToken, pglock.CheckFence) and
exactly-once ticks (pglock.ClaimTick, cronlock, gocronlock) keep their state
in it. Migrations are versioned and idempotent, and run in one transaction
under an advisory lock: replicas may all run it at start-up, and one applies
what is missing. It prints the version before and after, and each migration
applied. Programs can call pglock.Migrate instead.
`

func (c *cli) migrateCommand(ctx context.Context, url string, args []string) int {
	fset := flag.NewFlagSet("migrate", flag.ContinueOnError)
	fset.StringVar(&url, "database-url", url, "PostgreSQL connection URL or DSN")
	if code, done := c.parse(fset, args, migrateUsage); done {
		return code
	}
	if fset.NArg() > 0 {
		return c.usageError("migrate", "unexpected argument %q", fset.Arg(0))
	}
	ictx, stop := c.interruptible(ctx)
	defer stop()
	pool, err := connect(ictx, url)
	if err != nil {
		return c.fail(exitUsage, "migrate", "%v", err)
	}
	defer pool.Close()
	res, err := pglock.Migrate(ictx, pool)
	if err != nil {
		if s := stop(); s != nil {
			return c.fail(signalStatus(s), "migrate", "%v", s)
		}
		return c.fail(exitUsage, "migrate", "%v", err)
	}
	if len(res.Applied) == 0 {
		fmt.Fprintf(c.stdout, "pglock schema at version %d: up to date\n", res.To)
		return exitOK
	}
	fmt.Fprintf(c.stdout, "pglock schema migrated from version %d to %d: %s\n", res.From, res.To, strings.Join(res.Applied, "; "))
	return exitOK
}
