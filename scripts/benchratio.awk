# Summarizes `go test -bench` output of benchmarks that compare the library
# with raw pgx, one line per comparison, every figure the median over the
# runs (-count). make bench pipes into it. Three kinds of line:
#
# - A comparison: a benchmark with a "paired" sub-benchmark (pgtest.Paired,
#   or rounds of many goroutines) and usually "pglock" (or adapter) and "raw"
#   ones run alone. The line gives the paired ratio first (the unit it was
#   reported in, e.g. pglock/raw: the library's time per operation over raw
#   pgx's, measured alternately in one loop; the figure to trust on a noisy
#   machine), then each side's ns/op and allocs/op run alone, then the other
#   figures the paired sub-benchmark reports (pairs/s, percentiles, bytes per
#   lock...; not its per-side ns/op).
# - Contention (bench.BenchmarkContention, bench.BenchmarkTwoProcesses): a
#   paired sub-benchmark that reports <side>-grants/s, -p50-wait-us,
#   -p99-wait-us and -fairness for raw and for library sides, with
#   <side>/raw-grants and <side>/raw-p99. One line per library side, beside
#   raw: grants/s (and the ratio), the wait's p50 and p99 (and the p99
#   ratio), fairness (max/min grants per goroutine); when reported
#   (BenchmarkContention), the median over the rounds of the ratio within a
#   round (<side>/raw-grants-median) and the CPU time per grant of the
#   client and of the server (<side>-client-cpu-us/grant,
#   <side>-server-cpu-us/grant); and, when reported
#   (BenchmarkTwoProcesses), -share and -round-share: the smaller process's
#   share of the grants over the run, and in its worst round (0.5 is even).
# - Anything else with sub-benchmarks run alone (no paired one, e.g.
#   BenchmarkDoAllocs): each sub-benchmark's ns/op and allocs/op.
# Lines are grouped by package ("== <package>"), so that benchmarks of the
# same name in two packages stay apart.
function median(list,    n, a, i, j, t) {
	n = split(list, a, " ")
	if (n == 0) return ""
	for (i = 1; i <= n; i++) a[i] += 0
	for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
	return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function num(v) {
	return sprintf((v >= 100 || v <= -100) ? "%.0f" : "%.3g", v)
}
function med(base, unit) { return median(extra[base, unit]) }
/^pkg: / { pkg = $2 }
/^Benchmark/ {
	name = $1
	sub(/-[0-9]+$/, "", name)
	k = split(name, parts, "/")
	if (k < 2) next
	leaf = parts[k]
	# base: the package, a tab, the benchmark's name without its leaf
	base = pkg "\t" substr(name, 1, length(name) - length(leaf) - 1)
	if (!(base in seen)) { seen[base] = 1; order[++nb] = base }
	for (i = 4; i <= NF; i += 2) {
		v = $(i - 1); u = $(i)
		if (leaf != "paired") {
			if (u == "allocs/op") allocs[base, leaf] = allocs[base, leaf] " " v
			continue
		}
		if (u == "raw-grants/s") contention[base] = 1
		if (u ~ /\/raw$/) {
			ratio[base] = ratio[base] " " v
			rname[base] = u
		} else if (u !~ /(ns\/op|B\/op|allocs\/op)$/) {
			if (!((base, u) in extra)) units[base] = units[base] " " u
			extra[base, u] = extra[base, u] " " v
		}
	}
	if (leaf != "paired") {
		ns[base, leaf] = ns[base, leaf] " " $3
		if (!((base, leaf) in has)) { has[base, leaf] = 1; leaves[base] = leaves[base] " " leaf }
	}
}
function alone(base,    n, ls, i, line) {
	line = ""
	n = split(substr(leaves[base], 2), ls, " ")
	for (i = 1; i <= n; i++)
		line = line sprintf("  %s %6.0f ns/op %3d allocs", ls[i], median(ns[base, ls[i]]), median(allocs[base, ls[i]]))
	return line
}
END {
	w = 20
	for (b = 1; b <= nb; b++) {
		split(order[b], pn, "\t")
		if (length(pn[2]) > w) w = length(pn[2])
	}
	for (b = 1; b <= nb; b++) {
		base = order[b]
		split(base, pn, "\t")
		if (pn[1] != lastpkg) { lastpkg = pn[1]; print "== " pn[1] }
		bname = pn[2]
		if (base in contention) {
			# the library sides: every <side>/raw-grants
			n = split(substr(units[base], 2), us, " ")
			for (i = 1; i <= n; i++) {
				if (us[i] !~ /\/raw-grants$/) continue
				s = us[i]; sub(/\/raw-grants$/, "", s)
				share = ""
				if ((base, s "-share") in extra)
					share = sprintf("  share %.3g (worst round %.3g) vs %.3g (%.3g)", \
						med(base, s "-share"), med(base, s "-round-share"), med(base, "raw-share"), med(base, "raw-round-share"))
				if ((base, s "-client-cpu-us/grant") in extra) {
					cpu = sprintf("  cpu/grant client %s vs %s us", num(med(base, s "-client-cpu-us/grant")), num(med(base, "raw-client-cpu-us/grant")))
					if ((base, s "-server-cpu-us/grant") in extra)
						cpu = cpu sprintf(", server %s vs %s us", num(med(base, s "-server-cpu-us/grant")), num(med(base, "raw-server-cpu-us/grant")))
					share = cpu share
				}
				if ((base, s "/raw-grants-median") in extra)
					share = sprintf("  per-round median %.2fx", med(base, s "/raw-grants-median")) share
				printf "%-" w "s  %-7s grants/s %6s vs raw %6s = %.2fx  wait p50 %5s vs %5s us  p99 %6s vs %6s us = %.2fx  fairness %.3g vs %.3g%s\n", \
					bname, s, num(med(base, s "-grants/s")), num(med(base, "raw-grants/s")), med(base, s "/raw-grants"), \
					num(med(base, s "-p50-wait-us")), num(med(base, "raw-p50-wait-us")), \
					num(med(base, s "-p99-wait-us")), num(med(base, "raw-p99-wait-us")), med(base, s "/raw-p99"), \
					med(base, s "-fairness"), med(base, "raw-fairness"), share
			}
			continue
		}
		if (ratio[base] == "") {
			# No ratio to raw pgx (e.g. the library against itself): the
			# sub-benchmarks run alone and the paired one's figures.
			line = ""
			if (leaves[base] != "") line = alone(base)
			n = split(substr(units[base], 2), us, " ")
			for (i = 1; i <= n; i++) line = line "  " us[i] " " num(med(base, us[i]))
			if (line != "") printf "%-" w "s%s\n", bname, line
			continue
		}
		line = sprintf("%-" w "s  %s %.2f%s", bname, rname[base], median(ratio[base]), alone(base))
		n = split(substr(units[base], 2), us, " ")
		for (i = 1; i <= n; i++) line = line "  " us[i] " " num(med(base, us[i]))
		print line
	}
}
