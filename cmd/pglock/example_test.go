package main

import (
	"context"
	"fmt"
	"os"
)

// Print the key a name maps to: the same number in Go (pglock.KeyOf), in
// Python (postgresql-lock) and in pg_locks.
func Example_key() {
	run(context.Background(), []string{"key", "test", "shared-identifier"}, os.Stdout, os.Stderr, nil)
	// Output:
	//                  INT64         HIGH         LOW  NAME
	//   -6248023315878667354  -1454731291  -860775514  test
	//    -464685171814670893   -108192948  1503157715  shared-identifier
}

// Run a command under a lock, as a crontab line would:
//
//	pglock run --no-wait report:hourly -- echo "only one of us runs this"
//
// The command's output is pglock's; the status is the command's, or 75 when
// another session holds the key.
func Example_run() {
	key := fmt.Sprintf("example:report:%d", os.Getpid()) // tests never share a key
	status := run(context.Background(),
		[]string{"run", "--no-wait", key, "--", "echo", "only one of us runs this"},
		os.Stdout, os.Stderr, nil)
	fmt.Println("status", status)
	// Output:
	// only one of us runs this
	// status 0
}
