package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/pglockkit/kit/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// The example serves 64 requests on a pool of 4 and holds 1,000 locks on 2
// lock connections; make demo runs it.
func TestLockConns(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), &out, pgtest.URL(t)); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	for _, want := range []string{
		"64 requests at once on a pool of 4, each holding its key while it queries the pool: 64 x 200 OK",
		"1000 locks held at once by one Locker: 2 lock connections, 0 pool connections in use",
		"released: 0 held now",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}
