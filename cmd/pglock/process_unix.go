//go:build unix

package main

import (
	"errors"
	"os"
	"os/exec"
	"syscall"
)

// jobControl is how COMMAND stands toward the terminal and toward the
// signals pglock forwards.
type jobControl struct {
	// shared: COMMAND stays in pglock's process group, because standard
	// input is a terminal whose foreground process group is pglock's. The
	// terminal then lets COMMAND read it, stops and continues COMMAND with
	// pglock (Ctrl-Z, fg) and delivers Ctrl-C to both.
	shared bool
	tty    *os.File // standard input, when shared
}

// startJob decides where cmd runs: in pglock's process group when stdin is
// a terminal whose foreground group is pglock's, else in a process group of
// its own, so that the signals pglock sends reach the processes it starts
// too (a shell's children).
func startJob(cmd *exec.Cmd, stdin *os.File) jobControl {
	if stdin != nil && foreground(stdin) {
		return jobControl{shared: true, tty: stdin}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return jobControl{}
}

// forward reports whether a signal pglock received should be sent on to
// COMMAND. A SIGINT that arrives while pglock's group is the terminal's
// foreground group came from the terminal (Ctrl-C), which delivered it to
// COMMAND as well: sending it again would make COMMAND see it twice.
func (j jobControl) forward(s os.Signal) bool {
	return !(j.shared && s == os.Interrupt && foreground(j.tty))
}

// signal sends s to COMMAND: to its process group, or, when it shares
// pglock's group, to COMMAND alone (the group holds pglock, and maybe the
// rest of a shell pipeline).
func (j jobControl) signal(cmd *exec.Cmd, s os.Signal) error {
	n, ok := s.(syscall.Signal)
	if !ok || j.shared {
		err := cmd.Process.Signal(s)
		if errors.Is(err, os.ErrProcessDone) {
			return nil
		}
		return err
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
