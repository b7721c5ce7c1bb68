package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// asCommand makes the test binary act as the pglock command: tests that
// need a real process (signals sent to it) run os.Args[0] with this set,
// so the command under test is this package's main, built with the test's
// flags (-race included).
const asCommand = "PGLOCK_CMD_TEST_AS_COMMAND"

func TestMain(m *testing.M) {
	if os.Getenv(asCommand) == "1" {
		main()
		return
	}
	pgtest.Main(m)
}

// syncBuffer is a bytes.Buffer that a command's output copier and a test
// may use at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// result is what one in-process run of the command produced.
type result struct {
	code           int
	stdout, stderr string
}

// pglockRun runs the command in-process with args.
func pglockRun(t *testing.T, args ...string) result {
	t.Helper()
	return pglockRunSignals(t, nil, args...)
}

func pglockRunSignals(t *testing.T, signals <-chan os.Signal, args ...string) result {
	t.Helper()
	var stdout, stderr syncBuffer
	code := run(context.Background(), args, &stdout, &stderr, signals)
	return result{code, stdout.String(), stderr.String()}
}

// started runs pglockRun in a goroutine; the result arrives on the channel.
func started(t *testing.T, signals <-chan os.Signal, args ...string) <-chan result {
	t.Helper()
	ch := make(chan result, 1)
	go func() {
		var stdout, stderr syncBuffer
		code := run(context.Background(), args, &stdout, &stderr, signals)
		ch <- result{code, stdout.String(), stderr.String()}
	}()
	return ch
}

// await returns the result of a started run, failing after d.
func await(t *testing.T, ch <-chan result, d time.Duration) result {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(d):
		t.Fatalf("pglock did not return within %v", d)
		return result{}
	}
}

// oneLine fails the test unless s is exactly one line.
func assertOneLine(t *testing.T, what, s string) {
	t.Helper()
	if !strings.HasSuffix(s, "\n") || strings.Count(s, "\n") != 1 {
		t.Fatalf("%s = %q, want exactly one line", what, s)
	}
}

// gate is a child command that touches a file when it starts and then
// waits until the test opens the gate.
type gate struct {
	dir string
}

func newGate(t *testing.T) *gate { return &gate{dir: t.TempDir()} }

func (g *gate) startedFile() string { return filepath.Join(g.dir, "started") }
func (g *gate) openFile() string    { return filepath.Join(g.dir, "open") }

// command returns a child command (sh) that runs setup (traps), touches
// the started file and runs script; $2 is the open file.
func (g *gate) command(setup, script string) []string {
	return []string{"sh", "-c", setup + `touch "$1"; ` + script, "sh", g.startedFile(), g.openFile()}
}

// waitLoop is the script of a child that waits for the gate to open.
const waitLoop = `while [ ! -e "$2" ]; do sleep 0.02; done`

// waitStarted waits until the child touched the started file.
func (g *gate) waitStarted(t *testing.T, running <-chan result) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(g.startedFile()); err == nil {
			return
		}
		select {
		case r := <-running:
			t.Fatalf("pglock returned before the command started: %+v", r)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the command did not start within 30s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (g *gate) open(t *testing.T) {
	t.Helper()
	if err := os.WriteFile(g.openFile(), nil, 0o644); err != nil {
		t.Fatal(err)
	}
}

// keyOf is pglock.KeyOf for a string.
func keyOf(t *testing.T, name string) pglock.Key {
	t.Helper()
	k, err := pglock.KeyOf(name)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// holder takes name's lock with the library on its own pool and returns
// the lock (release it) and the holding backend's pid.
func holder(t *testing.T, watch *pgxpool.Pool, name string, opts ...pglock.Option) (*pglock.Lock, int32) {
	t.Helper()
	pool := pgtest.Pool(t, 2)
	l, err := pglock.NewLock(pool, name, opts...)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Release(context.Background()) })
	return l, grantedPID(t, watch, l.Key())
}

// grantedPID returns the one pid that holds key.
func grantedPID(t *testing.T, watch *pgxpool.Pool, key pglock.Key) int32 {
	t.Helper()
	hs := pgtest.Granted(t, watch, key)
	if len(hs) != 1 {
		t.Fatalf("holders of %s = %+v, want one", key, hs)
	}
	return hs[0].PID
}

// waitWaiter waits until some session waits for key.
func waitWaiter(t *testing.T, watch *pgxpool.Pool, key pglock.Key) pgtest.Holder {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		hs, err := pgtest.Holders(context.Background(), watch, key)
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range hs {
			if !h.Granted {
				return h
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("nobody waits for %s after 30s: %+v", key, hs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// commandProcess returns the pglock command as a real process: this test
// binary, acting as the command. With "sh", "-c", SCRIPT first, it runs
// sh -c SCRIPT PGLOCK ARGS... instead: SCRIPT's "$0" "$@" is the command.
func commandProcess(t *testing.T, args ...string) (*exec.Cmd, *syncBuffer, *syncBuffer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	if len(args) > 2 && args[0] == "sh" && args[1] == "-c" {
		cmd = exec.Command("sh", append([]string{"-c", args[2], os.Args[0]}, args[3:]...)...)
	}
	cmd.Env = append(os.Environ(), asCommand+"=1")
	var stdout, stderr syncBuffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	return cmd, &stdout, &stderr
}
