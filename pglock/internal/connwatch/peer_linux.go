package connwatch

import (
	"encoding/binary"
	"syscall"
)

// Linux TCP states (include/net/tcp_states.h).
const (
	tcpEstablished = 1
	tcpCloseWait   = 8
	tcpClose       = 7
	tcpLastAck     = 9
)

// peerClosed reports whether the server has closed the TCP connection under
// rc (it sent FIN, or the connection was reset or timed out), without
// reading from it: the first byte of struct tcp_info is the socket's state.
// ok is false where that cannot be told (not a TCP socket).
func peerClosed(rc syscall.RawConn) (closed, ok bool) {
	var v int
	var err error
	if cerr := rc.Control(func(fd uintptr) {
		v, err = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_INFO)
	}); cerr != nil {
		return true, true // the descriptor is closed
	}
	if err != nil {
		return false, false
	}
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], uint32(v))
	switch b[0] {
	case tcpCloseWait, tcpClose, tcpLastAck:
		return true, true
	}
	return false, true
}
