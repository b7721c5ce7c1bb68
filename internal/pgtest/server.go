package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// DefaultLocalURLs are tried, in order, when DATABASE_URL is not set.
var DefaultLocalURLs = []string{
	"postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
	"postgres://127.0.0.1:5432/postgres?sslmode=disable",
}

// ErrNoPostgres means no server was found and none could be started.
var ErrNoPostgres = errors.New("pgtest: no PostgreSQL: set DATABASE_URL, run a server at 127.0.0.1:5432," +
	" or install the server binaries (Debian/Ubuntu: apt-get install postgresql; Fedora: dnf install postgresql-server;" +
	" macOS: brew install postgresql)")

// Server is a PostgreSQL server found or started for a run.
type Server struct {
	URL    string
	Source string // "DATABASE_URL", "local", or "throwaway"
	dir    string
	pgCtl  string
	cred   *syscall.Credential
	extra  []string // a throwaway's extra settings (-c arguments), for its standbys
}

// Find returns the server named by DATABASE_URL, or one answering at
// 127.0.0.1:5432, without starting anything. ok is false when neither
// answers.
func Find(ctx context.Context) (s *Server, ok bool, err error) {
	if u := os.Getenv("DATABASE_URL"); u != "" {
		if err := ping(ctx, u); err != nil {
			return nil, false, fmt.Errorf("pgtest: DATABASE_URL does not answer: %w", err)
		}
		return &Server{URL: u, Source: "DATABASE_URL"}, true, nil
	}
	for _, u := range DefaultLocalURLs {
		if ping(ctx, u) == nil {
			return &Server{URL: u, Source: "local"}, true, nil
		}
	}
	return nil, false, nil
}

// FindOrStart returns Find's server, else starts a throwaway one. Call Stop
// on the result when done (it is a no-op for a server it did not start).
func FindOrStart(ctx context.Context) (*Server, error) {
	s, ok, err := Find(ctx)
	if err != nil || ok {
		return s, err
	}
	return StartThrowaway(ctx)
}

func ping(ctx context.Context, url string) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return err
	}
	cfg.ConnectTimeout = 2 * time.Second
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return conn.Ping(ctx)
}

// Binaries returns the directory that holds initdb and pg_ctl: PATH first,
// then the newest /usr/lib/postgresql/*/bin.
func Binaries() (string, error) {
	if p, err := exec.LookPath("initdb"); err == nil {
		if _, err := exec.LookPath("pg_ctl"); err == nil {
			return filepath.Dir(p), nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return version(dirs[i]) > version(dirs[j]) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	return "", ErrNoPostgres
}

func version(binDir string) float64 {
	v, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(binDir)), 64)
	return v
}

// StartThrowaway starts a new cluster in a temporary directory on a free
// loopback port, with trust authentication, fsync off and room for many
// connections.
func StartThrowaway(ctx context.Context) (*Server, error) {
	return StartThrowawayWith(ctx, nil)
}

// StartThrowawayWith is StartThrowaway with extra server settings, each
// passed to the server as -c name=value after StartThrowaway's own, so that
// it overrides them (for example max_locks_per_transaction, max_connections).
// Names are PostgreSQL parameter names; values are plain words (letters,
// digits and _ . , : / + -), since pg_ctl hands them to a shell: a value that
// would need quoting is an error. listen_addresses, port and
// unix_socket_directories are the throwaway's own and cannot be set. Nothing
// is started when a setting is invalid.
func StartThrowawayWith(ctx context.Context, settings map[string]string) (*Server, error) {
	extra, err := settingArgs(settings)
	if err != nil {
		return nil, err
	}
	bin, err := Binaries()
	if err != nil {
		return nil, err
	}
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		if cred, err = unprivileged(); err != nil {
			return nil, err
		}
	}
	s, err := newThrowaway(filepath.Join(bin, "pg_ctl"), cred)
	if err != nil {
		return nil, err
	}
	s.extra = extra
	if out, err := s.run(ctx, filepath.Join(bin, "initdb"), "-D", filepath.Join(s.dir, "data"), "-U", "postgres", "-A", "trust",
		"-E", "UTF8", "--no-sync", "--locale=C"); err != nil {
		os.RemoveAll(s.dir)
		return nil, fmt.Errorf("pgtest: initdb: %w\n%s", err, out)
	}
	if err := s.startNew(ctx, extra); err != nil {
		return nil, err
	}
	return s, nil
}

// newThrowaway makes the temporary directory of a new throwaway cluster,
// owned by cred's user when cred is not nil (PostgreSQL then runs as that
// user).
func newThrowaway(pgCtl string, cred *syscall.Credential) (*Server, error) {
	dir, err := os.MkdirTemp("", "pglockkit-pg-")
	if err != nil {
		return nil, err
	}
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	return &Server{Source: "throwaway", dir: dir, pgCtl: pgCtl, cred: cred}, nil
}

// startNew starts the server of the cluster in s.dir/data for the first
// time, on a free loopback port, with the throwaway's own settings and then
// extra (-c arguments), waits until it answers and sets s.URL. On failure
// the cluster is stopped and its directory removed.
func (s *Server) startNew(ctx context.Context, extra []string) error {
	port, err := freePort()
	if err != nil {
		os.RemoveAll(s.dir)
		return err
	}
	opts := strings.Join([]string{
		"-c listen_addresses=127.0.0.1",
		"-c port=" + strconv.Itoa(port),
		"-c unix_socket_directories=" + s.dir,
		"-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
		"-c max_connections=300",
		"-c max_locks_per_transaction=128",
	}, " ")
	for _, a := range extra {
		opts += " " + a
	}
	if out, err := s.run(ctx, s.pgCtl, "-D", filepath.Join(s.dir, "data"), "-l", filepath.Join(s.dir, "server.log"),
		"-o", opts, "-w", "-t", "60", "start"); err != nil {
		logText, _ := os.ReadFile(filepath.Join(s.dir, "server.log"))
		os.RemoveAll(s.dir)
		return fmt.Errorf("pgtest: pg_ctl start: %w\n%s\n%s", err, out, logText)
	}
	s.URL = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	if err := ping(ctx, s.URL); err != nil {
		s.Stop()
		return err
	}
	return nil
}

// settingArgs checks settings and returns them as -c arguments, sorted by
// name.
func settingArgs(settings map[string]string) ([]string, error) {
	names := make([]string, 0, len(settings))
	for name := range settings {
		names = append(names, name)
	}
	sort.Strings(names)
	args := make([]string, 0, len(names))
	for _, name := range names {
		value := settings[name]
		switch {
		case !isWord(name, "_.") || name[0] == '.' || (name[0] >= '0' && name[0] <= '9'):
			return nil, fmt.Errorf("pgtest: server setting name %q is not a parameter name", name)
		case ownSettings[strings.ToLower(name)]:
			return nil, fmt.Errorf("pgtest: server setting %s belongs to the throwaway cluster and cannot be set", name)
		case !isWord(value, "_.,:/+-"):
			return nil, fmt.Errorf("pgtest: server setting %s=%q: the value must be a plain word (letters, digits, _ . , : / + -)", name, value)
		}
		args = append(args, "-c "+name+"="+value)
	}
	return args, nil
}

// ownSettings are the settings StartThrowaway relies on to reach its server.
var ownSettings = map[string]bool{"listen_addresses": true, "port": true, "unix_socket_directories": true}

// isWord reports whether s is not empty and has only ASCII letters, digits
// and the bytes of punct.
func isWord(s, punct string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte(punct, c) >= 0) {
			return false
		}
	}
	return true
}

// ThrowawayT starts a throwaway cluster with settings (see
// StartThrowawayWith) for one test or benchmark and stops it when that ends.
// Without PostgreSQL's server binaries it skips; other failures are fatal.
func ThrowawayT(tb testing.TB, settings map[string]string) *Server {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	srv, err := StartThrowawayWith(ctx, settings)
	if errors.Is(err, ErrNoPostgres) {
		tb.Skip(err)
	}
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(srv.Stop)
	return srv
}

// Stop stops and removes a throwaway cluster; it does nothing for a server
// it did not start.
func (s *Server) Stop() {
	if s == nil || s.dir == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, _ = s.run(ctx, s.pgCtl, "-D", filepath.Join(s.dir, "data"), "-m", "immediate", "-w", "stop")
	_ = os.RemoveAll(s.dir)
	s.dir = ""
}

// Restart restarts a throwaway cluster (pg_ctl restart -m fast: sessions are
// terminated with SQLSTATE 57P01), keeping its settings and port. It is an
// error for a server it did not start.
func (s *Server) Restart(ctx context.Context) error {
	return s.ctl(ctx, "-m", "fast", "restart")
}

// StopServer stops a throwaway cluster's server and keeps its data, so that
// Start can start it again; Stop still removes it.
func (s *Server) StopServer(ctx context.Context) error {
	return s.ctl(ctx, "-m", "fast", "stop")
}

// Start starts a throwaway cluster's server stopped by StopServer.
func (s *Server) Start(ctx context.Context) error {
	return s.ctl(ctx, "start")
}

// ctl runs pg_ctl on the throwaway cluster's data directory, waiting for it
// to finish; the server's settings are the ones it last started with
// (postmaster.opts).
func (s *Server) ctl(ctx context.Context, args ...string) error {
	if s == nil || s.dir == "" {
		return errors.New("pgtest: not a throwaway cluster this process started")
	}
	data := filepath.Join(s.dir, "data")
	if args[len(args)-1] == "start" { // restart reuses them itself
		opts, err := os.ReadFile(filepath.Join(data, "postmaster.opts"))
		if err != nil {
			return fmt.Errorf("pgtest: read postmaster.opts: %w", err)
		}
		// postmaster.opts is the binary's path, then its arguments.
		if i := strings.IndexByte(string(opts), ' '); i > 0 {
			args = append([]string{"-o", strings.TrimSpace(string(opts[i+1:]))}, args...)
		}
	}
	args = append([]string{"-D", data, "-l", filepath.Join(s.dir, "server.log"), "-w", "-t", "60"}, args...)
	if out, err := s.run(ctx, s.pgCtl, args...); err != nil {
		return fmt.Errorf("pgtest: pg_ctl %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

func (s *Server) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = s.dir
	if s.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
		cmd.Env = append(os.Environ(), "HOME="+s.dir)
	}
	return cmd.CombinedOutput()
}

func unprivileged() (*syscall.Credential, error) {
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, _ := strconv.ParseUint(u.Uid, 10, 32)
		gid, _ := strconv.ParseUint(u.Gid, 10, 32)
		return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
	}
	return nil, errors.New("pgtest: running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
