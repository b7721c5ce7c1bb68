package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

// Exit statuses of pglock itself. Under "pglock run" every other status is
// the command's own (see the package documentation).
const (
	exitOK       = 0
	exitUsage    = 2   // bad usage or configuration, database unreachable or failing
	exitLost     = 70  // EX_SOFTWARE: the lock was lost while the command ran
	exitBusy     = 75  // EX_TEMPFAIL: the lock is held elsewhere (--no-wait, or --wait passed)
	exitNoExec   = 126 // the command was found but could not be started
	exitNotFound = 127 // the command was not found
	exitSignal   = 128 // plus the signal's number: interrupted, or the command was killed
)

func main() {
	signals := make(chan os.Signal, 4)
	for _, s := range []os.Signal{os.Interrupt, syscall.SIGTERM, syscall.SIGHUP} {
		// A signal ignored at start (nohup, a shell's background job)
		// stays ignored, by pglock and by COMMAND, which inherits that.
		if !signal.Ignored(s) {
			signal.Notify(signals, s)
		}
	}
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr, signals))
}

// run is the whole command: it parses args, runs the subcommand they name
// and returns the exit status. signals carries the SIGINT, SIGTERM and
// SIGHUP that pglock receives (nil: none); when ctx ends, pglock behaves as
// if it had received SIGTERM.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, signals <-chan os.Signal) int {
	c := &cli{stdout: stdout, stderr: stderr, signals: signals}
	fs := flag.NewFlagSet("pglock", flag.ContinueOnError)
	url := fs.String("database-url", "", "PostgreSQL connection URL or DSN (default: $DATABASE_URL, else the PG* variables)")
	if code, done := c.parse(fs, args, usage); done {
		return code
	}
	if fs.NArg() == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	name, rest := fs.Arg(0), fs.Args()[1:]
	switch name {
	case "run":
		return c.runCommand(ctx, *url, rest)
	case "locks":
		return c.locksCommand(ctx, *url, rest)
	case "key":
		return c.keyCommand(rest)
	case "sql":
		return c.sqlCommand(rest)
	case "migrate":
		return c.migrateCommand(ctx, *url, rest)
	case "help":
		return c.help(rest)
	default:
		return c.usageError("pglock", "unknown command %q", name)
	}
}

// cli holds what every subcommand writes to and listens to.
type cli struct {
	stdout, stderr io.Writer
	signals        <-chan os.Signal
}

// parse parses fs. done reports that the command ends here with code: -h
// printed help (status 0), or the flags were wrong (one line, status 2).
func (c *cli) parse(fs *flag.FlagSet, args []string, help string) (code int, done bool) {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	switch {
	case err == nil:
		return 0, false
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprint(c.stdout, help)
		return exitOK, true
	default:
		return c.usageError(fs.Name(), "%v", err), true
	}
}

// usageError prints one line about a mistake in the command line and
// returns exitUsage.
func (c *cli) usageError(cmd, format string, args ...any) int {
	helpCmd := "pglock help"
	if cmd != "pglock" {
		helpCmd += " " + cmd
	}
	fmt.Fprintf(c.stderr, "pglock%s: %s (see %q)\n", subName(cmd), oneLine(fmt.Sprintf(format, args...)), helpCmd)
	return exitUsage
}

// fail prints one line, "pglock[ cmd]: message", and returns code.
func (c *cli) fail(code int, cmd, format string, args ...any) int {
	fmt.Fprintf(c.stderr, "pglock%s: %s\n", subName(cmd), oneLine(fmt.Sprintf(format, args...)))
	return code
}

func subName(cmd string) string {
	if cmd == "" || cmd == "pglock" {
		return ""
	}
	return " " + cmd
}

// oneLine folds a multi-line message (pgx puts the errors of several hosts
// on lines of their own) into one line.
func oneLine(s string) string {
	var b strings.Builder
	for line := range strings.SplitSeq(s, "\n") {
		line = strings.Join(strings.Fields(line), " ")
		if line == "" {
			continue
		}
		if b.Len() > 0 {
			if strings.HasSuffix(b.String(), ":") {
				b.WriteString(" ")
			} else {
				b.WriteString("; ")
			}
		}
		b.WriteString(line)
	}
	return b.String()
}

func (c *cli) help(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(c.stdout, usage)
		return exitOK
	}
	if len(args) > 1 {
		return c.usageError("help", "too many arguments")
	}
	switch args[0] {
	case "run":
		fmt.Fprint(c.stdout, runUsage)
	case "locks":
		fmt.Fprint(c.stdout, locksUsage)
	case "key":
		fmt.Fprint(c.stdout, keyUsage)
	case "sql":
		fmt.Fprint(c.stdout, sqlUsage)
	case "migrate":
		fmt.Fprint(c.stdout, migrateUsage)
	case "help":
		fmt.Fprint(c.stdout, usage)
	default:
		return c.usageError("help", "unknown command %q", args[0])
	}
	return exitOK
}

const usage = `pglock runs commands under PostgreSQL advisory locks and shows who holds them.

Usage:

	pglock [--database-url URL] <command> [arguments]

The commands are:

	run     run a command while holding a lock (flock(1) for a cluster)
	locks   list the advisory locks of the database and who waits for them
	key     print the advisory key that a name maps to
	sql     print SQL functions that compute the key rule in the database
	migrate create or upgrade the pglock schema (fencing tokens, ticks)

The database is --database-url, else $DATABASE_URL, else the libpq
environment variables (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD...).
Connections are named "pglock" in pg_stat_activity unless the URL or
PGAPPNAME gives another application_name.

Use "pglock help <command>" for more information about a command.
`
