//go:build unix && !(linux || darwin || freebsd)

package main

import "os"

// foreground reports false: pglock does not look at terminals here, and
// COMMAND always gets a process group of its own.
func foreground(*os.File) bool { return false }
