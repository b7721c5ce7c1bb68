package pgtest

import (
	"testing"
	"time"
)

// Paired measures lib and raw, two ways of doing the same work, by
// alternating them in one benchmark loop (swapping their order every
// iteration) and reports each one's ns/op ("<name>-ns/op", "raw-ns/op") and
// their ratio ("<name>/raw"). On a shared or virtual machine both sides see
// the same noise, so the ratio is steady where timings of separate
// sub-benchmarks are not. scripts/benchratio.awk summarizes it.
func Paired(b *testing.B, name string, lib, raw func()) {
	PairedAs(b, name, "raw", lib, raw)
}

// PairedAs is Paired with both sides named: it reports "<name>-ns/op",
// "<base>-ns/op" and "<name>/<base>" (for example a Locker holding many locks
// against one holding none).
func PairedAs(b *testing.B, name, base string, lib, raw func()) {
	var libT, rawT time.Duration
	i := 0
	for b.Loop() {
		t0 := time.Now()
		if i%2 == 0 {
			lib()
			t1 := time.Now()
			raw()
			libT, rawT = libT+t1.Sub(t0), rawT+time.Since(t1)
		} else {
			raw()
			t1 := time.Now()
			lib()
			rawT, libT = rawT+t1.Sub(t0), libT+time.Since(t1)
		}
		i++
	}
	b.ReportMetric(float64(libT.Nanoseconds())/float64(i), name+"-ns/op")
	b.ReportMetric(float64(rawT.Nanoseconds())/float64(i), base+"-ns/op")
	b.ReportMetric(float64(libT)/float64(rawT), name+"/"+base)
}

// PairedSameSQL is Paired with a third side, same: raw pgx sending exactly
// the statements the library sends (recorded from it), where raw is what
// code without the library would write. It rotates the three sides' order
// every iteration and reports each one's ns/op, "<name>/raw", and
// "<name>/same-sql": what the library's own work costs beyond its SQL.
func PairedSameSQL(b *testing.B, name string, lib, raw, same func()) {
	sides := [3]func(){lib, raw, same}
	var t [3]time.Duration
	i := 0
	for b.Loop() {
		for j := range 3 {
			s := (i + j) % 3
			t0 := time.Now()
			sides[s]()
			t[s] += time.Since(t0)
		}
		i++
	}
	b.ReportMetric(float64(t[0].Nanoseconds())/float64(i), name+"-ns/op")
	b.ReportMetric(float64(t[1].Nanoseconds())/float64(i), "raw-ns/op")
	b.ReportMetric(float64(t[2].Nanoseconds())/float64(i), "same-sql-ns/op")
	b.ReportMetric(float64(t[0])/float64(t[1]), name+"/raw")
	b.ReportMetric(float64(t[0])/float64(t[2]), name+"/same-sql")
}
