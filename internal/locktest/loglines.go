package locktest

import (
	"fmt"
	"strings"
	"sync"
)

// LogLines keeps log lines, for test loggers of any shape (cron.Logger,
// gocron.Logger...) to record into and tests to count. It is safe for
// concurrent use; the zero value is ready.
type LogLines struct {
	mu    sync.Mutex
	lines []string
}

// Add records a line: level, msg, then each key=value pair of kv.
func (l *LogLines) Add(level, msg string, kv ...any) {
	var b strings.Builder
	b.WriteString(level + " " + msg)
	for i := 0; i+1 < len(kv); i += 2 {
		fmt.Fprintf(&b, " %v=%v", kv[i], kv[i+1])
	}
	l.mu.Lock()
	l.lines = append(l.lines, b.String())
	l.mu.Unlock()
}

// Count returns how many lines contain every one of subs.
func (l *LogLines) Count(subs ...string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
next:
	for _, line := range l.lines {
		for _, s := range subs {
			if !strings.Contains(line, s) {
				continue next
			}
		}
		n++
	}
	return n
}

// String returns the lines, one per line.
func (l *LogLines) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}
