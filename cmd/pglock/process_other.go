//go:build !unix

package main

import (
	"os"
	"os/exec"
	"syscall"
)

// jobControl is empty where there are no process groups.
type jobControl struct{}

// startJob does nothing where there are no process groups.
func startJob(*exec.Cmd, *os.File) jobControl { return jobControl{} }

// forward forwards every signal.
func (jobControl) forward(os.Signal) bool { return true }

// signal sends s to the command; where only killing is supported, SIGTERM
// and SIGINT kill it.
func (jobControl) signal(cmd *exec.Cmd, s os.Signal) error {
	if err := cmd.Process.Signal(s); err != nil {
		return cmd.Process.Kill()
	}
	return nil
}

// killedBy reports no signal: this platform has no signal exit statuses.
func killedBy(*os.ProcessState) (syscall.Signal, bool) { return 0, false }
