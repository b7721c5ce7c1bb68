package faultproxy_test

import (
	"bufio"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/pglockkit/kit/internal/faultproxy"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// echoServer answers each line with the same line and counts its open
// connections.
type echoServer struct {
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	open map[net.Conn]bool
}

func newEchoServer(t *testing.T) *echoServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &echoServer{ln: ln, open: map[net.Conn]bool{}}
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.open[c] = true
			s.mu.Unlock()
			s.wg.Go(func() {
				defer func() {
					s.mu.Lock()
					delete(s.open, c)
					s.mu.Unlock()
					c.Close()
				}()
				_, _ = io.Copy(c, c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		for c := range s.open {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

func (s *echoServer) conns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.open)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func newProxy(t *testing.T, s *echoServer) *faultproxy.Proxy {
	t.Helper()
	p, err := faultproxy.New("tcp", s.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func dial(t *testing.T, p *faultproxy.Proxy) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, bufio.NewReader(c)
}

func roundTrip(t *testing.T, c net.Conn, r *bufio.Reader, line string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		t.Fatal(err)
	}
	got, err := r.ReadString('\n')
	if err != nil || strings.TrimSpace(got) != line {
		t.Fatalf("echo of %q = %q, %v", line, got, err)
	}
}

func TestForward(t *testing.T) {
	s := newEchoServer(t)
	p := newProxy(t, s)
	if !strings.HasPrefix(p.Addr(), "127.0.0.1:") || p.Port() == 0 || p.Host() != "127.0.0.1" {
		t.Fatalf("Addr %q Host %q Port %d", p.Addr(), p.Host(), p.Port())
	}
	c, r := dial(t, p)
	roundTrip(t, c, r, "hello")
	if n := p.Conns(); n != 1 {
		t.Fatalf("Conns = %d, want 1", n)
	}
	// A client's close reaches the server.
	c.Close()
	waitFor(t, "server side closed", func() bool { return s.conns() == 0 && p.Conns() == 0 })
}

func TestCut(t *testing.T) {
	s := newEchoServer(t)
	p := newProxy(t, s)
	c1, r1 := dial(t, p)
	c2, r2 := dial(t, p)
	roundTrip(t, c1, r1, "one")
	roundTrip(t, c2, r2, "two")
	p.Cut()
	c1.SetReadDeadline(time.Now().Add(3 * time.Second))
	c2.SetReadDeadline(time.Now().Add(3 * time.Second))
	for _, r := range []*bufio.Reader{r1, r2} {
		if _, err := r.ReadString('\n'); !errors.Is(err, io.EOF) {
			t.Fatalf("read after Cut = %v, want EOF", err)
		}
	}
	waitFor(t, "server sides closed", func() bool { return s.conns() == 0 })
	// New connections are forwarded again.
	c3, r3 := dial(t, p)
	roundTrip(t, c3, r3, "three")
}

func TestBlackholeRestore(t *testing.T) {
	s := newEchoServer(t)
	p := newProxy(t, s)
	c, r := dial(t, p)
	roundTrip(t, c, r, "before")
	p.Blackhole()
	p.Blackhole() // twice is harmless
	if _, err := io.WriteString(c, "held\n"); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	_, err := r.ReadString('\n')
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read while blackholed = %v, want a timeout", err)
	}
	// A connection made while blackholed does not reach the server.
	c2, r2 := dial(t, p)
	time.Sleep(50 * time.Millisecond)
	if n := s.conns(); n != 1 {
		t.Fatalf("server has %d conns while blackholed, want 1", n)
	}
	// A close while blackholed is held back too.
	c.Close()
	time.Sleep(50 * time.Millisecond)
	if n := s.conns(); n != 1 {
		t.Fatalf("server has %d conns after a held close, want 1", n)
	}
	p.Restore()
	p.Restore()
	waitFor(t, "held close delivered and new conn dialed", func() bool { return s.conns() == 1 && p.Conns() == 1 })
	roundTrip(t, c2, r2, "after")
}

func TestBlackholeHeldBytesDelivered(t *testing.T) {
	s := newEchoServer(t)
	p := newProxy(t, s)
	c, r := dial(t, p)
	roundTrip(t, c, r, "before")
	p.Blackhole()
	if _, err := io.WriteString(c, "held\n"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	p.Restore()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	got, err := r.ReadString('\n')
	if err != nil || got != "held\n" {
		t.Fatalf("held line = %q, %v", got, err)
	}
}

func TestCutWhileBlackholed(t *testing.T) {
	s := newEchoServer(t)
	p := newProxy(t, s)
	c, r := dial(t, p)
	roundTrip(t, c, r, "x")
	p.Blackhole()
	c2, _ := dial(t, p) // held, not yet dialed upstream
	waitFor(t, "second conn accepted", func() bool { return p.Conns() == 2 })
	p.Cut()
	for _, cc := range []net.Conn{c, c2} {
		cc.SetReadDeadline(time.Now().Add(3 * time.Second))
		if _, err := cc.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
			t.Fatalf("read after Cut while blackholed = %v, want EOF", err)
		}
	}
	waitFor(t, "server side closed", func() bool { return s.conns() == 0 && p.Conns() == 0 })
}

func TestNewErrors(t *testing.T) {
	if _, err := faultproxy.New("", ""); err == nil {
		t.Fatal("New with an empty upstream: no error")
	}
	// An unreachable upstream closes the client's connection.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	p, err := faultproxy.New("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("read through a proxy with no upstream = %v, want EOF", err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
}
