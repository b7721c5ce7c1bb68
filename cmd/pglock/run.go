package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/pglockkit/kit/pglock"
)

// lostCheckInterval is how often the connection of a held lock is checked
// when nothing happens on it. A connection the server closes is noticed at
// once under the default session scope; under --xact within one interval.
const lostCheckInterval = 500 * time.Millisecond

// waitDelay bounds how long, after COMMAND exits, pglock waits for the
// output it copies (only when pglock's own output is not a file, as in
// tests): a background process left by COMMAND may keep it open.
const waitDelay = 2 * time.Second

// lostCauseWait bounds how long pglock waits, once Lost() is closed, for
// the error that says why (the Lock hands it to its observer right after
// it closes the channel), before it prints the lost line without it.
const lostCauseWait = 250 * time.Millisecond

const runUsage = `usage: pglock run [--wait DURATION | --no-wait] [--shared] [--xact]
                  [--kill-after DURATION] [--database-url URL] KEY -- COMMAND [ARGS...]

Run runs COMMAND while holding the advisory lock KEY, like flock(1) but for
every machine that uses the same database. KEY is a name, hashed as
pglock.KeyOf and the Python package postgresql-lock hash it ("pglock key
KEY" prints the number). Put the flags before KEY, and "--" between KEY and
COMMAND.

By default pglock waits for the lock as long as it takes.

	--no-wait      do not wait: if the lock is held elsewhere, exit 75 at once
	--wait D       wait at most D (e.g. 30s, 5m), then exit 75; --wait 0 is --no-wait
	--shared       take the lock in shared mode: shared holders run together,
	               an exclusive holder runs alone
	--xact         hold a transaction-scoped lock in a transaction that stays
	               open while COMMAND runs (a pooler in transaction mode, such
	               as PgBouncer's, keeps it); for COMMAND it is like the default
	--kill-after D after a lost lock's SIGTERM, send SIGKILL if COMMAND is still
	               running after D (default 10s; 0: never)

COMMAND runs with pglock's standard input, output and error. SIGINT,
SIGTERM and SIGHUP sent to pglock are forwarded to it, and pglock waits for
COMMAND. At a terminal, in the foreground, COMMAND stays in pglock's process
group, as under flock(1): it may read the terminal, and Ctrl-C reaches it
once, from the terminal. Otherwise it runs in a process group of its own,
which gets the signals. If the lock is lost while COMMAND runs (the
connection dies, or the server ends the session), pglock sends SIGTERM to
COMMAND, waits for it, and exits 70; its line says the connection "ended",
or "stopped answering" when the server or the network went silent (a ping
got no answer in time).

On Linux, if pglock itself dies while COMMAND runs (kill -9, a crash), which
ends its session and frees the lock, the kernel sends SIGTERM to COMMAND
(a parent death signal): to COMMAND alone, not to its process group, and
never SIGKILL. Elsewhere COMMAND goes on running then.

Exit status: COMMAND's status (128+N if a signal N killed it); 75 when the
lock is busy; 70 when the lock was lost; 2 for a usage error or when the
database cannot be reached; 126 or 127 when COMMAND cannot be run or is not
found; 128+N when signal N interrupted the wait for the lock.
`

// runOptions are the flags of "pglock run".
type runOptions struct {
	wait      time.Duration // 0 with hasWait: do not wait
	hasWait   bool
	shared    bool
	xact      bool
	killAfter time.Duration
}

func (c *cli) runCommand(ctx context.Context, url string, args []string) int {
	fset := flag.NewFlagSet("run", flag.ContinueOnError)
	fset.StringVar(&url, "database-url", url, "PostgreSQL connection URL or DSN")
	wait := fset.Duration("wait", 0, "wait at most this long for the lock, then exit 75")
	noWait := fset.Bool("no-wait", false, "exit 75 at once if the lock is held elsewhere")
	shared := fset.Bool("shared", false, "take the lock in shared mode")
	xact := fset.Bool("xact", false, "hold a transaction-scoped lock in an open transaction")
	killAfter := fset.Duration("kill-after", 10*time.Second, "after a lost lock's SIGTERM, SIGKILL COMMAND after this long (0: never)")
	if code, done := c.parse(fset, args, runUsage); done {
		return code
	}
	set := map[string]bool{}
	fset.Visit(func(f *flag.Flag) { set[f.Name] = true })
	opts := runOptions{wait: *wait, hasWait: set["wait"] || *noWait, shared: *shared, xact: *xact, killAfter: *killAfter}
	switch {
	case set["wait"] && *noWait:
		return c.usageError("run", "--wait and --no-wait exclude each other")
	case *wait < 0:
		return c.usageError("run", "--wait %v is negative", *wait)
	case *killAfter < 0:
		return c.usageError("run", "--kill-after %v is negative", *killAfter)
	}

	rest := fset.Args()
	switch {
	case len(rest) == 0:
		return c.usageError("run", "missing KEY and -- COMMAND")
	case len(rest) == 1 && rest[0] == "--":
		return c.usageError("run", "missing KEY before --")
	case len(rest) == 1:
		return c.usageError("run", "missing -- COMMAND after KEY")
	case rest[1] != "--" && strings.HasPrefix(rest[1], "-"):
		return c.usageError("run", "flag %s after KEY: put flags before KEY, and -- between KEY and COMMAND", rest[1])
	case rest[1] != "--":
		return c.usageError("run", "missing -- between KEY and COMMAND")
	case len(rest) == 2:
		return c.usageError("run", "missing command after --")
	case rest[0] == "":
		return c.usageError("run", "empty KEY")
	}
	return c.runLocked(ctx, url, rest[0], rest[2:], opts)
}

// runLocked takes the lock on name, runs argv while holding it, and
// releases it.
func (c *cli) runLocked(ctx context.Context, url, name string, argv []string, opts runOptions) int {
	cause := newLostCause()
	lockOpts := []pglock.Option{
		pglock.WithLostCheckInterval(lostCheckInterval),
		pglock.WithObserver(func(e pglock.Event) {
			if e.Kind == pglock.EventLost {
				cause.set(e.Err)
			}
		}),
	}
	if opts.shared {
		lockOpts = append(lockOpts, pglock.WithMode(pglock.Shared))
	}
	if opts.xact {
		lockOpts = append(lockOpts, pglock.WithScope(pglock.Transaction))
	}
	if opts.wait > 0 {
		lockOpts = append(lockOpts, pglock.WithWait(opts.wait))
	}
	key, err := pglock.KeyOf(name)
	if err != nil {
		return c.usageError("run", "%v", err)
	}
	label := fmt.Sprintf("%q (%s)", name, key)

	// Connect and take the lock; a signal stops either.
	ictx, stop := c.interruptible(ctx)
	pool, err := connect(ictx, url)
	if err != nil {
		if s := stop(); s != nil {
			return c.fail(signalStatus(s), "run", "%v before the lock on %s was taken", s, label)
		}
		return c.fail(exitUsage, "run", "%v", err)
	}
	defer pool.Close()
	lock, err := pglock.NewLock(pool, key, lockOpts...)
	if err != nil {
		stop()
		return c.fail(exitUsage, "run", "%v", errText(err))
	}
	var ok bool
	if opts.hasWait && opts.wait == 0 {
		ok, err = lock.TryAcquire(ictx)
	} else {
		err = lock.Acquire(ictx)
		ok = err == nil
	}
	if s := stop(); s != nil {
		if ok {
			_ = lock.Release(context.Background())
		}
		return c.fail(signalStatus(s), "run", "%v while waiting for the lock on %s", s, label)
	}
	switch {
	case err != nil && opts.wait > 0 && errors.Is(err, context.DeadlineExceeded):
		return c.fail(exitBusy, "run", "lock %s still held elsewhere after %v", label, opts.wait)
	case err != nil && errors.Is(err, pglock.ErrTransactionPooler):
		return c.fail(exitUsage, "run", "%s", poolerAdvice(label, err, opts.xact))
	case err != nil:
		return c.fail(exitUsage, "run", "%v", errText(err))
	case !ok:
		return c.fail(exitBusy, "run", "lock %s is held elsewhere", label)
	}

	// Held: run the command.
	lost := lock.Lost()
	stopWatch := func() {}
	if opts.xact {
		// pglock watches only session locks on a pool: check the
		// transaction's connection here, since nobody else uses it.
		lost, stopWatch = watchTx(lock, lostCheckInterval, pglock.DefaultReleaseTimeout, cause)
	}
	status, lostWhileRunning := c.runChild(ctx, argv, lost, cause, label, opts.killAfter)
	stopWatch()
	err = lock.Release(context.Background())
	switch {
	case err != nil && errors.Is(err, pglock.ErrLockLost):
		if !lostWhileRunning {
			c.fail(0, "run", "lock %s was lost before %s ended (%s)", label, argv[0], lostReason(err))
		}
		return exitLost
	case err != nil:
		// The session ends when the pool closes, which frees the lock.
		c.fail(0, "run", "warning: %v", errText(err))
	}
	if lostWhileRunning {
		return exitLost
	}
	return status
}

// runChild runs argv and returns its exit status. It forwards c.signals to
// it, sends it SIGTERM when lost closes (then SIGKILL after killAfter), and
// reports whether lost closed; cause says why it closed. On Linux argv
// also gets SIGTERM from the kernel if pglock dies while it runs.
func (c *cli) runChild(ctx context.Context, argv []string, lost <-chan struct{}, cause *lostCause, label string, killAfter time.Duration) (status int, wasLost bool) {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, c.stdout, c.stderr
	cmd.WaitDelay = waitDelay
	job := startJob(cmd, os.Stdin)
	setParentDeathSignal(cmd)
	exited, err := startLocked(cmd)
	if err != nil {
		code := exitNoExec
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, fs.ErrNotExist) {
			code = exitNotFound
		}
		return c.fail(code, "run", "%v", err), false
	}

	done := ctx.Done()
	var kill <-chan time.Time
	terminate := func(why string) {
		c.fail(0, "run", "%s: sending SIGTERM to %s", why, argv[0])
		_ = job.signal(cmd, syscall.SIGTERM)
		if killAfter > 0 && kill == nil {
			kill = time.After(killAfter)
		}
	}
	var waitErr error
loop:
	for {
		select {
		case waitErr = <-exited:
			break loop
		case s := <-c.signals:
			if job.forward(s) {
				_ = job.signal(cmd, s)
			}
		case <-lost:
			lost, wasLost = nil, true
			terminate("lock " + label + " lost (" + cause.reason(lostCauseWait) + ")")
		case <-done:
			done = nil
			terminate("stopping")
		case <-kill:
			c.fail(0, "run", "%s still running %v after SIGTERM: sending SIGKILL", argv[0], killAfter)
			_ = job.signal(cmd, syscall.SIGKILL)
		}
	}
	select {
	case <-lost: // lost as the command ended: it may have run unprotected
		wasLost = true
		c.fail(0, "run", "lock %s lost (%s)", label, cause.reason(lostCauseWait))
	default:
	}
	return exitStatus(cmd, waitErr), wasLost
}

// startLocked starts cmd on a goroutine locked to its OS thread, which then
// waits for cmd and unlocks the thread only once cmd has exited. Linux sends
// the parent death signal (setParentDeathSignal) when the thread that
// started the child exits, not the process; Go ends a thread when a
// goroutine locked to it returns without unlocking it, which any code in the
// process may do on any thread that is not locked to another goroutine. It
// returns Start's error, or a channel that gets Wait's.
func startLocked(cmd *exec.Cmd) (<-chan error, error) {
	started := make(chan error, 1)
	exited := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		exited <- cmd.Wait()
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return exited, nil
}

// lostCause keeps the error with which a held lock's connection was lost,
// set by the Lock's observer (EventLost) or by the --xact watch.
type lostCause struct {
	once sync.Once
	done chan struct{} // closed by set
	err  error
}

// newLostCause returns a lostCause that nothing has set yet.
func newLostCause() *lostCause { return &lostCause{done: make(chan struct{})} }

// set records err; only the first call counts.
func (lc *lostCause) set(err error) {
	lc.once.Do(func() {
		lc.err = err
		close(lc.done)
	})
}

// reason is lostReason of the recorded error, waiting up to d for it (the
// Lock closes Lost() just before it tells its observer why); without it,
// the connection "ended".
func (lc *lostCause) reason(d time.Duration) string {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-lc.done:
		return lostReason(lc.err)
	case <-t.C:
		return lostReason(nil)
	}
}

// lostReason says, for the line about a lost lock, what happened to its
// connection, given the error with which it was lost: a timeout (the watch's
// ping or a read got no answer in time, TCP keepalives went unanswered)
// means the server or the network went silent and the connection "stopped
// answering"; any other error (the server closed the session, a reset) means
// it "ended".
func lostReason(err error) string {
	if silent(err) {
		return "its database connection stopped answering"
	}
	return "its database connection ended"
}

// silent reports whether err is a timeout: a context deadline, an I/O
// deadline, or a net.Error whose Timeout() is true.
func silent(err error) bool {
	if err == nil {
		return false
	}
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// poolerAdvice is the line for a lock refused because a transaction pooler
// stands between pglock and the server (pglock.ErrTransactionPooler). The
// library's error advises its users to take Transaction scope; the command's
// way to do that is --xact. With --xact given, the pooler refused the
// transaction block too (statement pooling): its detail says what works.
func poolerAdvice(label string, err error, xact bool) string {
	// What pglock saw, without the sentinel's advice to library users.
	detail := errText(err)
	if _, after, ok := strings.Cut(err.Error(), pglock.ErrTransactionPooler.Error()); ok {
		detail = strings.TrimPrefix(after, ": ")
	}
	if xact {
		return fmt.Sprintf("lock %s not taken: %s", label, detail)
	}
	line := fmt.Sprintf("lock %s not taken: a transaction pooler (such as PgBouncer with pool_mode = transaction)"+
		" is between pglock and the server, where a session lock does not hold: use --xact (a transaction lock, held"+
		" in a transaction kept open while COMMAND runs), a session pooler or a direct connection", label)
	if detail != "" {
		line += " (" + detail + ")"
	}
	return line
}

// errText is err's message without the "pglock: " that the pglock
// package starts its errors with: pglock's own lines already say it.
func errText(err error) string {
	return strings.TrimPrefix(err.Error(), "pglock: ")
}

// exitStatus is the status a shell would report for the finished command.
func exitStatus(cmd *exec.Cmd, waitErr error) int {
	ps := cmd.ProcessState
	if ps == nil {
		return 1
	}
	if s, ok := killedBy(ps); ok {
		return exitSignal + int(s)
	}
	if code := ps.ExitCode(); code >= 0 {
		return code
	}
	if waitErr != nil {
		return 1
	}
	return 0
}
