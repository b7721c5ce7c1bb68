package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/pglockkit/kit/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func TestExample(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), &out, pgtest.URL(t)); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	for _, want := range []string{
		"answers: [201 201 201 201 201 201]",
		"balance: 60 (6 x 10",
		"answers: [422]",
		"balance: 60 (the failed",
		"done: no lock held",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}
