package pglocktest_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/pglockkit/kit/middleware/httplock"
	"github.com/pglockkit/kit/pglock"
	"github.com/pglockkit/kit/pglock/pglocktest"
)

// A handler under httplock loses its lock halfway (the server ended its
// session, a failover): its request context ends with a cause matching
// pglock.ErrLockLost, and it stops and says so instead of finishing work
// that another replica may now be doing. The double makes the loss happen
// on cue, with no database.
func Example_lostLock() {
	srv := pglocktest.NewServer()
	locker, err := pglocktest.NewLocker(srv)
	if err != nil {
		panic(err)
	}
	defer locker.Close()

	started := make(chan struct{})
	export := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(started)
		select {
		case <-r.Context().Done():
			if errors.Is(context.Cause(r.Context()), pglock.ErrLockLost) {
				http.Error(w, "export abandoned: lock lost", http.StatusServiceUnavailable)
				return
			}
		case <-time.After(time.Minute): // the export's work
		}
		fmt.Fprintln(w, "exported")
	})
	h, err := httplock.Handler(locker, httplock.Query("account"), export)
	if err != nil {
		panic(err)
	}

	rec := httptest.NewRecorder()
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.ServeHTTP(rec, httptest.NewRequest("POST", "/export?account=7", nil))
	}()
	<-started
	key, _ := locker.Key(httplock.DefaultNamespace + "7")
	fmt.Println("holders:", len(srv.Holders(key)))
	fmt.Println("lost:", srv.Lose(key))
	<-done
	fmt.Print(rec.Code, " ", rec.Body.String())
	fmt.Println("holders:", len(srv.Holders(key)))
	// Output:
	// holders: 1
	// lost: 1
	// 503 export abandoned: lock lost
	// holders: 0
}

// The database goes away while a report runs under its lock, and comes
// back: the report's context ends with a cause matching pglock.ErrLockLost
// (the restart ended its session), acquires fail with
// pglock.ErrUnavailable while the server is down (tell "down" from "busy"
// with it), and go through again once it is up.
func ExampleServer_SetDown() {
	srv := pglocktest.NewServer()
	locker, err := pglocktest.NewLocker(srv)
	if err != nil {
		panic(err)
	}
	defer locker.Close()
	ctx := context.Background()

	err = locker.Do(ctx, "report", func(ctx context.Context) error {
		srv.SetDown(true) // the database stops while the report runs
		<-ctx.Done()
		fmt.Println("report stopped, lock lost:", errors.Is(context.Cause(ctx), pglock.ErrLockLost))
		return context.Cause(ctx)
	})
	fmt.Println("Do lost its lock:", errors.Is(err, pglock.ErrLockLost))

	_, err = locker.TryDo(ctx, "report", func(context.Context) error { return nil })
	fmt.Println("while down, unavailable:", errors.Is(err, pglock.ErrNotAcquired) && errors.Is(err, pglock.ErrUnavailable))

	srv.SetDown(false) // the database is back
	err = locker.Do(ctx, "report", func(context.Context) error { return nil })
	fmt.Println("back up:", err)
	// Output:
	// report stopped, lock lost: true
	// Do lost its lock: true
	// while down, unavailable: true
	// back up: <nil>
}
