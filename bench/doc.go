// Package bench measures pglock beside raw pgx doing the same SQL on the same
// pool, in the same run. Each benchmark has two sub-benchmarks, pglock and
// raw; the ratio pglock/raw of their ns/op is the figure the README reports.
//
//	make bench   # or: go run ./internal/pgtest/withpg -- go test -run XXX -bench . -benchmem ./bench
package bench
