package pglock_test

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// The logger names the key, scope, mode, wait and outcome; nil logs nothing.
func TestLogging(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	var buf syncBuffer
	logger := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	lk, err := pglock.NewLocker(pool, pglock.WithLogger(logger), pglock.WithMode(pglock.Shared))
	if err != nil {
		t.Fatal(err)
	}
	name := pgtest.UniqueKey(t)
	k, _ := lk.Key(name)
	holder, _ := pglock.NewLock(pool, k) // exclusive, silent
	if err := holder.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if ran, err := lk.TryDo(ctx, name, func(context.Context) error { return nil }); ran || err != nil {
		t.Fatalf("TryDo = %v, %v", ran, err)
	}
	if err := holder.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := lk.Do(ctx, name, func(context.Context) error { return nil }); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, want := range []string{
		`msg="pglock: busy" key=` + k.String() + ` scope=session mode=shared`,
		`msg="pglock: acquired" key=` + k.String() + ` scope=session mode=shared wait=`,
		`msg="pglock: released" key=` + k.String(),
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

// The observer sees every event with the lock's key, scope and mode.
func TestObserver(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := pgtest.Pool(t, 4)
	var mu sync.Mutex
	var got []pglock.Event
	obs := pglock.WithObserver(func(e pglock.Event) {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, e)
	})
	l, err := pglock.NewLock(pool, pgtest.UniqueKey(t), obs, pglock.WithScope(pglock.Transaction))
	if err != nil {
		t.Fatal(err)
	}
	other, _ := pglock.NewLock(pool, l.Key(), obs)
	if err := l.Do(ctx, func(ctx context.Context) error {
		ok, err := other.TryAcquire(ctx)
		if ok || err != nil {
			t.Errorf("TryAcquire = %v, %v", ok, err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	kinds := make([]string, len(got))
	for i, e := range got {
		kinds[i] = e.Kind.String()
		if e.Key != l.Key() {
			t.Errorf("event %v has key %v", e.Kind, e.Key)
		}
	}
	if strings.Join(kinds, ",") != "acquired,busy,released" {
		t.Fatalf("events = %v", kinds)
	}
	if got[0].Scope != pglock.Transaction || got[1].Scope != pglock.Session {
		t.Fatalf("scopes = %v, %v", got[0].Scope, got[1].Scope)
	}
}
