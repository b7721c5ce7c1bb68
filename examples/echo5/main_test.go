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
	s := out.String()
	for _, want := range []string{
		"answers: [201 Created 201 Created 201 Created 422 Unprocessable Entity 422 Unprocessable Entity]",
		"stock: 0 (3 reserved, none oversold)",
		"the SKU is busy elsewhere (the error matches echo5lock.ErrBusy)",
		"replica-B answers: 409 Conflict, Retry-After: 1",
		"replica-A answers: 200 OK",
		"done: no lock held",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("output lacks %q:\n%s", want, s)
		}
	}
	if strings.Count(s, "  recount of ") != 1 {
		t.Errorf("want exactly one recount to run:\n%s", s)
	}
}
