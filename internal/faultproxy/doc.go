// Package faultproxy is a small TCP proxy for tests that need the network
// between a client and PostgreSQL to fail on demand. It is internal test
// support, not an API.
//
// A [Proxy] listens on a free loopback port (127.0.0.1) and forwards each
// connection it accepts to the upstream server, byte for byte: point a pgx
// pool (or any client) at [Proxy.Addr] instead of the server. PostgreSQL's
// cancel requests travel through it too, since pgx sends them to the address
// the connection was made to.
//
// Three faults can be injected, on every connection at once:
//
//   - [Proxy.Cut] closes every current connection, both sides, as a crashed
//     middlebox or a server restart would: the client reads EOF at once and
//     the server's backend sees its client go away. New connections are
//     still accepted and forwarded afterwards.
//   - [Proxy.Blackhole] stops forwarding without closing anything, as a
//     silent network partition does: bytes sent by either side (and a close)
//     are held back, so the client sees nothing until its own timeout, and the
//     server still believes its session is alive. Connections accepted while
//     blackholed are held too: they reach the server only after Restore.
//   - [Proxy.Restore] ends a blackhole: what was held back is delivered, in
//     order, as TCP would do once a partition heals.
//
// What it deliberately does not do: it does not drop or corrupt single
// bytes, delay traffic by a fixed latency, or parse the PostgreSQL protocol.
package faultproxy
