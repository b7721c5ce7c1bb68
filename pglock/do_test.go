package pglock_test

import (
	"context"
	"runtime"
	"testing"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// runtime.Goexit in fn (t.FailNow in a test) ends the hold and lets the
// goroutine exit; it is not turned into a panic.
func TestGoexitInDo(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t, 2)
	watch := pgtest.Pool(t, 2)
	for _, scope := range []pglock.Scope{pglock.Session, pglock.Transaction} {
		l, err := pglock.NewLock(pool, pgtest.UniqueKey(t), pglock.WithScope(scope))
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = l.Do(context.Background(), func(context.Context) error {
				runtime.Goexit()
				return nil
			})
		}()
		<-done
		if l.Held() {
			t.Errorf("%v: held after fn called Goexit", scope)
		}
		pgtest.WaitFree(t, watch, l.Key())
	}
}
