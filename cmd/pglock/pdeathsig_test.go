//go:build linux

package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
)

// pidScript is a COMMAND (sh -c pidScript sh FILE) that writes its pid and
// its parent's (pglock's) to FILE, then becomes sleep 60 under the same pid,
// without pglock's standard streams (the test's pipes, which would keep
// the test waiting for pglock until sleep ends).
const pidScript = `echo "$$ $PPID" > "$1.tmp" && mv "$1.tmp" "$1" && exec sleep 60 </dev/null >/dev/null 2>&1`

// readPids waits until COMMAND wrote file and became sleep, and returns its
// pid and its parent's.
func readPids(t *testing.T, file string) (pid, ppid int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, err := os.ReadFile(file)
		if err == nil {
			if _, err := fmt.Sscan(string(b), &pid, &ppid); err != nil {
				t.Fatalf("pid file %q: %v", b, err)
			}
			comm, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
			if strings.TrimSpace(string(comm)) == "sleep" {
				return pid, ppid
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("COMMAND did not write %s and exec sleep within 30s", file)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// processGone reports whether pid has exited: it is not in /proc, or it is
// a zombie that nobody reaped yet (an orphan's new parent need not reap it).
func processGone(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if errors.Is(err, os.ErrNotExist) {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	if err != nil || i < 0 || i+2 >= len(b) {
		return false
	}
	state := b[i+2]
	return state == 'Z' || state == 'X'
}

// waitGone waits up to d for pid to exit and fails the test if it does not
// (then kills it).
func waitGone(t *testing.T, pid int, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !processGone(pid) {
		if time.Now().After(deadline) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("COMMAND (pid %d) still runs %v after pglock was killed", pid, d)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// kill -9 <pglock> frees the lock (its session ends), and the kernel sends
// COMMAND SIGTERM (the parent death signal), so it does not run on
// unprotected.
func TestProcessKilledStopsCommand(t *testing.T) {
	t.Parallel()
	if signal.Ignored(syscall.SIGTERM) {
		t.Skip("SIGTERM is ignored by this process: COMMAND would inherit that")
	}
	watch := pgtest.Pool(t, 2)
	for _, flags := range [][]string{nil, {"--xact"}} {
		t.Run(strings.Join(append([]string{"run"}, flags...), " "), func(t *testing.T) {
			t.Parallel()
			name := pgtest.UniqueKey(t)
			key := keyOf(t, name)
			file := filepath.Join(t.TempDir(), "pid")
			args := append(append([]string{"run"}, flags...), name, "--", "sh", "-c", pidScript, "sh", file)
			cmd, _, stderr := commandProcess(t, args...)
			pid, ppid := readPids(t, file)
			t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
			if ppid != cmd.Process.Pid {
				t.Fatalf("COMMAND's parent is %d, want pglock, %d", ppid, cmd.Process.Pid)
			}
			grantedPID(t, watch, key)

			if err := cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			if code := waitProcess(t, cmd); code != -1 {
				t.Fatalf("pglock after SIGKILL exited %d (stderr %q), want killed", code, stderr)
			}
			waitGone(t, pid, 5*time.Second)
			pgtest.WaitFree(t, watch, key)
			if r := pglockRun(t, "run", "--no-wait", name, "--", "true"); r.code != 0 {
				t.Fatalf("run --no-wait after pglock was killed = %+v, want 0", r)
			}
		})
	}
}

// At a terminal, COMMAND stays in pglock's process group (no Setpgid) and
// still gets the parent death signal. pglock runs under a shell that leads
// the terminal's session, so that killing pglock does not hang up the
// terminal (which would send SIGHUP to COMMAND anyway).
func TestTTYKilledStopsCommand(t *testing.T) {
	t.Parallel()
	if signal.Ignored(syscall.SIGTERM) {
		t.Skip("SIGTERM is ignored by this process: COMMAND would inherit that")
	}
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	key := keyOf(t, name)
	file := filepath.Join(t.TempDir(), "pid")
	master, slave := openPty(t)
	// The shell does not exec pglock: it waits for it, then says so.
	sh := exec.Command("sh", "-c", `"$0" "$@"; echo "pglock ended"; sleep 60`,
		os.Args[0], "run", name, "--", "sh", "-c", pidScript, "sh", file)
	sh.Env = append(os.Environ(), asCommand+"=1")
	sh.Stdin, sh.Stdout, sh.Stderr = slave, slave, slave
	sh.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	slave.Close()
	out := new(syncBuffer)
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		buf := make([]byte, 4096)
		for {
			n, err := master.Read(buf)
			out.Write(buf[:n])
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		_ = sh.Process.Kill()
		_ = sh.Wait()
		master.Close()
		<-copied
	})

	pid, pglockPID := readPids(t, file)
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	commandPgrp, err := syscall.Getpgid(pid)
	if err != nil {
		t.Fatal(err)
	}
	if pglockPgrp, err := syscall.Getpgid(pglockPID); err != nil || commandPgrp != pglockPgrp {
		t.Fatalf("COMMAND's process group is %d, pglock's %d (%v): want the same at a terminal", commandPgrp, pglockPgrp, err)
	}
	grantedPID(t, watch, key)
	if err := syscall.Kill(pglockPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitOutput(t, out, "pglock ended")
	waitGone(t, pid, 5*time.Second)
	pgtest.WaitFree(t, watch, key)
}

// COMMAND is started, and waited for, on a thread locked to that goroutine:
// other goroutines that lock their thread and return, which ends the thread,
// never end the one that started COMMAND, so COMMAND never gets the parent
// death signal while pglock lives. Which threads end is up to the
// scheduler: a COMMAND started on an unlocked thread fails this test now
// and then, not every time.
func TestRunSurvivesThreadExits(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	g := newGate(t)
	running := started(t, nil, append([]string{"run", name, "--"}, g.command(`trap "echo got-term; exit 9" TERM; `, waitLoop)...)...)
	g.waitStarted(t, running)
	// One goroutine at a time locks its thread and returns, ending it.
	for range 200 {
		done := make(chan struct{})
		go func() {
			runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
			close(done)
		}()
		<-done
		runtime.Gosched()
	}
	// Each round parks 64 goroutines, each locked to a thread of its own,
	// which takes every idle thread first; then they return, which ends
	// those threads.
	for range 5 {
		release := make(chan struct{})
		var locked, ended sync.WaitGroup
		for range 64 {
			locked.Add(1)
			ended.Go(func() {
				runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
				locked.Done()
				<-release
			})
		}
		locked.Wait()
		close(release)
		ended.Wait()
	}
	time.Sleep(100 * time.Millisecond)
	g.open(t)
	if r := await(t, running, 30*time.Second); r.code != 0 || r.stdout != "" || r.stderr != "" {
		t.Fatalf("run while other goroutines ended their threads = %+v, want 0 and no output", r)
	}
	pgtest.WaitFree(t, watch, keyOf(t, name))
}
