package echolock_test

import (
	"testing"

	"github.com/pglockkit/kit/internal/echosuite"
)

// BenchmarkRequest is echosuite.BenchmarkRequest on Echo v4: a request
// through the middleware beside the same Echo handler locking with raw pgx
// (and with pglock) itself.
func BenchmarkRequest(b *testing.B) { echosuite.BenchmarkRequest(b, adapter) }
