package pglock_test

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Tests that run processes (deadlocks, semaphores and key sets across
// processes) run this test binary again as their children.

// child is a child process, its stdin, the lines it prints and its
// stderr.
type child struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string
	stderr *lockedBuilder
}

// startChild runs this test binary's test named test as a child process with
// env added to the parent's environment; the child is killed when the test
// ends, if it has not exited.
func startChild(t *testing.T, test string, env ...string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.timeout=2m")
	cmd.Env = append(os.Environ(), env...)
	p := &child{cmd: cmd, lines: make(chan string, 64), stderr: &lockedBuilder{}}
	cmd.Stderr = p.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if p.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	go func() {
		defer close(p.lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
	}()
	return p
}

// send writes line to the child's stdin.
func (p *child) send(t *testing.T, line string) {
	t.Helper()
	if _, err := io.WriteString(p.stdin, line+"\n"); err != nil {
		t.Fatalf("child %d: %v: %s", p.cmd.Process.Pid, err, p.stderr.String())
	}
}

// next returns the child's next line that starts with prefix (others are
// skipped: the test binary's own lines); a line "error ..." from the child,
// its exit, or 120 s without the line (a loaded machine) fail the test.
func (p *child) next(t *testing.T, prefix string) string {
	t.Helper()
	timer := time.NewTimer(120 * time.Second)
	defer timer.Stop()
	for {
		select {
		case line, ok := <-p.lines:
			if !ok {
				t.Fatalf("child %d exited before %q: stderr: %s", p.cmd.Process.Pid, prefix, p.stderr.String())
			}
			if strings.HasPrefix(line, "error ") {
				t.Fatalf("child %d: %s: stderr: %s", p.cmd.Process.Pid, line, p.stderr.String())
			}
			if strings.HasPrefix(line, prefix) {
				return line
			}
		case <-timer.C:
			t.Fatalf("child %d did not say %q within 120 s: stderr: %s", p.cmd.Process.Pid, prefix, p.stderr.String())
		}
	}
}

// end closes the child's stdin (which tells it to close its Locker and
// exit), reads the rest of its output and waits for it: a child that fails
// (a race the detector saw, a leaked goroutine) fails the test.
func (p *child) end(t *testing.T) {
	t.Helper()
	_ = p.stdin.Close()
	timer := time.NewTimer(30 * time.Second)
	defer timer.Stop()
	var rest []string
	for done := false; !done; {
		select {
		case line, ok := <-p.lines:
			if !ok {
				done = true
				break
			}
			rest = append(rest, line)
		case <-timer.C:
			t.Fatalf("child %d did not exit within 30 s of its stdin's close", p.cmd.Process.Pid)
		}
	}
	if err := p.cmd.Wait(); err != nil {
		t.Errorf("child %d: %v: stdout: %s: stderr: %s", p.cmd.Process.Pid, err, strings.Join(rest, "\n"), p.stderr.String())
	}
}

// p24Child is the setting-up of a child: its Locker, on a pool of its own,
// closed (Locker first) by the returned func. Errors end the child with an
