//go:build unix

package main

import (
	"context"
	"errors"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
)

// The command's status is pglock's status, whatever it is.
func TestRunExitStatus(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	for _, tc := range []struct {
		name string
		argv []string
		want int
	}{
		{"zero", []string{"true"}, 0},
		{"three", []string{"sh", "-c", "exit 3"}, 3},
		{"killed", []string{"sh", "-c", "kill -KILL $$"}, 128 + 9},
		{"not found", []string{"pglock-test-no-such-command"}, 127},
		{"not executable", []string{os.DevNull}, 126},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			name := pgtest.UniqueKey(t)
			r := pglockRun(t, append([]string{"run", name, "--"}, tc.argv...)...)
			if r.code != tc.want {
				t.Fatalf("pglock run -- %v = %d, want %d (stderr %q)", tc.argv, r.code, tc.want, r.stderr)
			}
			if tc.want >= 126 && tc.want <= 127 {
				assertOneLine(t, "stderr", r.stderr)
			} else if r.stderr != "" {
				t.Fatalf("stderr = %q, want nothing", r.stderr)
			}
			pgtest.WaitFree(t, watch, keyOf(t, name))
		})
	}
}

// While another session holds the key, --no-wait exits 75 with one line
// and does not run the command; once it is free, the command runs.
func TestRunNoWaitBusy(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	l, _ := holder(t, watch, name) // the library, same name: same key

	r := pglockRun(t, "run", "--no-wait", name, "--", "sh", "-c", "echo ran")
	if r.code != exitBusy || r.stdout != "" {
		t.Fatalf("run --no-wait while held = %+v, want 75 and no output", r)
	}
	assertOneLine(t, "stderr", r.stderr)
	if !strings.Contains(r.stderr, "held elsewhere") || !strings.Contains(r.stderr, l.Key().String()) {
		t.Fatalf("stderr = %q, want the key and 'held elsewhere'", r.stderr)
	}
	for _, flags := range [][]string{{"--no-wait", "--xact"}, {"--no-wait", "--shared"}, {"--wait", "0"}} {
		args := append(append([]string{"run"}, flags...), name, "--", "sh", "-c", "echo ran")
		if r := pglockRun(t, args...); r.code != exitBusy || r.stdout != "" {
			t.Fatalf("pglock %q while held = %+v, want 75", args, r)
		}
	}
	if err := l.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	r = pglockRun(t, "run", "--no-wait", name, "--", "sh", "-c", "echo ran")
	if r.code != 0 || r.stdout != "ran\n" || r.stderr != "" {
		t.Fatalf("run --no-wait when free = %+v", r)
	}
	pgtest.WaitFree(t, watch, l.Key())
}

// --wait D gives up with 75 after D; without it, pglock waits for the
// holder and then runs the command.
func TestRunWait(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	l, _ := holder(t, watch, name)

	start := time.Now()
	r := pglockRun(t, "run", "--wait", "300ms", name, "--", "sh", "-c", "echo ran")
	took := time.Since(start)
	if r.code != exitBusy || r.stdout != "" {
		t.Fatalf("run --wait 300ms while held = %+v", r)
	}
	assertOneLine(t, "stderr", r.stderr)
	if took < 300*time.Millisecond || took > 15*time.Second {
		t.Fatalf("run --wait 300ms took %v", took)
	}

	g := newGate(t)
	running := started(t, nil, append([]string{"run", name, "--"}, g.command("", "echo ran")...)...)
	waitWaiter(t, watch, l.Key())
	if _, err := os.Stat(g.startedFile()); err == nil {
		t.Fatal("the command started while the lock was held elsewhere")
	}
	if err := l.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	r = await(t, running, 30*time.Second)
	if r.code != 0 || r.stdout != "ran\n" {
		t.Fatalf("run after the holder released = %+v", r)
	}
	pgtest.WaitFree(t, watch, l.Key())
}

// The lock is held, by a session named "pglock", exactly while the
// command runs; a second pglock run is refused meanwhile.
func TestRunHoldsLockWhileCommandRuns(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	key := keyOf(t, name)
	g := newGate(t)
	running := started(t, nil, append([]string{"run", name, "--"}, g.command("", waitLoop)...)...)
	g.waitStarted(t, running)

	hs := pgtest.Granted(t, watch, key)
	if len(hs) != 1 || hs[0].Mode != "ExclusiveLock" {
		t.Fatalf("holders while the command runs = %+v", hs)
	}
	var app string
	if err := watch.QueryRow(context.Background(),
		"SELECT application_name FROM pg_stat_activity WHERE pid = $1", hs[0].PID).Scan(&app); err != nil {
		t.Fatal(err)
	}
	if app != "pglock" {
		t.Fatalf("application_name = %q, want pglock", app)
	}
	if r := pglockRun(t, "run", "--no-wait", name, "--", "true"); r.code != exitBusy {
		t.Fatalf("second run --no-wait = %+v, want 75", r)
	}
	g.open(t)
	if r := await(t, running, 30*time.Second); r.code != 0 || r.stderr != "" {
		t.Fatalf("run = %+v", r)
	}
	pgtest.WaitFree(t, watch, key)
}

// Concurrent runs of one key never overlap: each command enters a critical
// section (mkdir fails if another is inside) and all of them succeed.
func TestRunMutualExclusion(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	for _, xact := range []bool{false, true} {
		name := pgtest.UniqueKey(t)
		inside := filepath.Join(t.TempDir(), "inside")
		script := `mkdir "$1" || exit 99; sleep 0.05; rmdir "$1"`
		args := []string{"run"}
		if xact {
			args = append(args, "--xact")
		}
		args = append(args, name, "--", "sh", "-c", script, "sh", inside)
		const n = 5
		var wg sync.WaitGroup
		results := make([]result, n)
		for i := range n {
			wg.Go(func() { results[i] = pglockRun(t, args...) })
		}
		wg.Wait()
		for i, r := range results {
			if r.code != 0 {
				t.Fatalf("xact=%v: run %d = %+v (99: two commands overlapped)", xact, i, r)
			}
		}
		pgtest.WaitFree(t, watch, keyOf(t, name))
	}
}

// --shared runs share the key; an exclusive run is refused meanwhile.
func TestRunShared(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	key := keyOf(t, name)
	g := newGate(t)
	running := started(t, nil, append([]string{"run", "--shared", name, "--"}, g.command("", waitLoop)...)...)
	g.waitStarted(t, running)
	if hs := pgtest.Granted(t, watch, key); len(hs) != 1 || hs[0].Mode != "ShareLock" {
		t.Fatalf("holders = %+v, want one ShareLock", hs)
	}
	if r := pglockRun(t, "run", "--shared", "--no-wait", name, "--", "true"); r.code != 0 {
		t.Fatalf("second shared run = %+v, want 0", r)
	}
	if r := pglockRun(t, "run", "--no-wait", name, "--", "true"); r.code != exitBusy {
		t.Fatalf("exclusive run while shared is held = %+v, want 75", r)
	}
	g.open(t)
	if r := await(t, running, 30*time.Second); r.code != 0 {
		t.Fatalf("run = %+v", r)
	}
	pgtest.WaitFree(t, watch, key)
}

// --xact holds the lock in an open transaction while the command runs,
// and passes the command's status on.
func TestRunXact(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	key := keyOf(t, name)
	g := newGate(t)
	running := started(t, nil, append([]string{"run", "--xact", name, "--"}, g.command("", waitLoop+"; exit 4")...)...)
	g.waitStarted(t, running)
	pid := grantedPID(t, watch, key)
	var inTx bool
	if err := watch.QueryRow(context.Background(),
		"SELECT xact_start IS NOT NULL FROM pg_stat_activity WHERE pid = $1", pid).Scan(&inTx); err != nil {
		t.Fatal(err)
	}
	if !inTx {
		t.Fatal("the --xact holder is not in a transaction")
	}
	if r := pglockRun(t, "run", "--no-wait", name, "--", "true"); r.code != exitBusy {
		t.Fatalf("run while --xact holds = %+v, want 75", r)
	}
	g.open(t)
	if r := await(t, running, 30*time.Second); r.code != 4 {
		t.Fatalf("run --xact = %+v, want 4", r)
	}
	pgtest.WaitFree(t, watch, key)
}

// Under --xact the transaction stays open, idle, while the command runs:
// pglock's pings keep idle_in_transaction_session_timeout from ending it.
func TestRunXactIdleTimeout(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	u, err := url.Parse(pgtest.URL(t))
	if err != nil {
		t.Skipf("DATABASE_URL is not a URL: %v", err)
	}
	q := u.Query()
	q.Set("idle_in_transaction_session_timeout", "1500")
	u.RawQuery = q.Encode()
	r := pglockRun(t, "run", "--xact", "--database-url", u.String(), name, "--", "sleep", "3")
	if r.code != 0 {
		t.Fatalf("run --xact with a 1.5s idle-in-transaction timeout = %+v, want 0", r)
	}
	pgtest.WaitFree(t, watch, keyOf(t, name))
}

// SIGTERM and SIGINT received by pglock reach the command, whose status
// pglock returns.
func TestRunForwardsSignals(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	for _, tc := range []struct {
		sig  syscall.Signal
		trap string
		want int
	}{
		{syscall.SIGTERM, "TERM", 7},
		{syscall.SIGINT, "INT", 8},
	} {
		t.Run(tc.trap, func(t *testing.T) {
			t.Parallel()
			if signal.Ignored(tc.sig) {
				t.Skipf("%v is ignored by this process (a background job?): its children cannot trap it", tc.sig)
			}
			name := pgtest.UniqueKey(t)
			g := newGate(t)
			sigs := make(chan os.Signal, 1)
			trap := `trap "echo got; exit ` + strconv.Itoa(tc.want) + `" ` + tc.trap + `; `
			running := started(t, sigs, append([]string{"run", name, "--"}, g.command(trap, waitLoop)...)...)
			g.waitStarted(t, running)
			sigs <- tc.sig
			r := await(t, running, 30*time.Second)
			if r.code != tc.want || r.stdout != "got\n" {
				t.Fatalf("run after %v = %+v, want %d and got", tc.sig, r, tc.want)
			}
			pgtest.WaitFree(t, watch, keyOf(t, name))
		})
	}
}

// A signal while pglock waits for the lock stops the wait: the command
// never runs, pglock exits 128+N, and it leaves no waiter behind.
func TestRunSignalWhileWaiting(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	l, _ := holder(t, watch, name)
	g := newGate(t)
	sigs := make(chan os.Signal, 1)
	running := started(t, sigs, append([]string{"run", name, "--"}, g.command("", "true")...)...)
	waitWaiter(t, watch, l.Key())
	sigs <- syscall.SIGINT
	r := await(t, running, 30*time.Second)
	if r.code != 128+2 {
		t.Fatalf("run interrupted while waiting = %+v, want 130", r)
	}
	assertOneLine(t, "stderr", r.stderr)
	if _, err := os.Stat(g.startedFile()); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("the command ran")
	}
	if err := l.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, l.Key())
}

// When the lock's backend is terminated, the command gets SIGTERM and
// pglock exits 70; with --kill-after, a command that ignores SIGTERM is
// killed.
func TestRunLostLock(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	for _, tc := range []struct {
		name   string
		flags  []string
		trap   string
		stdout string
	}{
		{"session", nil, `trap "echo got-term; exit 9" TERM; `, "got-term\n"},
		{"xact", []string{"--xact"}, `trap "echo got-term; exit 9" TERM; `, "got-term\n"},
		{"kill-after", []string{"--kill-after", "300ms"}, `trap "" TERM; `, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			name := pgtest.UniqueKey(t)
			key := keyOf(t, name)
			g := newGate(t)
			args := append(append([]string{"run"}, tc.flags...), name, "--")
			running := started(t, nil, append(args, g.command(tc.trap, waitLoop)...)...)
			g.waitStarted(t, running)
			pgtest.Terminate(t, watch, grantedPID(t, watch, key))
			start := time.Now()
			r := await(t, running, 30*time.Second)
			if r.code != exitLost || r.stdout != tc.stdout || !strings.Contains(r.stderr, "lost") {
				t.Fatalf("run after its backend was terminated = %+v, want 70 and %q", r, tc.stdout)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Fatalf("pglock took %v to notice the lost lock", d)
			}
			pgtest.WaitFree(t, watch, key)
		})
	}
}

// When ctx ends (run's stand-in for SIGTERM in-process), the command gets
// SIGTERM.
func TestRunContextEnds(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	g := newGate(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr syncBuffer
	done := make(chan int, 1)
	argv := append([]string{"run", name, "--"}, g.command(`trap "echo got; exit 5" TERM; `, waitLoop)...)
	go func() { done <- run(ctx, argv, &stdout, &stderr, nil) }()
	g.waitStarted(t, nil)
	cancel()
	select {
	case code := <-done:
		if code != 5 || stdout.String() != "got\n" {
			t.Fatalf("run after ctx ended = %d, %q, %q", code, stdout.String(), stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("run did not return after ctx ended")
	}
	pgtest.WaitFree(t, watch, keyOf(t, name))
}
