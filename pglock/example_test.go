package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglockkit/kit/pglock"
)

func examplePool() *pgxpool.Pool {
	pool, err := pgxpool.New(context.Background(), os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	return pool
}

// Two replicas must not send the same invoice twice: the one that gets the
// lock sends it.
func Example() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()

	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close() // it holds its locks on connections of its own
	err = locker.Do(ctx, "example:invoice:42", func(ctx context.Context) error {
		fmt.Println("sending invoice 42, alone in the cluster")
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}
	// Output: sending invoice 42, alone in the cluster
}

// KeyOf hashes names exactly as the Python package postgresql-lock does.
func ExampleKeyOf() {
	for _, name := range []any{"shared-identifier", "test", 42} {
		k, err := pglock.KeyOf(name)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(name, k)
	}
	// Output:
	// shared-identifier -464685171814670893
	// test -6248023315878667354
	// 42 -7867842753158719212
}

// TryAcquire never waits: a busy lock is reported as false.
func ExampleLock_TryAcquire() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()

	first, _ := pglock.NewLock(pool, "example:report")
	second, _ := pglock.NewLock(pool, "example:report")

	ok, err := first.TryAcquire(ctx)
	fmt.Println("first:", ok, err)
	ok, err = second.TryAcquire(ctx)
	fmt.Println("second:", ok, err)

	if err := first.Release(ctx); err != nil {
		log.Fatal(err)
	}
	ok, _ = second.TryAcquire(ctx)
	fmt.Println("second, after release:", ok)
	_ = second.Release(ctx)
	// Output:
	// first: true <nil>
	// second: false <nil>
	// second, after release: true
}

// Acquire waits until the context ends; the error then matches both
// ErrNotAcquired and the context's error.
func ExampleLock_Acquire() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()

	holder, _ := pglock.NewLock(pool, "example:migrate")
	if err := holder.Acquire(ctx); err != nil {
		log.Fatal(err)
	}
	defer holder.Release(ctx)

	waiter, _ := pglock.NewLock(pool, "example:migrate")
	wctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	err := waiter.Acquire(wctx)
	fmt.Println(errors.Is(err, pglock.ErrNotAcquired), errors.Is(err, context.DeadlineExceeded), waiter.Held())
	// Output: true true false
}

// In Transaction scope the work and the lock commit together; a failing
// function rolls both back.
func ExampleLock_Do_transaction() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()

	l, err := pglock.NewLock(pool, "example:ledger", pglock.WithScope(pglock.Transaction))
	if err != nil {
		log.Fatal(err)
	}
	err = l.Do(ctx, func(ctx context.Context) error {
		tx, _ := pglock.TxFromContext(ctx)
		var n int
		if err := tx.QueryRow(ctx, "SELECT 40 + 2").Scan(&n); err != nil {
			return err
		}
		fmt.Println("inside the lock's transaction:", n)
		return errors.New("changed my mind")
	})
	fmt.Println("rolled back:", err)
	// Output:
	// inside the lock's transaction: 42
	// rolled back: changed my mind
}

// Lost is closed when the connection of a held session lock dies; Do's
// function sees its context cancelled with cause ErrLockLost.
func ExampleLock_Lost() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()

	l, _ := pglock.NewLock(pool, "example:leader")
	err := l.Do(ctx, func(ctx context.Context) error {
		select {
		case <-ctx.Done():
			return context.Cause(ctx) // pglock.ErrLockLost
		case <-time.After(10 * time.Millisecond):
			fmt.Println("did the work while the lock was held")
			return nil
		}
	})
	fmt.Println(err)
	// Output:
	// did the work while the lock was held
	// <nil>
}

// A Locker on a pool holds its locks on a few lock connections of its own,
// not on a pool connection each: here 100 locks held at once on a pool of 2,
// whose connections stay free for the work.
func ExampleLocker_Stats() {
	ctx := context.Background()
	cfg, err := pgxpool.ParseConfig(os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	cfg.MaxConns = 2
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	locker, err := pglock.NewLocker(pool, pglock.WithLockConns(2))
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()

	var locks []*pglock.Lock
	for i := range 100 {
		l, err := locker.NewLock(fmt.Sprintf("example:stats:%d", i))
		if err != nil {
			log.Fatal(err)
		}
		if err := l.Acquire(ctx); err != nil {
			log.Fatal(err)
		}
		locks = append(locks, l)
	}
	s := locker.Stats()
	fmt.Printf("%d keys held on %d lock connections; pool connections in use: %d\n",
		s.HeldKeys, s.LockConns, pool.Stat().AcquiredConns())
	for _, l := range locks {
		if err := l.Release(ctx); err != nil {
			log.Fatal(err)
		}
	}
	fmt.Println("held after release:", locker.Stats().HeldKeys)
	// Output:
	// 100 keys held on 2 lock connections; pool connections in use: 0
	// held after release: 0
}

// Leader election: of all the replicas that run this, one at a time runs the
// outbox relay, for as long as it holds the lock; when it stops or its
// connection dies, another takes over at once. Here one replica leads and
// then stops.
func ExampleLeader() {
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()

	leader, err := locker.Leader("example:outbox-relay", pglock.LeaderConfig{
		OnElected: func(context.Context) { fmt.Println("elected") },
		OnDeposed: func(why error) { fmt.Println("stepped down:", why) },
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	err = leader.Run(ctx, func(ctx context.Context) error {
		fmt.Println("relaying the outbox; leader:", leader.IsLeader())
		stop() // a shutdown signal, in a real service
		<-ctx.Done()
		return nil
	})
	fmt.Println("Run:", err, "leader:", leader.IsLeader())
	// Output:
	// elected
	// relaying the outbox; leader: true
	// stepped down: context canceled
	// Run: context canceled leader: false
}

// An observer sees every event of a lock, for metrics: here a count of
// outcomes (package otellock turns them into OpenTelemetry metrics).
func ExampleWithObserver() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()

	counts := map[pglock.EventKind]int{}
	var mu sync.Mutex
	locker, err := pglock.NewLocker(pool, pglock.WithObserver(func(e pglock.Event) {
		mu.Lock()
		counts[e.Kind]++
		mu.Unlock()
	}))
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	for range 3 {
		if err := locker.Do(ctx, "example:observer", func(context.Context) error { return nil }); err != nil {
			log.Fatal(err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	fmt.Println(pglock.EventAcquired, counts[pglock.EventAcquired], pglock.EventReleased, counts[pglock.EventReleased])
	// Output: acquired 3 released 3
}

// A logger gets one line per event: acquired, busy, not acquired and
// released at Debug level, a lost lock or failed release at Warn, each with
// the key, scope, mode, and the wait or the hold's length.
func ExampleWithLogger() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()

	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		Level: slog.LevelDebug,
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			switch a.Key {
			case slog.TimeKey, "wait", "held":
				return slog.Attr{} // they vary from run to run
			}
			return a
		},
	}))
	l, err := pglock.NewLock(pool, pglock.Int64Key(4242), pglock.WithLogger(logger))
	if err != nil {
		log.Fatal(err)
	}
	if err := l.Do(ctx, func(context.Context) error { return nil }); err != nil {
		log.Fatal(err)
	}
	// Output:
	// level=DEBUG msg="pglock: acquired" key=4242 scope=session mode=exclusive
	// level=DEBUG msg="pglock: released" key=4242 scope=session mode=exclusive
}

// Fencing: the holder's write checks, in its own transaction, that its
// token is still the newest; a stale holder's (here: an older token) is
// refused. Migrate creates the schema tokens live in (once, from any
// replica).
func ExampleCheckFence() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()
	if _, err := pglock.Migrate(ctx, pool); err != nil {
		log.Fatal(err)
	}
	locker, err := pglock.NewLocker(pool, pglock.WithToken())
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	key, err := locker.Key("example:ledger:7")
	if err != nil {
		log.Fatal(err)
	}
	var token int64
	err = locker.Do(ctx, "example:ledger:7", func(ctx context.Context) error {
		token, _ = pglock.TokenFromContext(ctx) // strictly increasing per key
		return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			if err := pglock.CheckFence(ctx, tx, key, token); err != nil {
				return err // a newer holder exists: this write must not land
			}
			fmt.Println("writing with the newest token")
			return nil // the write, in tx
		})
	})
	if err != nil {
		log.Fatal(err)
	}
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		return pglock.CheckFence(ctx, tx, key, token-1) // a stale holder's
	})
	fmt.Println("stale token refused:", errors.Is(err, pglock.ErrFenced))
	// Output:
	// writing with the newest token
	// stale token refused: true
}

// A lock refused because the server is a hot standby: ErrNotPrimary, which
// also matches ErrUnavailable, so a caller that retries while the database
// is down retries through a failover too. (The test database is a primary:
// the lock is taken.)
func Example_notPrimary() {
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()
	err = locker.Do(context.Background(), "example-primary", func(context.Context) error { return nil })
	switch {
	case errors.Is(err, pglock.ErrNotPrimary):
		fmt.Println("a standby: point the pool at the primary")
	case errors.Is(err, pglock.ErrUnavailable):
		fmt.Println("the database is down: retry later")
	case err != nil:
		fmt.Println("error:", err)
	default:
		fmt.Println("locked on the primary")
	}
	// Output: locked on the primary
}

// A service function that locks an account runs on its own, and inside a
// caller that already holds that account's lock (a handler behind
// httplock, a job): there its Do runs at once in the caller's hold.
func ExampleLocker_Do_nested() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()

	debit := func(ctx context.Context, account string) error {
		return locker.Do(ctx, "example:account:"+account, func(ctx context.Context) error {
			fmt.Println("debit", account)
			return nil
		})
	}
	if err := debit(ctx, "7"); err != nil { // takes the lock
		log.Fatal(err)
	}
	err = locker.Do(ctx, "example:account:7", func(ctx context.Context) error {
		fmt.Println("close account 7")
		return debit(ctx, "7") // runs in this hold, at once
	})
	if err != nil {
		log.Fatal(err)
	}

	// Exclusive inside Shared would wait for itself: refused at once.
	reader, err := pglock.NewLocker(pool, pglock.WithMode(pglock.Shared))
	if err != nil {
		log.Fatal(err)
	}
	defer reader.Close()
	err = reader.Do(ctx, "example:account:7", func(ctx context.Context) error {
		return debit(ctx, "7")
	})
	fmt.Println(errors.Is(err, pglock.ErrSelfDeadlock))
	// Output:
	// debit 7
	// close account 7
	// debit 7
	// true
}

// Two transfers lock their source account, then, inside that hold, their
// destination: one from account 1 to 2, one from 2 to 1. Each holds what
// the other waits for; within about deadlock_timeout one of them fails
// with ErrDeadlock (and lets its account go), and the other goes on.
// (DoAll takes both accounts in one order, and never deadlocks.)
func ExampleErrDeadlock() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()

	var holding sync.WaitGroup
	holding.Add(2)
	transfer := func(from, to string) error {
		return locker.Do(ctx, "example:deadlock:"+from, func(ctx context.Context) error {
			holding.Done()
			holding.Wait() // both hold their source account
			return locker.Do(ctx, "example:deadlock:"+to, func(context.Context) error { return nil })
		})
	}
	errs := make(chan error, 2)
	go func() { errs <- transfer("1", "2") }()
	go func() { errs <- transfer("2", "1") }()
	deadlocks, done := 0, 0
	for range 2 {
		switch err := <-errs; {
		case errors.Is(err, pglock.ErrDeadlock):
			deadlocks++
		case err == nil:
			done++
		default:
			log.Fatal(err)
		}
	}
	fmt.Println("deadlocks:", deadlocks, "done:", done)
	// Output:
	// deadlocks: 1 done: 1
}

// A transfer locks both accounts, all or nothing: two transfers between the
// same accounts in opposite directions take the keys in the same order, so
// they cannot deadlock.
func ExampleLocker_DoAll() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()

	transfer := func(from, to string) error {
		return locker.DoAll(ctx, []any{"example:account:" + from, "example:account:" + to}, func(ctx context.Context) error {
			fmt.Println("transfer", from, "->", to)
			return nil
		})
	}
	var wg sync.WaitGroup
	wg.Go(func() { _ = transfer("1", "2") })
	wg.Go(func() { _ = transfer("2", "1") })
	wg.Wait()

	// A try holds all or none.
	ran, err := locker.TryDoAll(ctx, []any{"example:account:1", "example:account:2"}, func(ctx context.Context) error {
		return nil
	})
	fmt.Println(ran, err)
	// Unordered output:
	// transfer 1 -> 2
	// transfer 2 -> 1
	// true <nil>
}

// At most 2 exports run at once across every replica.
func ExampleSemaphore() {
	ctx := context.Background()
	pool := examplePool()
	defer pool.Close()
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		log.Fatal(err)
	}
	defer locker.Close()

	exports, err := locker.Semaphore("example:exports", 2)
	if err != nil {
		log.Fatal(err)
	}
	var running, most atomic.Int32
	var wg sync.WaitGroup
	for range 6 {
		wg.Go(func() {
			err := exports.Do(ctx, func(ctx context.Context) error {
				n := running.Add(1)
				for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
				}
				time.Sleep(10 * time.Millisecond) // the export
				running.Add(-1)
				return nil
			})
			if err != nil {
				log.Fatal(err)
			}
		})
	}
	wg.Wait()
	fmt.Println("at most", most.Load(), "at once")
	// Output: at most 2 at once
}
