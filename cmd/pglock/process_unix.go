//go:build unix

package main

import (
	"errors"
	"os"
	"os/exec"
	"syscall"
)

// newProcessGroup makes the command the leader of a process group of its
// own, so that the signals pglock sends reach the processes it starts too
// (a shell's children), and a terminal's Ctrl-C reaches it once, through
// pglock, rather than twice.
func newProcessGroup(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
}

// signalCommand sends s to the command's process group.
func signalCommand(cmd *exec.Cmd, s os.Signal) error {
	n, ok := s.(syscall.Signal)
	if !ok {
		return cmd.Process.Signal(s)
	}
	err := syscall.Kill(-cmd.Process.Pid, n)
	if errors.Is(err, syscall.ESRCH) {
		return nil // the group is gone: the command has exited
	}
	return err
}

// killedBy reports the signal that killed the process, if one did.
func killedBy(ps *os.ProcessState) (syscall.Signal, bool) {
	ws, ok := ps.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() {
		return 0, false
	}
	return ws.Signal(), true
}
