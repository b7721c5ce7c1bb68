// Package bench measures pglock beside raw pgx (or raw database/sql) doing
// the same SQL on the same pool, in the same run.
//
// Every comparison runs with a cancellable context, as callers' contexts are
// (a request's, an RPC's, a job's), and also with context.Background(), for
// which pgx and the library skip watching the context: sub-benchmarks
// "cancellable" and "background". An uncontended comparison has three
// sub-benchmarks: "pglock" and "raw" alone (ns/op, allocs/op) and "paired"
// (pgtest.Paired), which alternates the two in one loop and reports their
// ratio, pglock/raw: the figure to trust on a shared machine, and the one
// the README reports.
//
// Benchmarks of many goroutines at once (contention_bench_test.go,
// mux_bench_test.go) have only a "paired" sub-benchmark, which alternates
// library and raw rounds and reports throughput (grants/s, pairs/s), wait
// percentiles, fairness, the time to take 10,000 locks and the heap per held
// lock, with their ratios to raw. BenchmarkTwoProcesses
// (twoproc_bench_test.go) runs its rounds in two OS processes (the test
// binary run again as TestTwoProcHelper) contending for one key, and also
// reports each process's share of the grants.
//
// scripts/benchratio.awk summarizes the output, one line per comparison.
//
//	make bench   # or: go run ./internal/pgtest/withpg -- go test -run XXX -bench . -benchmem ./bench
package bench
