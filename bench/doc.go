// Package bench measures pglock beside raw pgx doing the same SQL on the same
// pool, in the same run. Each benchmark has two sub-benchmarks, pglock and
// raw; the ratio pglock/raw of their ns/op is the figure the README reports.
//
// The multiplexing Locker's benchmarks (mux_bench_test.go) measure many
// goroutines at once: their "paired" sub-benchmark alternates library and raw
// rounds and reports throughput (pairs/s, grants/s), wait percentiles, the
// time to take 10,000 locks and the heap per held lock, besides pglock/raw.
//
//	make bench   # or: go run ./internal/pgtest/withpg -- go test -run XXX -bench . -benchmem ./bench
package bench
