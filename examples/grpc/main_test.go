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

// The demo shows a busy transfer rejected and serialized deposits.
func TestGRPCDemo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out bytes.Buffer
	start := time.Now()
	if err := run(ctx, &out, pgtest.URL(t)); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	t.Logf("ran in %v:\n%s", time.Since(start), out.String())
	for _, want := range []string{
		"  transfer 1: OK on replica-1\n",
		"  transfer 2: Aborted (grpclock: busy",
		"balance 60 (want 60); most deposits running at once: 1\n",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	if n := strings.Count(out.String(), "  deposit 10 on replica-"); n != 6 {
		t.Errorf("%d deposits ran, want 6", n)
	}
}
