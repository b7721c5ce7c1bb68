package pglock_test

// Stress (item 9 of issue 2): many goroutines on two pools, as two replicas
// of a service would be, contend for a few keys with every kind of call.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// stressTracker is the in-process view of one key's holders. A holder
// enters after its acquire returned and leaves before it calls release, so
// any overlap it sees is an overlap on the server too.
type stressTracker struct {
	mu        sync.Mutex
	excl      int
	shared    int
	maxShared int
}

func (tr *stressTracker) enter(t *testing.T, key int, mode pglock.Mode) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if mode == pglock.Exclusive {
		if tr.excl > 0 || tr.shared > 0 {
			t.Errorf("key %d: an exclusive holder entered while %d exclusive and %d shared holders held it", key, tr.excl, tr.shared)
		}
		tr.excl++
		return
	}
	if tr.excl > 0 {
		t.Errorf("key %d: a shared holder entered while %d exclusive holders held it", key, tr.excl)
	}
	tr.shared++
	tr.maxShared = max(tr.maxShared, tr.shared)
}

func (tr *stressTracker) leave(mode pglock.Mode) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if mode == pglock.Exclusive {
		tr.excl--
	} else {
		tr.shared--
	}
}

var errStress = errors.New("stress: fn failed on purpose")

type stressPanic struct{ op int64 }

// stressCounts are the outcomes, for the log and for checking that every
// path was taken.
type stressCounts struct {
	held, timedOut, busy, fnErr, panics atomic.Int64
}

// stressReplica is one replica's database handle.
type stressReplica struct {
	db    any        // *pgxpool.Pool or *sql.DB
	inUse func() int // connections checked out of it
}

func stressPgxReplica(t *testing.T) stressReplica {
	p := pgtest.Pool(t, 8)
	return stressReplica{db: p, inUse: func() int { return int(p.Stat().AcquiredConns()) }}
}

func stressSQLReplica(t *testing.T) stressReplica {
	db, err := sql.Open("pgx", pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(8)
	t.Cleanup(func() { db.Close() })
	return stressReplica{db: db, inUse: func() int { return db.Stats().InUse }}
}

// TestStress: 50 goroutines on two pgx pools of 8 connections (two replicas
// of a service), 3 keys, 2,000 operations mixing Acquire with random
// deadlines, TryAcquire, Do and TryDo with functions that succeed, fail or
// panic, in both modes and both scopes. Never two exclusive holders of a key
// at once, never exclusive with shared; afterwards no advisory lock remains
// on the keys and every connection is back in its pool.
func TestStress(t *testing.T) {
	stress(t, stressPgxReplica(t), stressPgxReplica(t))
}

// TestStressMixed is TestStress with one replica on pgxpool and the other on
// database/sql (pgx's stdlib driver): both contend for the same keys.
func TestStressMixed(t *testing.T) {
	stress(t, stressPgxReplica(t), stressSQLReplica(t))
}

func stress(t *testing.T, replicas ...stressReplica) {
	const goroutines = 50
	ops := int64(2000)
	if testing.Short() {
		ops = 400
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)

	watch := pgtest.Pool(t, 2)
	keys := make([]pglock.Key, 3)
	for i := range keys {
		keys[i] = faultKey(t)
	}
	trackers := make([]stressTracker, len(keys))
	var counts stressCounts
	var next atomic.Int64

	start := time.Now()
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(seed, uint64(g)))
			for {
				op := next.Add(1)
				if op > ops || t.Failed() {
					return
				}
				ki := r.IntN(len(keys))
				stressOp(t, r, op, replicas[r.IntN(len(replicas))].db, keys[ki], ki, &trackers[ki], &counts)
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Minute):
		t.Fatal("stress did not finish within 3 minutes: deadlock?")
	}
	elapsed := time.Since(start)

	for i, k := range keys {
		pgtest.WaitFree(t, watch, k)
		tr := &trackers[i]
		if tr.excl != 0 || tr.shared != 0 {
			t.Errorf("key %d: tracker left with %d exclusive and %d shared holders", i, tr.excl, tr.shared)
		}
	}
	for i, rp := range replicas {
		if n := rp.inUse(); n != 0 {
			t.Errorf("replica %d (%T): %d connections still checked out", i, rp.db, n)
		}
	}
	maxShared := 0
	for i := range trackers {
		maxShared = max(maxShared, trackers[i].maxShared)
	}
	t.Logf("%d ops in %v: %d held, %d timed out, %d busy, %d fn errors, %d panics; up to %d shared holders at once",
		min(next.Load(), ops), elapsed.Round(time.Millisecond), counts.held.Load(), counts.timedOut.Load(),
		counts.busy.Load(), counts.fnErr.Load(), counts.panics.Load(), maxShared)
	if !t.Failed() {
		for name, n := range map[string]int64{
			"held": counts.held.Load(), "timed out": counts.timedOut.Load(), "busy": counts.busy.Load(),
			"fn error": counts.fnErr.Load(), "panic": counts.panics.Load(),
		} {
			if n == 0 {
				t.Errorf("no %q outcome in %d ops: the stress did not exercise that path", name, ops)
			}
		}
	}
}

// stressOp runs one random operation on key.
func stressOp(t *testing.T, r *rand.Rand, op int64, db any, key pglock.Key, ki int, tr *stressTracker, c *stressCounts) {
	bg := context.Background()
	mode := pglock.Exclusive
	if r.IntN(3) == 0 {
		mode = pglock.Shared
	}
	scope := pglock.Session
	if r.IntN(2) == 0 {
		scope = pglock.Transaction
	}
	l, err := pglock.NewLock(db, key, pglock.WithMode(mode), pglock.WithScope(scope))
	if err != nil {
		t.Error(err)
		return
	}
	deadline := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(bg, time.Millisecond+stressDur(r, 200*time.Millisecond))
	}
	what := fmt.Sprintf("op %d (%s %s on key %d)", op, scope, mode, ki)

	// hold runs while the lock is held outside Do: enter, work, leave, release.
	hold := func() {
		c.held.Add(1)
		tr.enter(t, ki, mode)
		stressWorkFor(t, stressDur(r, 2*time.Millisecond), l.Tx(), l.SQLTx(), bg, what)
		tr.leave(mode)
		if err := l.Release(bg); err != nil {
			t.Errorf("%s: Release = %v", what, err)
		}
	}
	notAcquired := func(err error) {
		if errors.Is(err, pglock.ErrNotAcquired) && errors.Is(err, context.DeadlineExceeded) {
			c.timedOut.Add(1)
			return
		}
		t.Errorf("%s: unexpected error %v", what, err)
	}

	switch r.IntN(5) {
	case 0: // Acquire with a random deadline
		ctx, cancel := deadline()
		err := l.Acquire(ctx)
		cancel()
		if err != nil {
			notAcquired(err)
			return
		}
		hold()
	case 1: // TryAcquire
		ctx, cancel := context.WithTimeout(bg, 30*time.Second)
		ok, err := l.TryAcquire(ctx)
		cancel()
		switch {
		case err != nil:
			t.Errorf("%s: TryAcquire = %v", what, err)
		case !ok:
			c.busy.Add(1)
		default:
			hold()
		}
	default: // Do or TryDo, fn succeeds, fails or panics
		outcome := r.IntN(3)
		sleep := stressDur(r, 2*time.Millisecond)
		fn := func(ctx context.Context) error {
			c.held.Add(1)
			tr.enter(t, ki, mode)
			defer tr.leave(mode)
			tx, _ := pglock.TxFromContext(ctx)
			stx, _ := pglock.SQLTxFromContext(ctx)
			if (tx != nil || stx != nil) != (scope == pglock.Transaction) {
				t.Errorf("%s: TxFromContext gave %v, SQLTxFromContext %v in %s scope", what, tx, stx, scope)
			}
			// The work must not use fn's deadline: pgx closes a connection
			// whose query is cancelled, and with it the session lock.
			stressWorkFor(t, sleep, tx, stx, context.WithoutCancel(ctx), what)
			switch outcome {
			case 1:
				return errStress
			case 2:
				panic(stressPanic{op})
			}
			return nil
		}
		try := r.IntN(3) == 0
		var panicked any
		func() {
			defer func() { panicked = recover() }()
			if try {
				ctx, cancel := context.WithTimeout(bg, 30*time.Second)
				defer cancel()
				ran, err := l.TryDo(ctx, fn)
				switch {
				case !ran && err == nil:
					c.busy.Add(1)
				case !ran:
					t.Errorf("%s: TryDo = false, %v", what, err)
				case errors.Is(err, errStress) && outcome == 1:
					c.fnErr.Add(1)
				case err != nil || outcome != 0:
					t.Errorf("%s: TryDo = true, %v; fn outcome %d", what, err, outcome)
				}
				return
			}
			ctx, cancel := deadline()
			defer cancel()
			err := l.Do(ctx, fn)
			switch {
			case errors.Is(err, pglock.ErrNotAcquired):
				notAcquired(err)
			case errors.Is(err, errStress) && outcome == 1:
				c.fnErr.Add(1)
			case err != nil || outcome != 0:
				t.Errorf("%s: Do = %v; fn outcome %d", what, err, outcome)
			}
		}()
		switch p := panicked.(type) {
		case nil:
		case stressPanic:
			if p.op != op || outcome != 2 {
				t.Errorf("%s: re-raised panic %v, want stressPanic{%d}", what, p, op)
			}
			c.panics.Add(1)
		default:
			t.Errorf("%s: unexpected panic %v", what, p)
		}
	}
	if l.Held() {
		t.Errorf("%s: Held() after the operation ended", what)
	}
	select {
	case <-l.Lost():
		t.Errorf("%s: Lost() closed with no fault injected", what)
	default:
	}
}

// stressWorkFor is the protected work: a statement in the lock's transaction
// (Transaction scope) and a short sleep.
func stressWorkFor(t *testing.T, d time.Duration, tx pgx.Tx, stx *sql.Tx, ctx context.Context, what string) {
	var err error
	switch {
	case tx != nil:
		_, err = tx.Exec(ctx, "SELECT 1")
	case stx != nil:
		_, err = stx.ExecContext(ctx, "SELECT 1")
	}
	if err != nil {
		t.Errorf("%s: statement in the lock's transaction: %v", what, err)
	}
	time.Sleep(d)
}

// stressDur returns a random duration in [0, d).
func stressDur(r *rand.Rand, d time.Duration) time.Duration {
	return time.Duration(r.Int64N(int64(d)))
}
