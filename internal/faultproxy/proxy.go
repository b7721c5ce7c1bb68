package faultproxy

import (
	"errors"
	"net"
	"sync"
	"time"
)

// dialTimeout bounds the connection to the upstream server.
const dialTimeout = 5 * time.Second

// Proxy forwards connections from a loopback port to an upstream server and
// injects faults on demand. Its methods are safe for concurrent use.
type Proxy struct {
	network, upstream string
	ln                net.Listener

	mu     sync.Mutex
	gate   chan struct{} // closed while forwarding; open (blocking) while blackholed
	links  map[*link]struct{}
	closed bool
	wg     sync.WaitGroup
}

// link is one proxied connection.
type link struct {
	client net.Conn
	server net.Conn // nil until dialed
	once   sync.Once
	cut    chan struct{} // closed when the link is closed
}

// New starts a proxy on a free port of 127.0.0.1 that forwards to address on
// network ("tcp" with "host:port", or "unix" with a socket path). It does
// not dial the upstream until a client connects. Close it when done.
func New(network, address string) (*Proxy, error) {
	if network == "" || address == "" {
		return nil, errors.New("faultproxy: empty upstream network or address")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{
		network:  network,
		upstream: address,
		ln:       ln,
		gate:     make(chan struct{}),
		links:    make(map[*link]struct{}),
	}
	close(p.gate)
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr returns the proxy's "127.0.0.1:port" address.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Host returns the proxy's host, "127.0.0.1".
func (p *Proxy) Host() string { return p.ln.Addr().(*net.TCPAddr).IP.String() }

// Port returns the proxy's port.
func (p *Proxy) Port() uint16 { return uint16(p.ln.Addr().(*net.TCPAddr).Port) }

// Conns returns the number of connections the proxy holds now.
func (p *Proxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.links)
}

// Cut closes every current connection, both the client's and the server's
// side. Connections accepted afterwards are forwarded (or held, while
// blackholed) as usual.
func (p *Proxy) Cut() {
	p.mu.Lock()
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	p.mu.Unlock()
	for _, l := range links {
		p.drop(l)
	}
}

// Blackhole stops forwarding on every connection, current and future,
// without closing any: bytes and closes are held back until [Proxy.Restore].
// A chunk already being written when Blackhole is called may still arrive.
func (p *Proxy) Blackhole() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.gate:
		p.gate = make(chan struct{})
	default: // already blackholed
	}
}

// Restore ends a blackhole: held bytes and closes are delivered in order, and
// forwarding goes on. It does nothing when forwarding already.
func (p *Proxy) Restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.gate:
	default:
		close(p.gate)
	}
}

// Close stops accepting, closes every connection and waits for the proxy's
// goroutines to end.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.mu.Unlock()
	err := p.ln.Close()
	p.Cut()
	p.wg.Wait()
	return err
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		l := &link{client: c, cut: make(chan struct{})}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			return
		}
		p.links[l] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(l)
	}
}

// serve dials the upstream (once forwarding is allowed) and pumps both ways.
func (p *Proxy) serve(l *link) {
	defer p.wg.Done()
	if !p.pass(l) {
		return
	}
	d := net.Dialer{Timeout: dialTimeout}
	s, err := d.Dial(p.network, p.upstream)
	if err != nil {
		p.drop(l)
		return
	}
	p.mu.Lock()
	select {
	case <-l.cut:
		p.mu.Unlock()
		s.Close()
		return
	default:
		l.server = s
	}
	p.mu.Unlock()
	var wg sync.WaitGroup
	wg.Go(func() { p.pump(l, l.client, s) })
	wg.Go(func() { p.pump(l, s, l.client) })
	wg.Wait()
}

// pump copies src to dst, waiting at the gate before each write; at EOF or
// an error (once past the gate) it closes the whole link.
func (p *Proxy) pump(l *link, src, dst net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if !p.pass(l) {
			return
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				p.drop(l)
				return
			}
		}
		if err != nil {
			p.drop(l)
			return
		}
	}
}

// pass waits until forwarding is allowed. It returns false when the link was
// cut meanwhile.
func (p *Proxy) pass(l *link) bool {
	for {
		p.mu.Lock()
		g := p.gate
		p.mu.Unlock()
		select {
		case <-l.cut:
			return false
		case <-g:
			// Forwarding now, unless a new blackhole began since: look again.
			p.mu.Lock()
			same := p.gate == g
			p.mu.Unlock()
			if same {
				select {
				case <-l.cut:
					return false
				default:
					return true
				}
			}
		}
	}
}

// drop closes both sides of l and forgets it.
func (p *Proxy) drop(l *link) {
	l.once.Do(func() {
		p.mu.Lock()
		delete(p.links, l)
		s := l.server
		close(l.cut)
		p.mu.Unlock()
		l.client.Close()
		if s != nil {
			s.Close()
		}
	})
}
