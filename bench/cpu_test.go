package bench

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// cpuMeter reads the CPU time this process and the server's sessions have
// used, so that a side of a contention benchmark can report its CPU per
// grant on both ends: on a machine whose cores the client and the server
// share, a side's grants per second follow from it. The server's is read
// from /proc (the server on this machine, Linux): without it, only the
// client's is reported.
type cpuMeter struct {
	pids []int32 // the server's processes of the benchmark's database
}

// newCPUMeter finds the server processes of pool's database, to be called
// once every session a benchmark uses is open.
func newCPUMeter(ctx context.Context, pool *pgxpool.Pool) (*cpuMeter, error) {
	rows, err := pool.Query(ctx, `SELECT pid FROM pg_catalog.pg_stat_activity WHERE datname = current_database()`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	m := &cpuMeter{}
	for rows.Next() {
		var pid int32
		if err := rows.Scan(&pid); err != nil {
			return nil, err
		}
		if _, err := procCPU(pid); err == nil {
			m.pids = append(m.pids, pid)
		}
	}
	return m, rows.Err()
}

// read returns the CPU time used so far by this process and by the server
// processes (0 without /proc).
func (m *cpuMeter) read() (client, server time.Duration) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err == nil {
		client = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	if m == nil {
		return client, 0
	}
	for _, pid := range m.pids {
		d, _ := procCPU(pid)
		server += d
	}
	return client, server
}

// procCPU is the user and system CPU time of process pid, from
// /proc/<pid>/stat (in clock ticks of 10 ms).
func procCPU(pid int32) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("bench: /proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("bench: /proc/%d/stat: %d fields", pid, len(f))
	}
	var utime, stime int64
	if _, err := fmt.Sscan(f[11], &utime); err != nil {
		return 0, err
	}
	if _, err := fmt.Sscan(f[12], &stime); err != nil {
		return 0, err
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond, nil
}
