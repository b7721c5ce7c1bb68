package pglock_test

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"

	"github.com/pglockkit/kit/pglock"
)

// Health endpoints for Kubernetes: the Locker's check (can it reach its
// server?) for the readiness probe, the Leader's (does the server confirm
// the lock it believes it holds?) for the liveness probe.
func ExampleHealthHandler() {
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	leader, err := locker.Leader("example:health", pglock.LeaderConfig{})
	if err != nil {
		log.Fatal(err)
	}

	mux := http.NewServeMux()
	mux.Handle("/readyz", pglock.HealthHandler(locker.CheckHealth))
	mux.Handle("/livez", pglock.HealthHandler(leader.CheckHealth))
	probe := func(path string) {
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		fmt.Printf("%s: %d %s", path, rec.Code, rec.Body)
	}

	probe("/readyz")
	probe("/livez") // not leading: healthy
	ctx, stop := context.WithCancel(context.Background())
	_ = leader.Run(ctx, func(ctx context.Context) error {
		probe("/livez") // leading, and the server confirms it
		stop()
		return nil
	})
	// Output:
	// /readyz: 200 ok
	// /livez: 200 ok
	// /livez: 200 ok
}
