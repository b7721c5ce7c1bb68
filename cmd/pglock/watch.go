package main

import (
	"context"
	"sync"
	"time"

	"github.com/pglockkit/kit/pglock"
)

// watchTx watches the connection of a lock held with --xact: the pglock
// package watches only session locks on a pool, because in transaction
// scope the lock's transaction belongs to the protected work. Here nobody
// else uses it, so it is pinged every interval (each ping bounded by
// timeout); lost closes when a ping fails, which means the connection, the
// transaction and the lock are gone, after cause is given the ping's error.
// stop ends the watch and waits for it; call it before the lock is released.
func watchTx(lock *pglock.Lock, interval, timeout time.Duration, cause *lostCause) (lost <-chan struct{}, stop func()) {
	tx := lock.Tx()
	ch := make(chan struct{})
	if tx == nil {
		return ch, func() {}
	}
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-t.C:
			}
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			err := tx.Conn().Ping(ctx)
			cancel()
			if err != nil {
				cause.set(err)
				close(ch)
				return
			}
		}
	})
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			close(quit)
			wg.Wait()
		})
	}
}
