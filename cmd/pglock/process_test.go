//go:build unix

package main

import (
	"errors"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
)

// These tests run pglock as a process of its own (this test binary acting
// as the command), to send it real signals.

// waitProcess waits for the pglock process and returns its exit status.
func waitProcess(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatal(err)
		}
		return cmd.ProcessState.ExitCode()
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		t.Fatal("pglock did not exit within 60s")
		return -1
	}
}

// kill -TERM (or -HUP) <pglock> reaches the command; pglock exits with its
// status.
func TestProcessForwardsSignals(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	for _, tc := range []struct {
		sig  syscall.Signal
		trap string
	}{
		{syscall.SIGTERM, "TERM"},
		{syscall.SIGHUP, "HUP"},
	} {
		t.Run(tc.trap, func(t *testing.T) {
			t.Parallel()
			if signal.Ignored(tc.sig) {
				t.Skipf("%v is ignored by this process (nohup?): pglock leaves it ignored", tc.sig)
			}
			name := pgtest.UniqueKey(t)
			g := newGate(t)
			cmd, stdout, stderr := commandProcess(t,
				append([]string{"run", name, "--"}, g.command(`trap "echo got; exit 7" `+tc.trap+`; `, waitLoop)...)...)
			g.waitStarted(t, nil)
			if err := cmd.Process.Signal(tc.sig); err != nil {
				t.Fatal(err)
			}
			if code := waitProcess(t, cmd); code != 7 || stdout.String() != "got\n" {
				t.Fatalf("pglock after %v = %d, stdout %q, stderr %q; want 7 and got", tc.sig, code, stdout, stderr)
			}
			pgtest.WaitFree(t, watch, keyOf(t, name))
		})
	}
}

// Terminating the lock's backend makes pglock SIGTERM the command and exit 70.
func TestProcessLostLock(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	key := keyOf(t, name)
	g := newGate(t)
	cmd, stdout, stderr := commandProcess(t,
		append([]string{"run", name, "--"}, g.command(`trap "echo got-term; exit 9" TERM; `, waitLoop)...)...)
	g.waitStarted(t, nil)
	pgtest.Terminate(t, watch, grantedPID(t, watch, key))
	if code := waitProcess(t, cmd); code != exitLost || stdout.String() != "got-term\n" {
		t.Fatalf("pglock after its backend was terminated = %d, stdout %q, stderr %q; want 70", code, stdout, stderr)
	}
	if !strings.Contains(stderr.String(), "lost") {
		t.Fatalf("stderr = %q, want it to say the lock was lost", stderr)
	}
	pgtest.WaitFree(t, watch, key)
}

// Busy with --no-wait: 75 and one line, as a process too.
func TestProcessNoWaitBusy(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	l, _ := holder(t, watch, name)
	cmd, stdout, stderr := commandProcess(t, "run", "--no-wait", name, "--", "echo", "ran")
	if code := waitProcess(t, cmd); code != exitBusy || stdout.String() != "" {
		t.Fatalf("pglock run --no-wait while held = %d, stdout %q", code, stdout)
	}
	assertOneLine(t, "stderr", stderr.String())
	if err := l.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, l.Key())
}

// A signal ignored when pglock starts (here SIGHUP, as under nohup) stays
// ignored for the command: it survives a SIGHUP it sends itself.
func TestProcessKeepsIgnoredSignals(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	// sh ignores SIGHUP, then becomes pglock.
	cmd, stdout, stderr := commandProcess(t, "sh", "-c", `trap "" HUP; exec "$0" "$@"`,
		"run", name, "--", "sh", "-c", `kill -HUP $$; echo survived`)
	if code := waitProcess(t, cmd); code != 0 || stdout.String() != "survived\n" {
		t.Fatalf("pglock started with SIGHUP ignored = %d, stdout %q, stderr %q; want 0 and survived", code, stdout, stderr)
	}
	pgtest.WaitFree(t, watch, keyOf(t, name))
}
