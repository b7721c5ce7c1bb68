package main

import (
	"strings"
	"testing"
)

// unreachable refuses connections at once.
const unreachable = "postgres://postgres@127.0.0.1:1/postgres?sslmode=disable&connect_timeout=5"

// Mistakes are one line on stderr and status 2, and run no command.
func TestBadInput(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "k", "--"}, "missing command after --"},
		{[]string{"run", "k", "echo", "hi"}, "missing -- between KEY and COMMAND"},
		{[]string{"run", "k"}, "missing -- COMMAND after KEY"},
		{[]string{"run"}, "missing KEY"},
		{[]string{"run", "--"}, "missing KEY"},
		{[]string{"run", "", "--", "true"}, "empty KEY"},
		{[]string{"run", "k", "--no-wait", "--", "true"}, "put flags before KEY"},
		{[]string{"run", "--bogus", "k", "--", "true"}, "flag provided but not defined: -bogus"},
		{[]string{"run", "--wait", "soon", "k", "--", "true"}, "invalid value"},
		{[]string{"run", "--wait", "-1s", "k", "--", "true"}, "negative"},
		{[]string{"run", "--wait", "1s", "--no-wait", "k", "--", "true"}, "exclude each other"},
		{[]string{"--database-url", "postgres://%zz", "run", "k", "--", "true"}, "--database-url: cannot parse"},
		{[]string{"run", "--database-url", "postgres://%zz", "k", "--", "true"}, "--database-url: cannot parse"},
		{[]string{"run", "--database-url", "host=127.0.0.1 port=notaport", "k", "--", "true"}, "cannot parse"},
		{[]string{"run", "--database-url", unreachable, "k", "--", "true"}, "cannot connect to the database"},
		{[]string{"locks", "--database-url", "postgres://%zz"}, "--database-url: cannot parse"},
		{[]string{"locks", "--database-url", unreachable}, "cannot connect to the database"},
		{[]string{"locks", "extra"}, "unexpected argument"},
		{[]string{"key"}, "missing STRING"},
		{[]string{"key", "--bogus", "x"}, "flag provided but not defined"},
		{[]string{"bogus"}, `unknown command "bogus"`},
		{[]string{"--bogus"}, "flag provided but not defined"},
		{[]string{"help", "bogus"}, `unknown command "bogus"`},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			t.Parallel()
			r := pglockRun(t, tc.args...)
			if r.code != exitUsage || r.stdout != "" {
				t.Fatalf("pglock %q = %+v, want status 2 and no output", tc.args, r)
			}
			assertOneLine(t, "stderr", r.stderr)
			if !strings.HasPrefix(r.stderr, "pglock") || !strings.Contains(r.stderr, tc.want) {
				t.Fatalf("stderr = %q, want %q", r.stderr, tc.want)
			}
			if strings.Contains(r.stderr, "%zz") && strings.Contains(r.stderr, "password") {
				t.Fatalf("stderr shows a password: %q", r.stderr)
			}
		})
	}
}

// A password in a bad URL is not printed.
func TestBadURLHidesPassword(t *testing.T) {
	t.Parallel()
	r := pglockRun(t, "locks", "--database-url", "postgres://u:sekrit@127.0.0.1:1/db?sslmode=disable&connect_timeout=bad")
	if r.code != exitUsage || strings.Contains(r.stderr, "sekrit") {
		t.Fatalf("pglock locks with a bad URL = %+v", r)
	}
	assertOneLine(t, "stderr", r.stderr)
}

// A bad DATABASE_URL is named as the culprit.
func TestBadDatabaseURL(t *testing.T) {
	t.Setenv("DATABASE_URL", "postgres://%zz")
	r := pglockRun(t, "locks")
	if r.code != exitUsage || !strings.Contains(r.stderr, "DATABASE_URL: cannot parse") {
		t.Fatalf("pglock locks with a bad DATABASE_URL = %+v", r)
	}
	assertOneLine(t, "stderr", r.stderr)
}

// Help goes to stdout with status 0; no command at all is a usage error.
func TestHelp(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"help"}, "Usage:\n\n\tpglock [--database-url URL] <command>"},
		{[]string{"-h"}, "Usage:"},
		{[]string{"--help"}, "Usage:"},
		{[]string{"help", "run"}, "usage: pglock run"},
		{[]string{"run", "-h"}, "usage: pglock run"},
		{[]string{"help", "locks"}, "usage: pglock locks"},
		{[]string{"locks", "--help"}, "usage: pglock locks"},
		{[]string{"help", "key"}, "usage: pglock key"},
		{[]string{"key", "-h"}, "usage: pglock key"},
	} {
		r := pglockRun(t, tc.args...)
		if r.code != 0 || r.stderr != "" || !strings.Contains(r.stdout, tc.want) {
			t.Fatalf("pglock %q = %+v, want %q on stdout", tc.args, r, tc.want)
		}
	}
	r := pglockRun(t)
	if r.code != exitUsage || r.stdout != "" || !strings.Contains(r.stderr, "Usage:") {
		t.Fatalf("pglock with no arguments = %+v", r)
	}
}

func TestOneLine(t *testing.T) {
	for in, want := range map[string]string{
		"plain":                              "plain",
		"failed to connect:\n a: x\n b: y\n": "failed to connect: a: x; b: y",
		"  tabs\tand  spaces ":               "tabs and spaces",
	} {
		if got := oneLine(in); got != want {
			t.Errorf("oneLine(%q) = %q, want %q", in, got, want)
		}
	}
}
