package pglock_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Issue 24, re-entrant Do: a Do or TryDo of a key inside the function of an
// enclosing Do of the same key, on the same database, runs at once in the
// enclosing hold (which it does not end), in every kind of Locker and with
// NewLock on the same pool; a nesting that the enclosing hold cannot cover
// fails at once with ErrSelfDeadlock. Seen failing before: the nested Do
// waited for the enclosing hold until its context ended.
func TestNestedDoRunsInTheEnclosingHold(t *testing.T) {
	pool := pgtest.Pool(t, 8)
	watch := pgtest.Pool(t, 2)
	bg := context.Background()
	lockers := map[string]*pglock.Locker{
		"multiplexing": muxLocker(t, pool),
		"per hold":     muxLocker(t, pool, pglock.WithMultiplexing(false)),
	}
	for name, lk := range lockers {
		t.Run(name, func(t *testing.T) {
			name := pgtest.UniqueKey(t)
			key, err := lk.Key(name)
			if err != nil {
				t.Fatal(err)
			}
			// Bounded, so that a nested Do that waits on itself fails the
			// test instead of hanging it.
			ctx, cancel := context.WithTimeout(bg, 10*time.Second)
			defer cancel()
			ran := 0
			err = lk.Do(ctx, name, func(ctx context.Context) error {
				if err := lk.Do(ctx, name, func(ctx context.Context) error {
					ran++
					// Nested twice, with TryDo, and a NewLock on the pool.
					ok, err := lk.TryDo(ctx, name, func(context.Context) error { ran++; return nil })
					if !ok || err != nil {
						t.Errorf("TryDo nested in two Do of its key = %v, %v; want true, nil", ok, err)
					}
					l, err := pglock.NewLock(pool, key)
					if err != nil {
						return err
					}
					return l.Do(ctx, func(context.Context) error { ran++; return nil })
				}); err != nil {
					return err
				}
				if hs := pgtest.Granted(t, watch, key); len(hs) != 1 {
					t.Errorf("after the nested Do returned, %d sessions hold the key, want 1 (the enclosing hold)", len(hs))
				}
				return nil
			})
			if err != nil {
				t.Fatalf("Do with nested Do of its key = %v", err)
			}
			if ran != 3 {
				t.Errorf("the nested functions ran %d times, want 3", ran)
			}
			pgtest.WaitFree(t, watch, key)
		})
	}

	t.Run("across Lockers of one pool", func(t *testing.T) {
		name := pgtest.UniqueKey(t)
		a, b := lockers["multiplexing"], muxLocker(t, pool)
		ctx, cancel := context.WithTimeout(bg, 10*time.Second)
		defer cancel()
		ran := false
		if err := a.Do(ctx, name, func(ctx context.Context) error {
			return b.Do(ctx, name, func(context.Context) error { ran = true; return nil })
		}); err != nil || !ran {
			t.Errorf("Do of another Locker on the same pool, nested = %v (ran %v); want nil, ran", err, ran)
		}
	})

	t.Run("another key is locked", func(t *testing.T) {
		lk := lockers["multiplexing"]
		outer, inner := pgtest.UniqueKey(t)+"-outer", pgtest.UniqueKey(t)+"-inner"
		ik, _ := lk.Key(inner)
		if err := lk.Do(bg, outer, func(ctx context.Context) error {
			return lk.Do(ctx, inner, func(context.Context) error {
				if hs := pgtest.Granted(t, watch, ik); len(hs) != 1 {
					t.Errorf("a nested Do of another key: %d holders of it, want 1", len(hs))
				}
				return nil
			})
		}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("modes and scopes", func(t *testing.T) {
		lk := lockers["multiplexing"]
		shared := muxLocker(t, pool, pglock.WithMode(pglock.Shared))
		txl := muxLocker(t, pool, pglock.WithScope(pglock.Transaction))
		for _, c := range []struct {
			name         string
			outer, inner *pglock.Locker
			selfDeadlock bool
			wantOuterTx  bool
		}{
			{"exclusive in exclusive", lk, lk, false, false},
			{"shared in exclusive", lk, shared, false, false},
			{"shared in shared", shared, shared, false, false},
			{"exclusive in shared", shared, lk, true, false},
			{"session in transaction", txl, lk, false, true},
			{"transaction in transaction", txl, txl, false, true},
			{"transaction in session", lk, txl, true, false},
		} {
			name := pgtest.UniqueKey(t)
			ctx, cancel := context.WithTimeout(bg, 10*time.Second)
			ran := false
			var innerErr error
			err := c.outer.Do(ctx, name, func(ctx context.Context) error {
				outerTx, _ := pglock.TxFromContext(ctx)
				start := time.Now()
				innerErr = c.inner.Do(ctx, name, func(ctx context.Context) error {
					ran = true
					if tx, ok := pglock.TxFromContext(ctx); c.wantOuterTx && (!ok || tx != outerTx) {
						t.Errorf("%s: the nested function's transaction is not the enclosing one", c.name)
					}
					return nil
				})
				if c.selfDeadlock && time.Since(start) > 5*time.Second {
					t.Errorf("%s: the refusal took %v", c.name, time.Since(start))
				}
				return nil
			})
			cancel()
			if err != nil {
				t.Errorf("%s: the enclosing Do = %v", c.name, err)
			}
			switch {
			case c.selfDeadlock:
				if !errors.Is(innerErr, pglock.ErrSelfDeadlock) || !errors.Is(innerErr, pglock.ErrDeadlock) ||
					!errors.Is(innerErr, pglock.ErrNotAcquired) || ran {
					t.Errorf("%s: nested Do = %v (ran %v); want ErrSelfDeadlock, ErrDeadlock and ErrNotAcquired, not run", c.name, innerErr, ran)
				}
			case innerErr != nil || !ran:
				t.Errorf("%s: nested Do = %v (ran %v); want nil, ran", c.name, innerErr, ran)
			}
		}
	})

	t.Run("after the enclosing hold ended", func(t *testing.T) {
		lk := lockers["multiplexing"]
		name := pgtest.UniqueKey(t)
		var kept context.Context
		if err := lk.Do(bg, name, func(ctx context.Context) error { kept = ctx; return nil }); err != nil {
			t.Fatal(err)
		}
		ran := false
		err := lk.Do(kept, name, func(context.Context) error { ran = true; return nil })
		if !errors.Is(err, pglock.ErrNotAcquired) || ran {
			t.Errorf("Do in the context of an ended Do = %v (ran %v); want ErrNotAcquired, not run", err, ran)
		}
	})

	t.Run("a caller's transaction is its session's", func(t *testing.T) {
		name := pgtest.UniqueKey(t)
		key, _ := pglock.KeyOf(name)
		tx, err := pool.Begin(bg)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = tx.Rollback(bg) }()
		l1, _ := pglock.NewLock(tx, key)
		l2, _ := pglock.NewLock(tx, key)
		ctx, cancel := context.WithTimeout(bg, 10*time.Second)
		defer cancel()
		if err := l1.Do(ctx, func(ctx context.Context) error {
			// The same Lock nested in itself, then another Lock of the key.
			if err := l1.Do(ctx, func(context.Context) error { return nil }); err != nil {
				t.Errorf("a Lock's Do nested in its own Do = %v, want nil", err)
			}
			return l2.Do(ctx, func(ctx context.Context) error {
				if got, _ := pglock.TxFromContext(ctx); got != pgx.Tx(tx) {
					t.Error("the nested Do on the caller's transaction runs in another transaction")
				}
				return nil
			})
		}); err != nil {
			t.Errorf("nested Do on a caller's transaction = %v", err)
		}
	})
}

// Issue 24, deadlocks: two sessions, each holding one key and waiting for
// the other's (NewLock on one connection each, as the Python package locks):
// PostgreSQL's deadlock detector ends one wait, which fails with
// ErrDeadlock (and ErrNotAcquired, the 40P01 error reachable with
// errors.As); once that side lets its key go, the other is granted.
func TestDeadlockBetweenSessions(t *testing.T) {
	bg := context.Background()
	url := pgtest.URL(t)
	conns := make([]*pgx.Conn, 2)
	for i := range conns {
		c, err := pgx.Connect(bg, url)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close(bg) })
		conns[i] = c
	}
	k1, _ := pglock.KeyOf(pgtest.UniqueKey(t) + "-1")
	k2, _ := pglock.KeyOf(pgtest.UniqueKey(t) + "-2")
	keys := [2][2]pglock.Key{{k1, k2}, {k2, k1}}
	var first, second [2]*pglock.Lock
	for i := range 2 {
		var err error
		if first[i], err = pglock.NewLock(conns[i], keys[i][0]); err != nil {
			t.Fatal(err)
		}
		if second[i], err = pglock.NewLock(conns[i], keys[i][1]); err != nil {
			t.Fatal(err)
		}
		if err := first[i].Acquire(bg); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(bg, 20*time.Second)
	defer cancel()
	type result struct {
		i   int
		err error
	}
	results := make(chan result, 2)
	start := time.Now()
	for i := range 2 {
		go func() { results <- result{i, second[i].Acquire(ctx)} }()
	}
	r := <-results
	elapsed := time.Since(start)
	if !errors.Is(r.err, pglock.ErrDeadlock) || !errors.Is(r.err, pglock.ErrNotAcquired) {
		t.Fatalf("the first wait to end: %v; want ErrDeadlock and ErrNotAcquired", r.err)
	}
	t.Logf("session %d's wait ended after %v: %v", r.i, elapsed, r.err)
	if elapsed > 5*time.Second {
		t.Errorf("the deadlock was ended after %v (deadlock_timeout is 1 s by default)", elapsed)
	}
	if err := first[r.i].Release(bg); err != nil {
		t.Fatal(err)
	}
	other := <-results
	if other.err != nil {
		t.Errorf("the other wait = %v, want granted once the deadlock was broken", other.err)
	} else {
		_ = second[other.i].Release(bg)
	}
	_ = first[other.i].Release(bg)
}
