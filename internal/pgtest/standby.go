package pgtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// StartStandby makes a hot standby of the throwaway cluster s (pg_basebackup
// -R from s, streaming replication), starts it on a free loopback port with
// the settings s was started with (StartThrowawayWith's own, then its extra
// ones) and hot_standby on, waits until it accepts connections and is in
// recovery, and returns it. Call Stop on it when done; Restart, StopServer,
// Start and Promote work on it too. It is an error for a server s did not
// start (not a throwaway); without pg_basebackup the error is ErrNoPostgres.
func (s *Server) StartStandby(ctx context.Context) (*Server, error) {
	if s == nil || s.dir == "" {
		return nil, errors.New("pgtest: a standby needs a throwaway cluster this process started")
	}
	cfg, err := pgx.ParseConfig(s.URL)
	if err != nil {
		return nil, fmt.Errorf("pgtest: the primary's URL: %w", err)
	}
	basebackup, err := pgBasebackup(filepath.Dir(s.pgCtl))
	if err != nil {
		return nil, err
	}
	st, err := newThrowaway(s.pgCtl, s.cred)
	if err != nil {
		return nil, err
	}
	args := []string{"-D", filepath.Join(st.dir, "data"), "-h", "127.0.0.1", "-p", strconv.Itoa(int(cfg.Port)),
		"-U", "postgres", "-X", "stream", "-R", "-c", "fast"}
	if help, err := exec.CommandContext(ctx, basebackup, "--help").Output(); err == nil && strings.Contains(string(help), "--no-sync") {
		args = append(args, "--no-sync")
	}
	if out, err := st.run(ctx, basebackup, args...); err != nil {
		os.RemoveAll(st.dir)
		return nil, fmt.Errorf("pgtest: pg_basebackup: %w\n%s", err, out)
	}
	// The primary's settings (a hot standby needs max_connections,
	// max_locks_per_transaction and the like at least as high as its
	// primary's), then hot_standby last so that it wins.
	st.extra = append(append([]string(nil), s.extra...), "-c hot_standby=on")
	if err := st.startNew(ctx, st.extra); err != nil {
		return nil, err
	}
	inRecovery, err := st.inRecovery(ctx)
	if err == nil && !inRecovery {
		err = errors.New("pgtest: the standby is not in recovery")
	}
	if err != nil {
		st.Stop()
		return nil, err
	}
	return st, nil
}

// pgBasebackup returns the path of pg_basebackup: beside pg_ctl in bin, else
// on PATH.
func pgBasebackup(bin string) (string, error) {
	p := filepath.Join(bin, "pg_basebackup")
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	if p, err := exec.LookPath("pg_basebackup"); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("pgtest: no pg_basebackup in %s or on PATH: %w", bin, ErrNoPostgres)
}

// StandbyT is StartStandby for one test or benchmark: it skips like
// ThrowawayT when there are no binaries, other failures are fatal, and the
// standby is stopped and removed when the test ends.
func (s *Server) StandbyT(tb testing.TB) *Server {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := s.StartStandby(ctx)
	if errors.Is(err, ErrNoPostgres) {
		tb.Skip(err)
	}
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(st.Stop)
	return st
}

// Promote promotes a standby started by StartStandby (pg_ctl promote -w)
// and waits until pg_is_in_recovery() is false: then it accepts writes.
func (s *Server) Promote(ctx context.Context) error {
	if err := s.ctl(ctx, "promote"); err != nil {
		return err
	}
	for {
		inRecovery, err := s.inRecovery(ctx)
		if err != nil {
			return err
		}
		if !inRecovery {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pgtest: promoted standby still in recovery: %w", context.Cause(ctx))
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// WaitReplayed waits until the standby s has replayed everything the
// primary had written when it was called (pg_current_wal_lsn() on the
// primary, compared with pg_last_wal_replay_lsn() on s), or ctx ends. It
// first commits a transaction on the primary with synchronous_commit on, so
// that commits made with the throwaway's synchronous_commit=off are written
// out, and counted, too.
func (s *Server) WaitReplayed(ctx context.Context, primary *Server) error {
	target, err := flushedLSN(ctx, primary.URL)
	if err != nil {
		return err
	}
	conn, err := pgx.Connect(ctx, s.URL)
	if err != nil {
		return fmt.Errorf("pgtest: standby: %w", err)
	}
	defer conn.Close(context.Background())
	for {
		var replayed *bool // NULL: s was never a standby
		if err := conn.QueryRow(ctx, "SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn", target).Scan(&replayed); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("pgtest: standby has not replayed up to %s: %w", target, context.Cause(ctx))
			}
			return fmt.Errorf("pgtest: standby's replay position: %w", err)
		}
		if replayed == nil {
			return errors.New("pgtest: not a standby (pg_last_wal_replay_lsn() is NULL)")
		}
		if *replayed {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pgtest: standby has not replayed up to %s: %w", target, context.Cause(ctx))
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// flushedLSN commits a transaction that writes WAL with synchronous_commit
// on at url, which writes out all WAL inserted before it, then returns
// pg_current_wal_lsn().
func flushedLSN(ctx context.Context, url string) (string, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return "", fmt.Errorf("pgtest: primary: %w", err)
	}
	defer conn.Close(context.Background())
	tx, err := conn.Begin(ctx)
	if err != nil {
		return "", fmt.Errorf("pgtest: primary: %w", err)
	}
	defer tx.Rollback(context.Background())
	if _, err := tx.Exec(ctx, "SET LOCAL synchronous_commit = on"); err != nil {
		return "", fmt.Errorf("pgtest: primary: %w", err)
	}
	// WAL that takes an xid: a transaction that wrote none commits
	// asynchronously whatever synchronous_commit says.
	if _, err := tx.Exec(ctx, "SELECT pg_logical_emit_message(true, 'pgtest', 'WaitReplayed')"); err != nil {
		return "", fmt.Errorf("pgtest: primary: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return "", fmt.Errorf("pgtest: primary: %w", err)
	}
	var lsn string
	if err := conn.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&lsn); err != nil {
		return "", fmt.Errorf("pgtest: primary's WAL position: %w", err)
	}
	return lsn, nil
}

// inRecovery returns pg_is_in_recovery() on s.
func (s *Server) inRecovery(ctx context.Context) (bool, error) {
	conn, err := pgx.Connect(ctx, s.URL)
	if err != nil {
		return false, err
	}
	defer conn.Close(context.Background())
	var in bool
	err = conn.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&in)
	return in, err
}

// Follow turns the throwaway cluster s, a primary until now, into a hot
// standby of primary, as a failover tool does with the old primary after a
// switchover: it stops s (pg_ctl stop -m fast, which ends every session and
// sends its last WAL to its standbys), points it at primary (standby.signal
// and primary_conninfo, following the newest timeline), starts it again and
// waits until it is in recovery. s must have stopped cleanly before primary
// was promoted past it (PostgreSQL cannot demote a server in place; an old
// primary that wrote past the promotion needs pg_rewind, which Follow does
// not run).
func (s *Server) Follow(ctx context.Context, primary *Server) error {
	if s == nil || s.dir == "" {
		return errors.New("pgtest: Follow needs a throwaway cluster this process started")
	}
	cfg, err := pgx.ParseConfig(primary.URL)
	if err != nil {
		return fmt.Errorf("pgtest: the new primary's URL: %w", err)
	}
	// A server already stopped (StopServer) is followed as it is.
	if inRecovery, err := s.inRecovery(ctx); err == nil {
		if inRecovery {
			return errors.New("pgtest: Follow: the server is already a standby")
		}
		if err := s.StopServer(ctx); err != nil {
			return err
		}
	}
	data := filepath.Join(s.dir, "data")
	conf := fmt.Sprintf("\nprimary_conninfo = 'host=127.0.0.1 port=%d user=postgres'\nrecovery_target_timeline = 'latest'\n", cfg.Port)
	f, err := os.OpenFile(filepath.Join(data, "postgresql.auto.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("pgtest: Follow: %w", err)
	}
	_, err = f.WriteString(conf)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("pgtest: Follow: %w", err)
	}
	signal := filepath.Join(data, "standby.signal")
	if err := os.WriteFile(signal, nil, 0o600); err != nil {
		return fmt.Errorf("pgtest: Follow: %w", err)
	}
	if s.cred != nil {
		if err := os.Chown(signal, int(s.cred.Uid), int(s.cred.Gid)); err != nil {
			return fmt.Errorf("pgtest: Follow: %w", err)
		}
	}
	if err := s.Start(ctx); err != nil {
		return err
	}
	inRecovery, err := s.inRecovery(ctx)
	if err == nil && !inRecovery {
		err = errors.New("pgtest: Follow: the server is not in recovery after its restart")
	}
	return err
}
