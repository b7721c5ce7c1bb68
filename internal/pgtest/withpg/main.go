// Command withpg runs a command with DATABASE_URL pointing at a PostgreSQL
// server: the one DATABASE_URL names, one at 127.0.0.1:5432, or a throwaway
// cluster it starts from the machine's binaries and stops afterwards.
//
//	go run ./internal/pgtest/withpg [-throwaway] [-install] [-install-pgbouncer] -- make test-modules
//
// It installs nothing unless asked, and then only as root on Debian or
// Ubuntu (where apt-get is), only what the machine lacks:
//
//   - -install installs the postgresql package when there is no server and
//     no binaries to start a throwaway one (make demo asks for this alone);
//   - -install-pgbouncer installs the pgbouncer package when there is no
//     pgbouncer binary: the PgBouncer tests run a real one (make test and
//     make bench ask for both).
//
// Elsewhere, or not as root, a missing server is an error that says what to
// install, and a missing pgbouncer is left to the tests that need it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
)

func main() {
	os.Exit(run())
}

func run() int {
	throwaway := flag.Bool("throwaway", false, "always start a throwaway cluster")
	install := flag.Bool("install", false, "as root on Debian, apt-get install postgresql when no server or binaries are found")
	installPgBouncer := flag.Bool("install-pgbouncer", false, "as root on Debian, apt-get install pgbouncer when it is missing (the PgBouncer tests need it)")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: withpg [-throwaway] [-install] [-install-pgbouncer] -- command [args...]")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	var s *pgtest.Server
	var err error
	if *throwaway {
		s, err = pgtest.StartThrowaway(ctx)
	} else {
		s, err = pgtest.FindOrStart(ctx)
	}
	if errors.Is(err, pgtest.ErrNoPostgres) && *install && canInstall() {
		fmt.Fprintln(os.Stderr, "withpg: no PostgreSQL found; installing Debian's postgresql package")
		if err = aptInstall(ctx, "postgresql"); err == nil {
			s, err = pgtest.StartThrowaway(ctx)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "withpg:", err)
		return 1
	}
	defer s.Stop()
	fmt.Fprintf(os.Stderr, "withpg: PostgreSQL (%s) at %s\n", s.Source, s.URL)
	if _, err := pgtest.PgBouncerBinary(); err != nil && *installPgBouncer && canInstall() {
		fmt.Fprintln(os.Stderr, "withpg: no pgbouncer found; installing Debian's pgbouncer package")
		if err := aptInstall(ctx, "pgbouncer"); err != nil {
			fmt.Fprintln(os.Stderr, "withpg:", err)
			return 1
		}
	}

	cmd := exec.Command(flag.Arg(0), flag.Args()[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), "DATABASE_URL="+s.URL)
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "withpg:", err)
		return 1
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		for sig := range sigs {
			_ = cmd.Process.Signal(sig)
		}
	}()
	err = cmd.Wait()
	signal.Stop(sigs)
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return exit.ExitCode()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "withpg:", err)
		return 1
	}
	return 0
}

func canInstall() bool {
	if os.Geteuid() != 0 {
		return false
	}
	_, err := exec.LookPath("apt-get")
	return err == nil
}

func aptInstall(ctx context.Context, pkg string) error {
	for _, args := range [][]string{{"update"}, {"install", "-y", "--no-install-recommends", pkg}} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("apt-get %v: %w", args, err)
		}
	}
	return nil
}
