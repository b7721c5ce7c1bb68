//go:build !linux

package pgtest

import "syscall"

// dieWithParent does nothing where there is no parent-death signal.
func dieWithParent(*syscall.SysProcAttr) {}
