package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/pglockkit/kit/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// The quickstart prints each example's outcome; make demo runs it.
func TestQuickstart(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), &out, pgtest.URL(t)); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	for _, want := range []string{
		"advisory key -464685171814670893",
		"== 1.", "Acquired lock!",
		"Could not acquire lock!",
		"Acquired lock through *sql.DB!",
		"committed: ledger has 1 row(s)",
		`Do returned "insufficient funds"; ledger still has 1 row(s); lock held: false`,
		"ErrNotAcquired=true DeadlineExceeded=true held=false",
		"done: nothing is left locked",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}
