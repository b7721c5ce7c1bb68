package main

import (
	"context"
	"encoding/json"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Issue 25. pglock locks names the Leader that leads, and those that
// campaign: their sessions carry the Leaders' identities as
// application_name, shown in the APPLICATION column and in the JSON's
// application_name; on a Locker that multiplexes and on one that holds each
// key on a pool connection (WithMultiplexing(false)).
func TestLocksLeaderIdentity(t *testing.T) {
	for _, c := range []struct {
		name string
		opts []pglock.Option
	}{
		{"multiplexing", nil},
		{"per hold", []pglock.Option{pglock.WithMultiplexing(false)}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			testLocksLeaderIdentity(t, c.opts...)
		})
	}
}

func testLocksLeaderIdentity(t *testing.T, opts ...pglock.Option) {
	watch := pgtest.Pool(t, 2)
	name := pgtest.UniqueKey(t)
	key := keyOf(t, name)
	suffix := strconv.FormatInt(time.Now().UnixNano()%1e9, 36)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	leaders := make([]*pglock.Leader, 2)
	for i, id := range []string{"locks-leader-a-" + suffix, "locks-leader-b-" + suffix} {
		lk, err := pglock.NewLocker(pgtest.Pool(t, 2), opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = lk.Close() })
		ld, err := lk.Leader(name, pglock.LeaderConfig{Identity: id})
		if err != nil {
			t.Fatal(err)
		}
		leaders[i] = ld
		wg.Go(func() { _ = ld.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil }) })
		if i == 0 {
			deadline := time.Now().Add(10 * time.Second)
			for !ld.IsLeader() {
				if time.Now().After(deadline) {
					t.Fatal("the first Leader was not elected")
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
	}
	a, b := leaders[0], leaders[1]
	waiter := waitWaiter(t, watch, key)
	holderPID := grantedPID(t, watch, key)

	r := pglockRun(t, "locks", "--key", name)
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("pglock locks --key = %+v", r)
	}
	hp, wp := strconv.Itoa(int(holderPID)), strconv.Itoa(int(waiter.PID))
	lineWith(t, r.stdout, key.String(), name, "exclusive", "held", hp, a.Identity(), "blocks", wp)
	lineWith(t, r.stdout, key.String(), name, "exclusive", "waiting", wp, b.Identity(), "behind", hp)

	r = pglockRun(t, "locks", "--json", "--key", name)
	var entries []lockEntry
	if err := json.Unmarshal([]byte(r.stdout), &entries); err != nil || r.code != 0 {
		t.Fatalf("pglock locks --json = %+v: %v", r, err)
	}
	apps := map[bool]string{}
	for _, e := range entries {
		apps[e.Granted] = e.ApplicationName
	}
	if len(entries) != 2 || apps[true] != a.Identity() || apps[false] != b.Identity() {
		t.Errorf("pglock locks --json: application_name of the holder %q and the waiter %q, want %q and %q (%d entries)",
			apps[true], apps[false], a.Identity(), b.Identity(), len(entries))
	}
	cancel()
	wg.Wait()
	pgtest.WaitFree(t, watch, key)
}
