//go:build linux

package main

import (
	"os/exec"
	"syscall"
)

// parentDeathSignal is the signal COMMAND gets from the kernel when pglock
// dies without stopping it (kill -9, a crash): pglock's session ends then and
// frees the lock, so COMMAND must not go on as if it held it.
const parentDeathSignal = syscall.SIGTERM

// setParentDeathSignal asks the kernel to send parentDeathSignal to cmd's
// process when pglock dies (prctl PR_SET_PDEATHSIG), keeping the process
// group settings of cmd.SysProcAttr. Linux sends it when the thread that
// started cmd exits, not the process: start and wait for cmd on a goroutine
// locked to its thread (see startLocked).
func setParentDeathSignal(cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = parentDeathSignal
}
