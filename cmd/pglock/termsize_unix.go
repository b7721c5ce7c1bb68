//go:build linux || darwin || freebsd

package main

import (
	"io"
	"os"
	"syscall"
	"unsafe"
)

// terminalSize reports whether w is a terminal and, if so, its width and
// height in characters (TIOCGWINSZ; 0 when the terminal does not say).
func terminalSize(w io.Writer) (cols, rows int, ok bool) {
	f, isFile := w.(*os.File)
	if !isFile {
		return 0, 0, false
	}
	var ws struct{ Row, Col, Xpixel, Ypixel uint16 }
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), uintptr(syscall.TIOCGWINSZ), uintptr(unsafe.Pointer(&ws)))
	if errno != 0 {
		return 0, 0, false
	}
	return int(ws.Col), int(ws.Row), true
}
