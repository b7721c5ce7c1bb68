package pglocktest_test

import (
	"testing"

	"github.com/pglockkit/kit/internal/pgtest"
)

// The conformance tests run against PostgreSQL too: pgtest finds or starts
// one, and checks for leaked goroutines.
func TestMain(m *testing.M) { pgtest.Main(m) }
