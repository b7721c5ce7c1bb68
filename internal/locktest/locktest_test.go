package locktest_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/pglockkit/kit/internal/locktest"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func TestOverlap(t *testing.T) {
	t.Parallel()
	var o locktest.Overlap
	o.Enter()
	o.Enter()
	o.Leave()
	o.Enter()
	if o.Now() != 2 || o.Max() != 2 {
		t.Fatalf("now %d, max %d; want 2, 2", o.Now(), o.Max())
	}
	o.Leave()
	o.Leave()
	if o.Now() != 0 || o.Max() != 2 {
		t.Fatalf("now %d, max %d; want 0, 2", o.Now(), o.Max())
	}
}

// TestReplicasFire: two replicas on one database see each other's locks;
// Fire spreads its requests over both and returns them in order.
func TestReplicasFire(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	served := map[string]int{}
	reps := make([]*locktest.Replica, 2)
	for i := range reps {
		reps[i] = locktest.NewReplica(t, 2, func(lk *pglock.Locker) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				served[fmt.Sprint(i)]++
				mu.Unlock()
				w.Header().Set("Retry-After", "7")
				fmt.Fprint(w, r.URL.Path)
			})
		})
	}
	res := locktest.Fire([]*httptest.Server{reps[0].Server, reps[1].Server}, 6, func(i int) string { return fmt.Sprint("/", i) })
	for i, r := range res {
		if r.Err != nil || r.Status != http.StatusOK || r.Body != fmt.Sprint("/", i) || r.RetryAfter != "7" {
			t.Errorf("request %d: %+v", i, r)
		}
	}
	if served["0"] != 3 || served["1"] != 3 {
		t.Errorf("served %v, want 3 each", served)
	}

	watch := pgtest.Pool(t, 1)
	name := pgtest.UniqueKey(t)
	key := locktest.Key(t, reps[0].Locker, name)
	held := locktest.HoldElsewhere(t, key)
	ok, err := reps[1].Locker.TryDo(context.Background(), name, func(context.Context) error { return nil })
	if err != nil || ok {
		t.Fatalf("TryDo on a key held elsewhere = %v, %v", ok, err)
	}
	waited := make(chan error, 1)
	go func() {
		waited <- reps[0].Locker.Do(context.Background(), name, func(context.Context) error { return nil })
	}()
	locktest.WaitFor(t, "one waiter", func() bool { return locktest.Waiters(t, watch, key) == 1 })
	if err := held.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := <-waited; err != nil {
		t.Fatal(err)
	}
	pgtest.WaitFree(t, watch, key)
	locktest.NoConnsLeft(t, reps[0].Pool, reps[1].Pool)
}

func TestTable(t *testing.T) {
	t.Parallel()
	db := pgtest.Pool(t, 1)
	tbl := locktest.Table(t, db)
	ctx := context.Background()
	if _, err := db.Exec(ctx, "INSERT INTO "+tbl+" VALUES ('a', 1), ('a', 2), ('b', 3)"); err != nil {
		t.Fatal(err)
	}
	if n := locktest.Count(t, db, tbl, "a"); n != 2 {
		t.Fatalf("Count = %d, want 2", n)
	}
	if _, err := db.Exec(ctx, "INSERT INTO "+tbl+" VALUES ('c', 1)"); err == nil {
		t.Fatal("a duplicate v committed")
	}
}

func TestCPUTime(t *testing.T) {
	t.Parallel()
	a := locktest.CPUTime()
	for end := time.Now().Add(20 * time.Millisecond); time.Now().Before(end); {
	}
	if b := locktest.CPUTime(); a <= 0 || b <= a {
		t.Fatalf("CPUTime %v then %v", a, b)
	}
}
