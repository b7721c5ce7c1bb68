//go:build unix

package main

import (
	"context"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pglockkit/kit/internal/faultproxy"
	"github.com/pglockkit/kit/internal/pgtest"
)

const (
	ended            = "its database connection ended"
	stoppedAnswering = "its database connection stopped answering"
)

// proxiedURL starts a fault proxy in front of the test server and returns
// it and DATABASE_URL pointed at it.
func proxiedURL(t *testing.T) (*faultproxy.Proxy, string) {
	t.Helper()
	u, err := url.Parse(pgtest.URL(t))
	if err != nil || u.Scheme == "" {
		t.Skipf("DATABASE_URL is not a URL: %v", err)
	}
	cfg, err := pgx.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	network, addr := pgconn.NetworkAddress(cfg.Host, cfg.Port)
	p, err := faultproxy.New(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	u.Host = p.Addr()
	q := u.Query()
	q.Del("host") // a host parameter would override the URL's
	q.Del("port")
	u.RawQuery = q.Encode()
	return p, u.String()
}

// proxiedConn returns a fault proxy and a connection through it.
func proxiedConn(t *testing.T) (*faultproxy.Proxy, *pgx.Conn) {
	t.Helper()
	p, u := proxiedURL(t)
	conn, err := pgx.Connect(context.Background(), u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return p, conn
}

// When the lock's connection goes silent (a blackholed network), the lost
// line says it stopped answering; when it is closed, that it ended.
func TestRunLostLockSilent(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	for _, tc := range []struct {
		name  string
		flags []string
		fault func(*faultproxy.Proxy)
		want  string
		bound time.Duration // from the fault to pglock's exit
	}{
		// Session: the watch's read waits 0.5 s, then its ping 0.5 s.
		{"session blackhole", nil, (*faultproxy.Proxy).Blackhole, stoppedAnswering, 10 * time.Second},
		{"session cut", nil, (*faultproxy.Proxy).Cut, ended, 10 * time.Second},
		// --xact: a ping every 0.5 s, given 5 s to answer; then the
		// commit of the release gets 5 s more.
		{"xact blackhole", []string{"--xact"}, (*faultproxy.Proxy).Blackhole, stoppedAnswering, 20 * time.Second},
		{"xact cut", []string{"--xact"}, (*faultproxy.Proxy).Cut, ended, 10 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p, u := proxiedURL(t)
			name := pgtest.UniqueKey(t)
			key := keyOf(t, name)
			g := newGate(t)
			args := append(append([]string{"run", "--database-url", u}, tc.flags...), name, "--")
			running := started(t, nil, append(args, g.command(`trap "echo got-term; exit 9" TERM; `, waitLoop)...)...)
			g.waitStarted(t, running)
			grantedPID(t, watch, key)

			tc.fault(p)
			start := time.Now()
			r := await(t, running, 30*time.Second)
			took := time.Since(start)
			if r.code != exitLost || r.stdout != "got-term\n" {
				t.Fatalf("run after %s = %+v, want 70 and got-term", tc.name, r)
			}
			if !strings.Contains(r.stderr, "lost ("+tc.want+")") {
				t.Fatalf("stderr = %q, want %q", r.stderr, tc.want)
			}
			if took > tc.bound {
				t.Fatalf("pglock took %v after the %s, want at most %v", took, tc.name, tc.bound)
			}
			// The server keeps a blackholed session, and its lock, until
			// the proxy delivers pglock's close.
			p.Restore()
			pgtest.WaitFree(t, watch, key)
		})
	}
}

// lostReason tells the errors of a silent connection from those of one that
// ended, on errors that real connections return.
func TestLostReason(t *testing.T) {
	t.Parallel()
	watch := pgtest.Pool(t, 2)
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		err  func(t *testing.T) error
		want string
	}{
		{"no error", func(*testing.T) error { return nil }, ended},
		{"terminated backend", func(t *testing.T) error {
			conn, err := pgx.Connect(ctx, pgtest.URL(t))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(ctx)
			pgtest.Terminate(t, watch, int32(conn.PgConn().PID()))
			return conn.Ping(ctx)
		}, ended},
		{"cut connection", func(t *testing.T) error {
			p, conn := proxiedConn(t)
			p.Cut()
			return conn.Ping(ctx)
		}, ended},
		{"ping past its context's deadline", func(t *testing.T) error {
			p, conn := proxiedConn(t)
			p.Blackhole()
			defer p.Restore()
			pctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
			defer cancel()
			return conn.Ping(pctx)
		}, stoppedAnswering},
		{"wait past a read deadline", func(t *testing.T) error {
			// The session watch's read: a deadline on the socket, no context.
			p, conn := proxiedConn(t)
			p.Blackhole()
			defer p.Restore()
			if err := conn.PgConn().Conn().SetReadDeadline(time.Now().Add(200 * time.Millisecond)); err != nil {
				t.Fatal(err)
			}
			return conn.PgConn().WaitForNotification(ctx)
		}, stoppedAnswering},
		{"raw socket read deadline", func(t *testing.T) error {
			p, _ := proxiedURL(t)
			nc, err := net.Dial("tcp", p.Addr())
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			if err := nc.SetReadDeadline(time.Now().Add(100 * time.Millisecond)); err != nil {
				t.Fatal(err)
			}
			_, err = nc.Read(make([]byte, 1))
			return err
		}, stoppedAnswering},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := tc.err(t)
			if err == nil && tc.name != "no error" {
				t.Fatal("got no error")
			}
			if got := lostReason(err); got != tc.want {
				t.Fatalf("lostReason(%v) = %q, want %q", err, got, tc.want)
			}
		})
	}
}
