package pglock_test

import (
	"context"
	"fmt"
	"log"

	"github.com/pglockkit/kit/pglock"
)

// Every replica can say which one leads: the leader's session carries its
// identity (by default the host name and process id) as application_name,
// which CurrentLeader reads from the server and OnNewLeader reports. Here
// two replicas, each with a Locker of its own; the first leads, then stops,
// and the second takes over.
func ExampleLeader_CurrentLeader() {
	pool := examplePool()
	defer pool.Close()
	seen := make(chan string, 4)
	var lockers []*pglock.Locker
	defer func() {
		for _, l := range lockers {
			l.Close()
		}
	}()
	replica := func(id string) *pglock.Leader {
		locker, err := pglock.NewLocker(pool)
		if err != nil {
			log.Fatal(err)
		}
		lockers = append(lockers, locker)
		leader, err := locker.Leader("example:report-scheduler", pglock.LeaderConfig{
			Identity:    id, // "" means "host-1:4242"
			OnNewLeader: func(leader string) { seen <- id + " sees " + leader },
		})
		if err != nil {
			log.Fatal(err)
		}
		return leader
	}
	a, b := replica("replica-a"), replica("replica-b")
	run := func(leader *pglock.Leader) (stop func()) {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = leader.Run(ctx, func(ctx context.Context) error { <-ctx.Done(); return nil })
		}()
		return func() { cancel(); <-done }
	}

	stopA := run(a)
	fmt.Println(<-seen) // a's own election
	stopB := run(b)
	fmt.Println(<-seen) // b, campaigning, sees a lead
	who, ok, err := b.CurrentLeader(context.Background())
	fmt.Println("b asks the server:", who, ok, err)
	stopA()
	fmt.Println(<-seen) // b's own election
	stopB()
	// Output:
	// replica-a sees replica-a
	// replica-b sees replica-a
	// b asks the server: replica-a true <nil>
	// replica-b sees replica-b
}
