package pgtest

import (
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"
)

var (
	keySeq  atomic.Int64
	keyBase = fmt.Sprintf("%d.%d", os.Getpid(), time.Now().UnixNano())
)

// UniqueKey returns a key name no other test, package or concurrent run
// uses: advisory locks are database-wide.
func UniqueKey(tb testing.TB) string {
	return fmt.Sprintf("pgtest:%s:%s:%d", keyBase, tb.Name(), keySeq.Add(1))
}
