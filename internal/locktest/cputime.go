package locktest

import (
	"syscall"
	"time"
)

// CPUTime returns the CPU time (user + system) the process has used so far:
// benchmarks report its growth per operation (cpu-ns/op), which swings less
// than wall time on a shared machine.
func CPUTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
