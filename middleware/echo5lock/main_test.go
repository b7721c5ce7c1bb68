package echo5lock_test

import (
	"testing"

	"github.com/pglockkit/kit/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }
