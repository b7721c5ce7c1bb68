package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// The demo runs two nodes and prints the serialized order; make demo runs it.
func TestRiverDemo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out bytes.Buffer
	start := time.Now()
	if err := run(ctx, &out, pgtest.URL(t)); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	t.Logf("ran in %v:\n%s", time.Since(start), out.String())
	for _, want := range []string{
		"producer: inserted 12 postings for 3 accounts",
		"  acct-A: #", "  acct-B: #", "  acct-C: #",
		"most postings of one account at once: 1\n",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	if n := strings.Count(out.String(), " start\n"); n != 12 {
		t.Errorf("%d postings ran, want 12", n)
	}
	if n := strings.Count(out.String(), "@node-"); n != 12 {
		t.Errorf("the order lists %d postings, want 12", n)
	}
}
