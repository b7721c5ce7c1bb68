//go:build linux

package main

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/pglockkit/kit/internal/pgtest"
)

// These tests run pglock as a real process whose standard input, output
// and error are a pseudo-terminal, its controlling terminal, as in an
// interactive shell: pglock is in the terminal's foreground process group.

// openPty opens a pseudo-terminal pair (posix_openpt, unlockpt, ptsname).
func openPty(t *testing.T) (master, slave *os.File) {
	t.Helper()
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	t.Cleanup(func() { master.Close() })
	ioctl := func(req uintptr, arg *int32) error {
		sc, err := master.SyscallConn()
		if err != nil {
			return err
		}
		var errno syscall.Errno
		if err := sc.Control(func(fd uintptr) {
			_, _, errno = syscall.Syscall(syscall.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(arg)))
		}); err != nil {
			return err
		}
		if errno != 0 {
			return errno
		}
		return nil
	}
	unlock := int32(0)
	if err := ioctl(syscall.TIOCSPTLCK, &unlock); err != nil {
		t.Skipf("unlockpt: %v", err)
	}
	var n int32
	if err := ioctl(syscall.TIOCGPTN, &n); err != nil {
		t.Skipf("ptsname: %v", err)
	}
	slave, err = os.OpenFile("/dev/pts/"+strconv.Itoa(int(n)), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("open the pty's slave: %v", err)
	}
	return master, slave
}

// ttyProcess starts pglock with args in a session of its own whose
// controlling terminal is a new pty; the pty's output (pglock's and
// COMMAND's standard output and error) collects in the returned buffer.
// Write to master to type at the terminal.
func ttyProcess(t *testing.T, args ...string) (cmd *exec.Cmd, master *os.File, out *syncBuffer) {
	t.Helper()
	return ttyProcessSized(t, 0, 0, args...)
}

// ttyProcessSized is ttyProcess on a terminal of cols x rows characters
// (0 x 0: a new pty's size, which says nothing).
func ttyProcessSized(t *testing.T, cols, rows uint16, args ...string) (cmd *exec.Cmd, master *os.File, out *syncBuffer) {
	t.Helper()
	master, slave := openPty(t)
	if cols > 0 || rows > 0 {
		ws := struct{ Row, Col, Xpixel, Ypixel uint16 }{Row: rows, Col: cols}
		if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, slave.Fd(), syscall.TIOCSWINSZ, uintptr(unsafe.Pointer(&ws))); errno != 0 {
			t.Fatalf("TIOCSWINSZ: %v", errno)
		}
	}
	cmd = exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), asCommand+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	slave.Close()
	out = new(syncBuffer)
	copied := make(chan struct{})
	ttyDrained.Store(out, copied)
	go func() {
		defer close(copied)
		buf := make([]byte, 4096)
		for {
			n, err := master.Read(buf)
			out.Write(buf[:n])
			if err != nil {
				return // EIO once every slave is closed, or master closed
			}
		}
	}()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
		master.Close()
		<-copied
	})
	return cmd, master, out
}

// ttyDrained maps the output buffer of each ttyProcess to a channel closed
// once its copier has read the terminal to the end (EIO: every slave closed).
var ttyDrained sync.Map

// waitTTYProcess waits up to d for pglock and returns its exit status, or
// kills it and fails. Once pglock has exited, it also waits for out to hold
// everything written to the terminal: the copier reads the pty on its own,
// and on a loaded machine it may not yet have read COMMAND's last lines
// when pglock's exit is seen.
func waitTTYProcess(t *testing.T, cmd *exec.Cmd, out *syncBuffer, d time.Duration) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatal(err)
		}
		if c, ok := ttyDrained.Load(out); ok {
			select {
			case <-c.(chan struct{}):
			case <-time.After(30 * time.Second): // a grandchild keeps the terminal open; check what there is
			}
		}
		return cmd.ProcessState.ExitCode()
	case <-time.After(d):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("pglock did not exit within %v (COMMAND stopped by SIGTTIN?); terminal output %q", d, out)
		return -1
	}
}

// waitOutput waits until the terminal shows s.
func waitOutput(t *testing.T, out *syncBuffer, s string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(out.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("the terminal did not show %q within 30s: %q", s, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A COMMAND that reads the terminal gets what is typed, as under flock(1):
// it is not stopped by SIGTTIN, and pglock does not hang holding the lock.
func TestTTYCommandReadsTerminal(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	cmd, master, out := ttyProcess(t, "run", "--no-wait", name, "--",
		"sh", "-c", `echo ready; read x; echo "got $x"`)
	waitOutput(t, out, "ready")
	if _, err := master.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	if code := waitTTYProcess(t, cmd, out, 20*time.Second); code != 0 || !strings.Contains(out.String(), "got hello") {
		t.Fatalf("pglock run sh -c 'read x' at a terminal = %d, terminal output %q; want 0 and got hello", code, out)
	}
	pgtest.WaitFree(t, watch, keyOf(t, name))
}

// Ctrl-C at the terminal reaches COMMAND once (the terminal delivers it;
// pglock does not send it again), and pglock exits 130 when COMMAND dies
// of it.
func TestTTYCtrlCReachesCommandOnce(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	// COMMAND counts the SIGINTs it receives for a second after the first,
	// prints the count, then dies of SIGINT. It takes them with
	// sigwaitinfo, which wakes at once: a second SIGINT sent by pglock
	// after the terminal's arrives after the first was taken, and counts.
	// (A shell's trap would merge two SIGINTs that arrive close together.)
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not found: it counts COMMAND's SIGINTs")
	}
	const script = `
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
print("ready", flush=True)
n = 1 if signal.sigwaitinfo({signal.SIGINT}) else 0
while signal.sigtimedwait({signal.SIGINT}, 1.0) is not None:
    n += 1
print("ints=%d" % n, flush=True)
signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
os.kill(os.getpid(), signal.SIGINT)
`
	cmd, master, out := ttyProcess(t, "run", "--no-wait", name, "--", python, "-c", script)
	waitOutput(t, out, "ready")
	if _, err := master.Write([]byte{0x03}); err != nil { // Ctrl-C
		t.Fatal(err)
	}
	code := waitTTYProcess(t, cmd, out, 30*time.Second)
	if code != exitSignal+int(syscall.SIGINT) || !strings.Contains(out.String(), "ints=1") {
		t.Fatalf("pglock after Ctrl-C = %d, terminal output %q; want 130 and ints=1", code, out)
	}
	pgtest.WaitFree(t, watch, keyOf(t, name))
}

// At a terminal COMMAND shares pglock's process group, yet a SIGTERM sent
// to pglock still reaches it (sent to COMMAND alone), and so does the
// SIGTERM of a lost lock: pglock exits 70.
func TestTTYSignalsStillForwarded(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	t.Run("kill", func(t *testing.T) {
		t.Parallel()
		name := pgtest.UniqueKey(t)
		cmd, _, out := ttyProcess(t, "run", name, "--",
			"sh", "-c", `trap "echo got-term; exit 7" TERM; echo ready; while :; do sleep 0.05; done`)
		waitOutput(t, out, "ready")
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if code := waitTTYProcess(t, cmd, out, 30*time.Second); code != 7 || !strings.Contains(out.String(), "got-term") {
			t.Fatalf("pglock after SIGTERM = %d, terminal output %q; want 7 and got-term", code, out)
		}
		pgtest.WaitFree(t, watch, keyOf(t, name))
	})
	t.Run("lost", func(t *testing.T) {
		t.Parallel()
		name := pgtest.UniqueKey(t)
		key := keyOf(t, name)
		cmd, _, out := ttyProcess(t, "run", name, "--",
			"sh", "-c", `trap "echo got-term; exit 9" TERM; echo ready; while :; do sleep 0.05; done`)
		waitOutput(t, out, "ready")
		pgtest.Terminate(t, watch, grantedPID(t, watch, key))
		if code := waitTTYProcess(t, cmd, out, 30*time.Second); code != exitLost || !strings.Contains(out.String(), "got-term") {
			t.Fatalf("pglock after its backend was terminated = %d, terminal output %q; want 70 and got-term", code, out)
		}
		pgtest.WaitFree(t, watch, key)
	})
}
