package pglock_test

// The proof of issue 20, item 5: every hold has a server-side bound. A
// holder that freezes (SIGSTOP) keeps its TCP sessions open, since its kernel
// still answers keepalives; only the server's idle timeouts free its locks.
// Each test below starts a real holder, a child process (this test binary,
// run as TestFrozenHelper), that takes a key through one path and says
// "held"; the test stops it, measures how long until another session can take
// the key, resumes it, and measures how long until the holder says "lost"
// (its Lost() closed), where the library watches the hold.

import (
	"bufio"
	"context"
	"database/sql"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

const (
	frozenModeEnv = "PGLOCK_FROZEN_MODE"
	frozenKeyEnv  = "PGLOCK_FROZEN_KEY"
	// frozenTxBound is the idle_in_transaction_session_timeout the
	// Transaction-scope holders run with: the pool's own setting, which the
	// lock keeps (its default bound, AbandonedTransactionTimeout, is a
	// minute: TestFrozenBoundSettings shows it set and undone).
	frozenTxBound = 3 * time.Second
	// frozenCallerBound is what the holders on a caller's connection or
	// transaction set themselves, as the package documentation says.
	frozenCallerBound = 3 * time.Second
	// frozenSlack is what the key's release may take past the bound: the
	// backend's exit, the poll below (every 50 ms), the race detector and
	// the package's other parallel tests.
	frozenSlack = 1500 * time.Millisecond
	// frozenResume bounds how long the resumed holder takes to say "lost".
	frozenResume = time.Second
)

// TestFrozenHelper is the holder process of the frozen-holder tests; run
// directly, it skips.
func TestFrozenHelper(t *testing.T) {
	mode := os.Getenv(frozenModeEnv)
	if mode == "" {
		t.Skip("the holder process of the frozen-holder tests")
	}
	frozenHolder(t, mode, os.Getenv(frozenKeyEnv))
}

// frozenHolder takes key through the path named by mode, prints "held", and
// prints "lost" when the hold's Lost() closes; it then waits to be killed.
func frozenHolder(t *testing.T, mode, key string) {
	ctx := context.Background()
	fail := func(err error) {
		fmt.Printf("error %v\n", err)
		os.Exit(2)
	}
	poolWith := func(params map[string]string) *pgxpool.Pool {
		cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
		if err != nil {
			fail(err)
		}
		cfg.MaxConns = 2
		for k, v := range params {
			cfg.ConnConfig.RuntimeParams[k] = v
		}
		pool, err := pgxpool.NewWithConfig(ctx, cfg)
		if err != nil {
			fail(err)
		}
		return pool
	}
	sqlWith := func(params string) *sql.DB {
		u := pgtest.URL(t)
		if params != "" {
			sep := "?"
			if strings.Contains(u, "?") {
				sep = "&"
			}
			u += sep + params
		}
		db, err := sql.Open("pgx", u)
		if err != nil {
			fail(err)
		}
		return db
	}
	txParams := map[string]string{"idle_in_transaction_session_timeout": fmt.Sprint(frozenTxBound.Milliseconds())}
	txQuery := url.Values{"idle_in_transaction_session_timeout": {fmt.Sprint(frozenTxBound.Milliseconds())}}.Encode()
	locker := func(conn any, opts ...pglock.Option) *pglock.Lock {
		lk, err := pglock.NewLocker(conn, opts...)
		if err != nil {
			fail(err)
		}
		l, err := lk.NewLock(key)
		if err != nil {
			fail(err)
		}
		return l
	}
	newLock := func(conn any, opts ...pglock.Option) *pglock.Lock {
		l, err := pglock.NewLock(conn, key, opts...)
		if err != nil {
			fail(err)
		}
		return l
	}
	var l *pglock.Lock
	switch mode {
	case "mux":
		l = locker(poolWith(nil))
	case "mux-block":
		// A lock connection that holds many locks, so that it runs inside a
		// transaction block, where idle_session_timeout does not apply; the
		// pool's own idle_in_transaction_session_timeout (none) does not
		// count on the Locker's sessions.
		lk, err := pglock.NewLocker(poolWith(map[string]string{"idle_in_transaction_session_timeout": "0"}), pglock.WithLockConns(1))
		if err != nil {
			fail(err)
		}
		for i := range 100 {
			other, err := lk.NewLock(fmt.Sprintf("%s-held-%d", key, i))
			if err != nil {
				fail(err)
			}
			if err := other.Acquire(ctx); err != nil {
				fail(err)
			}
		}
		if l, err = lk.NewLock(key); err != nil {
			fail(err)
		}
	case "perhold":
		l = locker(poolWith(nil), pglock.WithMultiplexing(false))
	case "new-pool":
		l = newLock(poolWith(nil))
	case "new-sqldb":
		l = newLock(sqlWith(""))
	case "tx-pool":
		l = locker(poolWith(txParams), pglock.WithScope(pglock.Transaction))
	case "tx-sqldb":
		l = newLock(sqlWith(txQuery), pglock.WithScope(pglock.Transaction))
	case "caller-conn":
		// What the documentation says for a caller's connection.
		conn, err := pgx.Connect(ctx, pgtest.URL(t))
		if err != nil {
			fail(err)
		}
		if _, err := conn.Exec(ctx, fmt.Sprintf("SET idle_session_timeout = %d", frozenCallerBound.Milliseconds())); err != nil {
			fail(err)
		}
		l = newLock(conn)
	case "caller-tx":
		// What the documentation says for a caller's transaction.
		conn, err := pgx.Connect(ctx, pgtest.URL(t))
		if err != nil {
			fail(err)
		}
		tx, err := conn.Begin(ctx)
		if err != nil {
			fail(err)
		}
		if _, err := tx.Exec(ctx, fmt.Sprintf("SET LOCAL idle_in_transaction_session_timeout = %d", frozenCallerBound.Milliseconds())); err != nil {
			fail(err)
		}
		l = newLock(tx)
	case "caller-sqltx":
		db := sqlWith("")
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			fail(err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("SET LOCAL idle_in_transaction_session_timeout = %d", frozenCallerBound.Milliseconds())); err != nil {
			fail(err)
		}
		l = newLock(tx)
	default:
		fail(fmt.Errorf("unknown mode %q", mode))
	}
	if err := l.Acquire(ctx); err != nil {
		fail(err)
	}
	fmt.Println("held")
	<-l.Lost()
	fmt.Println("lost")
	time.Sleep(time.Minute)
}

// frozenHold runs a holder through mode, freezes it, and checks that another
// session takes the key within bound of the freeze; then resumes it and,
// with watched, checks that the holder sees Lost() within frozenResume.
// Without watched (a caller's connection or transaction, which the library
// does not watch) only the server's bound is checked.
func frozenHold(t *testing.T, mode string, bound time.Duration, watched bool) {
	t.Parallel()
	if testing.Short() {
		t.Skip("freezes a holder for several seconds")
	}
	ctx := context.Background()
	probe := pgtest.Pool(t, 1)
	if v := abandonServerVersion(t, probe); v < 140000 {
		t.Skipf("server_version_num %d: the session bounds need idle_session_timeout (PostgreSQL 14)", v)
	}
	name := pgtest.UniqueKey(t)
	key, err := pglock.KeyOf(name)
	if err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(os.Args[0], "-test.run=^TestFrozenHelper$", "-test.count=1", "-test.timeout=2m")
	cmd.Env = append(os.Environ(), frozenModeEnv+"="+mode, frozenKeyEnv+"="+name)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() {
		_ = syscall.Kill(pid, syscall.SIGCONT)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	lines := make(chan string, 8)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		_, _ = io.Copy(io.Discard, out)
	}()
	expect := func(want string, within time.Duration) time.Duration {
		t.Helper()
		start := time.Now()
		timer := time.NewTimer(within)
		defer timer.Stop()
		for {
			select {
			case line, ok := <-lines:
				if !ok {
					t.Fatalf("holder exited before %q: stderr: %s", want, stderr.String())
				}
				if line == want {
					return time.Since(start)
				}
				if strings.HasPrefix(line, "error ") {
					t.Fatalf("holder: %s", line)
				}
			case <-timer.C:
				t.Fatalf("holder did not say %q within %v", want, within)
			}
		}
	}
	expect("held", 20*time.Second)
	// Let its watch start and ping a few times: a live holder is not cut.
	time.Sleep(time.Second)
	if !frozenTry(t, ctx, probe, key) {
		t.Fatalf("key %s free while the holder holds it", key)
	}

	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	deadline := stopped.Add(bound + frozenSlack)
	for frozenTry(t, ctx, probe, key) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: the frozen holder's key %s was not freed within %v (bound %v + slack %v)",
				mode, key, time.Since(stopped).Round(time.Millisecond), bound, frozenSlack)
		}
		time.Sleep(50 * time.Millisecond)
	}
	freed := time.Since(stopped)
	t.Logf("%s: another session took the key %v after SIGSTOP (bound %v)", mode, freed.Round(time.Millisecond), bound)

	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if !watched {
		return
	}
	took := expect("lost", frozenResume)
	t.Logf("%s: the resumed holder saw Lost() %v after SIGCONT", mode, took.Round(time.Millisecond))
}

// frozenTry reports whether key is held by another session: it tries the key
// on probe and gives it back at once.
func frozenTry(t *testing.T, ctx context.Context, probe *pgxpool.Pool, key pglock.Key) (busy bool) {
	t.Helper()
	var got bool
	err := probe.QueryRow(ctx, "SELECT pg_try_advisory_lock($1) AND pg_advisory_unlock($1)", key.Int64()).Scan(&got)
	if err != nil {
		t.Fatal(err)
	}
	return !got
}

func TestFrozenHolderMux(t *testing.T) {
	frozenHold(t, "mux", pglock.AbandonedSessionTimeout, true)
}

// The same with the lock connection inside its transaction block (it holds
// more than 64 locks).
func TestFrozenHolderMuxBlock(t *testing.T) {
	frozenHold(t, "mux-block", pglock.AbandonedSessionTimeout, true)
}

func TestFrozenHolderPerHold(t *testing.T) {
	frozenHold(t, "perhold", pglock.AbandonedSessionTimeout, true)
}

func TestFrozenHolderNewPool(t *testing.T) {
	frozenHold(t, "new-pool", pglock.AbandonedSessionTimeout, true)
}

func TestFrozenHolderNewSQLDB(t *testing.T) {
	frozenHold(t, "new-sqldb", pglock.AbandonedSessionTimeout, true)
}

func TestFrozenHolderTxPool(t *testing.T) {
	frozenHold(t, "tx-pool", frozenTxBound, true)
}

func TestFrozenHolderTxSQLDB(t *testing.T) {
	frozenHold(t, "tx-sqldb", frozenTxBound, true)
}

func TestFrozenHolderCallerConn(t *testing.T) {
	frozenHold(t, "caller-conn", frozenCallerBound, false)
}

func TestFrozenHolderCallerTx(t *testing.T) {
	frozenHold(t, "caller-tx", frozenCallerBound, false)
}

func TestFrozenHolderCallerSQLTx(t *testing.T) {
	frozenHold(t, "caller-sqltx", frozenCallerBound, false)
}

// TestFrozenBoundSettings: the settings a hold on a pool's connection
// applies are in force during the hold and undone when the connection goes
// back to the pool. The pool has one connection, which its AfterConnect hook
// gives idle_session_timeout = 42s (a session-level value that a RESET would
// lose).
func TestFrozenBoundSettings(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	probe := pgtest.Pool(t, 1)
	if v := abandonServerVersion(t, probe); v < 140000 {
		t.Skipf("server_version_num %d: the session bounds need idle_session_timeout (PostgreSQL 14)", v)
	}
	cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 1
	cfg.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
		_, err := c.Exec(ctx, "SET idle_session_timeout = '42s'")
		return err
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	show := func(q interface {
		QueryRow(context.Context, string, ...any) pgx.Row
	}, name string) string {
		t.Helper()
		var v string
		if err := q.QueryRow(ctx, "SELECT current_setting($1)", name).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}

	// Session scope: a busy try, a hold, and a wait cancelled leave 42s.
	name := pgtest.UniqueKey(t)
	key, _ := pglock.KeyOf(name)
	l, err := pglock.NewLock(pool, name)
	if err != nil {
		t.Fatal(err)
	}
	other, err := probe.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Release()
	if _, err := other.Exec(ctx, "SELECT pg_advisory_lock($1)", key.Int64()); err != nil {
		t.Fatal(err)
	}
	if ok, err := l.TryAcquire(ctx); err != nil || ok {
		t.Fatalf("TryAcquire on a busy key: %v, %v", ok, err)
	}
	if got := show(pool, "idle_session_timeout"); got != "42s" {
		t.Fatalf("after a busy try: idle_session_timeout %q, want 42s", got)
	}
	wctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	err = l.Acquire(wctx)
	cancel()
	if err == nil {
		t.Fatal("Acquire on a busy key succeeded")
	}
	if got := show(pool, "idle_session_timeout"); got != "42s" {
		t.Fatalf("after a cancelled wait: idle_session_timeout %q, want 42s", got)
	}
	if _, err := other.Exec(ctx, "SELECT pg_advisory_unlock($1)", key.Int64()); err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if got := show(pool, "idle_session_timeout"); got != "42s" {
		t.Fatalf("after the hold: idle_session_timeout %q, want 42s (restored)", got)
	}
	for _, c := range []struct {
		name string
		opts []pglock.Option
		want string
	}{
		{"default", nil, "1min"},
		{"interval", []pglock.Option{pglock.WithLostCheckInterval(20 * time.Second)}, "80s"},
	} {
		// Transaction scope: SET LOCAL for the transaction, gone after it.
		lk, err := pglock.NewLocker(pool, append(c.opts, pglock.WithScope(pglock.Transaction))...)
		if err != nil {
			t.Fatal(err)
		}
		for _, try := range []bool{false, true} {
			fn := func(ctx context.Context) error {
				tx, _ := pglock.TxFromContext(ctx)
				if got := show(tx, "idle_in_transaction_session_timeout"); got != c.want {
					t.Errorf("%s (try %v): idle_in_transaction_session_timeout %q in the hold, want %s", c.name, try, got, c.want)
				}
				return nil
			}
			if try {
				_, err = lk.TryDo(ctx, pgtest.UniqueKey(t), fn)
			} else {
				err = lk.Do(ctx, pgtest.UniqueKey(t), fn)
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := show(pool, "idle_in_transaction_session_timeout"); got != "0" {
				t.Fatalf("after the transaction: idle_in_transaction_session_timeout %q, want 0", got)
			}
		}
		_ = lk.Close()
	}
}

// The lock's own transaction gets its bound whatever its connection met
// first: a session whose idle_in_transaction_session_timeout is 0 gets
// AbandonedTransactionTimeout (SET LOCAL, the session's bound read once
// per connection), one that has its own keeps it, and after the
// transaction the session is as it was.
func TestTransactionBoundPerSession(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	for _, c := range []struct {
		name, own, want string
	}{{"none", "", "1min"}, {"own", "3s", "3s"}} {
		cfg, err := pgxpool.ParseConfig(pgtest.URL(t))
		if err != nil {
			t.Fatal(err)
		}
		cfg.MaxConns = 1
		if c.own != "" {
			cfg.ConnConfig.RuntimeParams["idle_in_transaction_session_timeout"] = c.own
		}
		pool, err := pgxpool.NewWithConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pool.Close)
		lk := muxLocker(t, pool, pglock.WithScope(pglock.Transaction))
		for i := range 3 { // the first hold reads the session's bound, the others use it
			err := lk.Do(ctx, pgtest.UniqueKey(t), func(ctx context.Context) error {
				tx, _ := pglock.TxFromContext(ctx)
				var v string
				if err := tx.QueryRow(ctx, "SELECT current_setting('idle_in_transaction_session_timeout')").Scan(&v); err != nil {
					return err
				}
				if v != c.want {
					t.Errorf("%s, hold %d: idle_in_transaction_session_timeout %q in the hold, want %s", c.name, i, v, c.want)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			var after string
			if err := pool.QueryRow(ctx, "SELECT current_setting('idle_in_transaction_session_timeout')").Scan(&after); err != nil {
				t.Fatal(err)
			}
			if want := map[string]string{"": "0", "3s": "3s"}[c.own]; after != want {
				t.Errorf("%s, after hold %d: idle_in_transaction_session_timeout %q, want %s", c.name, i, after, want)
			}
		}
	}
}
