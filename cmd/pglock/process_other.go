//go:build !unix

package main

import (
	"os"
	"os/exec"
	"syscall"
)

// newProcessGroup does nothing where there are no process groups.
func newProcessGroup(*exec.Cmd) {}

// signalCommand sends s to the command; where only killing is supported,
// SIGTERM and SIGINT kill it.
func signalCommand(cmd *exec.Cmd, s os.Signal) error {
	if err := cmd.Process.Signal(s); err != nil {
		return cmd.Process.Kill()
	}
	return nil
}

// killedBy reports no signal: this platform has no signal exit statuses.
func killedBy(*os.ProcessState) (syscall.Signal, bool) { return 0, false }
