package grpclock_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/pglockkit/kit/grpclock"
	"github.com/pglockkit/kit/internal/pgtest"
	"github.com/pglockkit/kit/pglock"
)

// Bad configuration is an error from the constructors, never a panic and
// never an interceptor.
func TestConstructorErrors(t *testing.T) {
	t.Parallel()
	pool := pgtest.Pool(t, 2)
	locker, err := pglock.NewLocker(pool)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = locker.Close() })
	tx, err := pool.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background())
	txLocker, err := pglock.NewLocker(tx)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pool.Acquire(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	connLocker, err := pglock.NewLocker(conn)
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name   string
		locker *pglock.Locker
		opts   []grpclock.Option
		want   error
	}{
		{"nil locker", nil, nil, grpclock.ErrNilLocker},
		{"nil option", locker, []grpclock.Option{nil}, grpclock.ErrInvalidOption},
		{"nil key func", locker, []grpclock.Option{grpclock.WithKeyFunc(nil)}, grpclock.ErrInvalidOption},
		{"nil stream key func", locker, []grpclock.Option{grpclock.WithStreamKeyFunc(nil)}, grpclock.ErrInvalidOption},
		{"negative wait", locker, []grpclock.Option{grpclock.WithWait(-time.Second)}, grpclock.ErrInvalidOption},
		{"busy code OK", locker, []grpclock.Option{grpclock.WithBusyCode(codes.OK)}, grpclock.ErrInvalidOption},
		{"busy code out of range", locker, []grpclock.Option{grpclock.WithBusyCode(codes.Code(99))}, grpclock.ErrInvalidOption},
		{"no methods", locker, []grpclock.Option{grpclock.WithMethods()}, grpclock.ErrInvalidOption},
		{"bad method", locker, []grpclock.Option{grpclock.WithMethods("Service/Method")}, grpclock.ErrInvalidOption},
		{"bad scope", locker, []grpclock.Option{grpclock.WithScope(pglock.Scope(7))}, grpclock.ErrInvalidOption},
		{"locker on a transaction", txLocker, nil, grpclock.ErrInvalidOption},
		{"locker on one connection", connLocker, nil, grpclock.ErrInvalidOption},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u, err := grpclock.UnaryServerInterceptor(tc.locker, tc.opts...)
			if !errors.Is(err, tc.want) || u != nil {
				t.Errorf("UnaryServerInterceptor: %v, %v; want nil, %v", u != nil, err, tc.want)
			}
			s, err := grpclock.StreamServerInterceptor(tc.locker, tc.opts...)
			if !errors.Is(err, tc.want) || s != nil {
				t.Errorf("StreamServerInterceptor: %v, %v; want nil, %v", s != nil, err, tc.want)
			}
		})
	}

	// Good options make interceptors.
	u, err := grpclock.UnaryServerInterceptor(locker,
		grpclock.WithWait(time.Second), grpclock.WithBusyCode(codes.Unavailable),
		grpclock.WithMethods("/a.B/C", "/a.D/"), grpclock.WithScope(pglock.Transaction),
		grpclock.WithNamespace(""), grpclock.WithLogger(nil))
	if err != nil || u == nil {
		t.Fatalf("good options: %v", err)
	}
}
