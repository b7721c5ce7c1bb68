package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// ErrNoPgBouncer means the pgbouncer binary is not installed.
var ErrNoPgBouncer = errors.New("pgtest: no pgbouncer binary: install PgBouncer (Debian/Ubuntu: apt-get install pgbouncer;" +
	" Fedora: dnf install pgbouncer; macOS: brew install pgbouncer); `make test` installs it when run as root on Debian")

// PgBouncer is a PgBouncer started in front of a PostgreSQL server for a
// test run.
type PgBouncer struct {
	URL  string // a URL to the server's database through PgBouncer
	Mode string // the pool_mode: session, transaction or statement
	dir  string
	cmd  *exec.Cmd
	done chan struct{}
}

// PgBouncerBinary returns the path of the pgbouncer binary: PATH first, then
// /usr/sbin (Debian installs it there, outside a user's PATH).
func PgBouncerBinary() (string, error) {
	if p, err := exec.LookPath("pgbouncer"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/local/bin/pgbouncer"} {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", ErrNoPgBouncer
}

// StartPgBouncer starts PgBouncer on a free loopback port in front of the
// server at serverURL (a postgres:// URL whose host is a TCP address), with
// pool_mode mode, poolSize server connections per database and user, and
// trust authentication for the URL's user. It runs in the foreground as a
// child process (as the postgres or nobody user when running as root, since
// PgBouncer refuses root). Stop it with Stop.
func StartPgBouncer(ctx context.Context, serverURL, mode string, poolSize int) (*PgBouncer, error) {
	return StartPgBouncerWith(ctx, serverURL, mode, poolSize, nil)
}

// StartPgBouncerWith is StartPgBouncer with extra settings of pgbouncer.ini's
// [pgbouncer] section (for example server_reset_query_always = 1,
// max_client_conn, server_lifetime), written after StartPgBouncer's own, so
// that they override them. Names are PgBouncer setting names (letters, digits
// and _); values are one line of printable text. The settings PgBouncer
// needs to be reached and managed by the test (listen_addr, listen_port,
// unix_socket_dir, auth_type, auth_file, logfile, pidfile) cannot be set, nor
// pool_mode and default_pool_size, which are mode and poolSize. Nothing is
// started when a setting is invalid.
func StartPgBouncerWith(ctx context.Context, serverURL, mode string, poolSize int, settings map[string]string) (*PgBouncer, error) {
	extra, err := pgbouncerSettings(settings)
	if err != nil {
		return nil, err
	}
	switch mode {
	case "session", "transaction", "statement":
	default:
		return nil, fmt.Errorf("pgtest: pgbouncer pool_mode %q: want session, transaction or statement", mode)
	}
	if poolSize < 1 {
		return nil, fmt.Errorf("pgtest: pgbouncer pool size %d: want at least 1", poolSize)
	}
	bin, err := PgBouncerBinary()
	if err != nil {
		return nil, err
	}
	u, err := url.Parse(serverURL)
	if err != nil {
		return nil, fmt.Errorf("pgtest: server URL: %w", err)
	}
	host, port := u.Hostname(), u.Port()
	if host == "" || strings.HasPrefix(host, "/") {
		return nil, fmt.Errorf("pgtest: server URL %q has no TCP host", serverURL)
	}
	if port == "" {
		port = "5432"
	}
	user := u.User.Username()
	if user == "" {
		user = "postgres"
	}
	dbname := strings.TrimPrefix(u.Path, "/")
	if dbname == "" {
		dbname = user
	}
	if !isWord(host, ".-:") || !isWord(port, "") || !isWord(user, "_-") || !isWord(dbname, "_-") {
		return nil, fmt.Errorf("pgtest: server URL %q: host, port, user and database must be plain words", serverURL)
	}
	listen, err := freePort()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "pglockkit-pgbouncer-")
	if err != nil {
		return nil, err
	}
	ini := fmt.Sprintf(`[databases]
%s = host=%s port=%s dbname=%s

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s
pool_mode = %s
default_pool_size = %d
max_client_conn = 1000
ignore_startup_parameters = extra_float_digits
logfile = %s
pidfile = %s
%s`, dbname, host, port, dbname, listen, filepath.Join(dir, "users.txt"), mode, poolSize,
		filepath.Join(dir, "pgbouncer.log"), filepath.Join(dir, "pgbouncer.pid"), extra)
	files := map[string]string{
		"pgbouncer.ini": ini,
		"users.txt":     fmt.Sprintf("%q \"\"\n", user),
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	cmd := exec.Command(bin, filepath.Join(dir, "pgbouncer.ini"))
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	dieWithParent(cmd.SysProcAttr)
	if os.Geteuid() == 0 {
		cred, err := unprivileged()
		if err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		cmd.SysProcAttr.Credential = cred
	}
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("pgtest: start pgbouncer: %w", err)
	}
	b := &PgBouncer{
		URL:  fmt.Sprintf("postgres://%s@127.0.0.1:%d/%s?sslmode=disable", user, listen, dbname),
		Mode: mode, dir: dir, cmd: cmd, done: make(chan struct{}),
	}
	go func() {
		_ = cmd.Wait()
		close(b.done)
	}()
	// Wait until it answers a query (which also reaches the server).
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := ping(ctx, b.URL+"&default_query_exec_mode=simple_protocol")
		if err == nil {
			return b, nil
		}
		select {
		case <-b.done:
			logText, _ := os.ReadFile(filepath.Join(dir, "pgbouncer.log"))
			os.RemoveAll(dir)
			return nil, fmt.Errorf("pgtest: pgbouncer exited: %s %s", strings.TrimSpace(out.String()), logText)
		default:
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			b.Stop()
			return nil, fmt.Errorf("pgtest: pgbouncer at %s does not answer: %w", b.URL, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pgbouncerSettings checks settings and returns them as pgbouncer.ini lines,
// sorted by name.
func pgbouncerSettings(settings map[string]string) (string, error) {
	names := make([]string, 0, len(settings))
	for name := range settings {
		names = append(names, name)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, name := range names {
		value := strings.TrimSpace(settings[name])
		switch {
		case !isWord(name, "_") || name[0] == '_' || (name[0] >= '0' && name[0] <= '9'):
			return "", fmt.Errorf("pgtest: pgbouncer setting name %q is not a setting name", name)
		case pgbouncerOwnSettings[strings.ToLower(name)] != "":
			return "", fmt.Errorf("pgtest: pgbouncer setting %s cannot be set: %s", name, pgbouncerOwnSettings[strings.ToLower(name)])
		case strings.IndexFunc(value, func(r rune) bool { return r < ' ' || r == 0x7f }) >= 0:
			return "", fmt.Errorf("pgtest: pgbouncer setting %s=%q: the value must be one line of printable text", name, value)
		}
		fmt.Fprintf(&b, "%s = %s\n", name, value)
	}
	return b.String(), nil
}

// pgbouncerOwnSettings are the settings StartPgBouncer relies on or takes as
// arguments, with why they cannot be set.
var pgbouncerOwnSettings = map[string]string{
	"listen_addr":       "the test reaches PgBouncer there",
	"listen_port":       "the test reaches PgBouncer there",
	"unix_socket_dir":   "the test reaches PgBouncer over TCP",
	"auth_type":         "the test's trust authentication",
	"auth_file":         "the test's trust authentication",
	"logfile":           "the test reads it",
	"pidfile":           "the test manages the process",
	"pool_mode":         "pass it as mode",
	"default_pool_size": "pass it as poolSize",
}

// Stop stops PgBouncer and removes its directory.
func (b *PgBouncer) Stop() {
	if b == nil || b.cmd == nil {
		return
	}
	_ = b.cmd.Process.Signal(syscall.SIGINT) // INT: close at once
	select {
	case <-b.done:
	case <-time.After(5 * time.Second):
		_ = b.cmd.Process.Kill()
		<-b.done
	}
	_ = os.RemoveAll(b.dir)
	b.cmd = nil
}

// StartPgBouncerT starts PgBouncer in front of the test server (URL(tb))
// for one test and stops it when the test ends. When pgbouncer is not
// installed the test is skipped, or fails when the CI environment variable
// is set: CI must run every test.
func StartPgBouncerT(tb testing.TB, mode string, poolSize int) *PgBouncer {
	tb.Helper()
	return StartPgBouncerWithT(tb, mode, poolSize, nil)
}

// StartPgBouncerWithT is StartPgBouncerT with extra pgbouncer.ini settings,
// as StartPgBouncerWith takes them.
func StartPgBouncerWithT(tb testing.TB, mode string, poolSize int, settings map[string]string) *PgBouncer {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := StartPgBouncerWith(ctx, URL(tb), mode, poolSize, settings)
	if errors.Is(err, ErrNoPgBouncer) {
		if ci, _ := strconv.ParseBool(os.Getenv("CI")); ci {
			tb.Fatal(err)
		}
		tb.Skip(err)
	}
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(b.Stop)
	return b
}
