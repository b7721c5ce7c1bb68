//go:build !linux

package main

import "os/exec"

// setParentDeathSignal does nothing: only Linux has a parent death signal
// (prctl PR_SET_PDEATHSIG), so elsewhere COMMAND outlives a pglock that is
// killed with SIGKILL.
func setParentDeathSignal(*exec.Cmd) {}
