//go:build linux

package main

import (
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// pglock locks --watch at a terminal redraws in place (cursor home, each
// line erased and rewritten, the rest of the screen erased), within the
// terminal's width, shows the holder, the waiter and who waits behind
// whom, and exits 0 on Ctrl-C.
func TestLocksWatchTTY(t *testing.T) {
	t.Parallel()
	q := holdAndQueue(t)
	hp, wp := q.pids()
	const cols = 200
	cmd, master, out := ttyProcessSized(t, cols, 40, "locks", "--watch", "--interval", "200ms", "--key", q.name)
	deadline := time.Now().Add(20 * time.Second)
	for strings.Count(out.String(), eraseBelow) < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("no 3 frames within 20s: %q", out)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := master.Write([]byte{0x03}); err != nil { // Ctrl-C
		t.Fatal(err)
	}
	if code := waitTTYProcess(t, cmd, out, 20*time.Second); code != exitOK {
		t.Fatalf("pglock locks --watch after Ctrl-C = %d, want 0; terminal output %q", code, out)
	}
	frames := strings.Split(out.String(), cursorHome)
	if len(frames) < 4 || frames[0] != "" {
		t.Fatalf("want 3 frames or more, each after cursor home: %q", out)
	}
	for i, f := range frames[1:4] {
		f, _, ok := strings.Cut(f, eraseBelow)
		if !ok || !strings.HasPrefix(f, eraseLine) {
			t.Fatalf("frame %d = %q: want lines erased before they are written, the rest of the screen after", i, f)
		}
		f = strings.NewReplacer(eraseLine, "", "\r", "").Replace(f) // the pty writes "\r\n" as "\r\r\n"
		for _, l := range strings.Split(f, "\n") {
			if utf8.RuneCountInString(l) > cols {
				t.Fatalf("frame %d: line wider than the terminal: %q", i, l)
			}
		}
		if !strings.Contains(f, "pglock locks --watch, every 200ms") || !strings.Contains(f, "SESSION") {
			t.Fatalf("frame %d = %q", i, f)
		}
		lineWith(t, f, q.key.String(), q.name, "exclusive", "held", hp, "blocks", wp)
		lineWith(t, f, q.key.String(), q.name, "exclusive", "waiting", wp, "behind", hp)
		checkHealthLine(t, f, 2, lockTableCapacity(t, q.watch))
	}
}
