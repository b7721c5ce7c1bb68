//go:build !(linux || darwin || freebsd)

package main

import "io"

// terminalSize reports false: here "pglock locks --watch" prints plain
// snapshots, as to a file.
func terminalSize(io.Writer) (cols, rows int, ok bool) { return 0, 0, false }
