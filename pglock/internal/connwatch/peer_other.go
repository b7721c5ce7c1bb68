//go:build !linux

package pglock

import "syscall"

// peerClosed cannot tell here (see watch_linux.go): a transaction's loss is
// seen at its next statement.
func peerClosed(syscall.RawConn) (closed, ok bool) { return false, false }
