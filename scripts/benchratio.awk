# Summarizes `go test -bench` output of benchmarks that compare the library
# with raw pgx: for each benchmark, the median ns/op and allocs/op of its
# "pglock" (or adapter) and "raw" sub-benchmarks run alone, and the median
# ratio reported by its "paired" sub-benchmark, which alternates the two in
# one loop (the figure to trust on a noisy machine). make bench pipes into it.
# Other figures a "paired" sub-benchmark reports (pairs/s, percentiles, bytes
# per lock...; not its per-side ns/op) follow the ratio, as medians.
function median(list,    n, a, i, j, t) {
	n = split(list, a, " ")
	for (i = 1; i <= n; i++) a[i] += 0
	for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
	return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
/^Benchmark/ {
	name = $1
	sub(/-[0-9]+$/, "", name)
	k = split(name, parts, "/")
	if (k < 2) next
	leaf = parts[k]
	base = substr(name, 1, length(name) - length(leaf) - 1)
	if (!(base in seen)) { seen[base] = 1; order[++nb] = base }
	for (i = 4; i <= NF; i++) {
		if ($(i) ~ /\/raw$/ && leaf == "paired") ratio[base] = ratio[base] " " $(i - 1)
		if ($(i) == "allocs/op" && leaf != "paired") allocs[base, leaf] = $(i - 1)
		if (leaf == "paired" && i % 2 == 0 && $(i) !~ /(\/raw|ns\/op|B\/op|allocs\/op)$/) {
			if (!((base, $(i)) in extra)) units[base] = units[base] " " $(i)
			extra[base, $(i)] = extra[base, $(i)] " " $(i - 1)
		}
	}
	if (leaf != "paired") {
		ns[base, leaf] = ns[base, leaf] " " $3
		if (!((base, leaf) in has)) { has[base, leaf] = 1; leaves[base] = leaves[base] " " leaf }
	}
}
END {
	for (b = 1; b <= nb; b++) {
		base = order[b]
		if (ratio[base] == "") continue
		line = sprintf("%-40s", base)
		n = split(substr(leaves[base], 2), ls, " ")
		for (i = 1; i <= n; i++)
			line = line sprintf("  %s %6.0f ns/op %3d allocs", ls[i], median(ns[base, ls[i]]), allocs[base, ls[i]])
		line = sprintf("%s  paired ratio %.2f", line, median(ratio[base]))
		n = split(substr(units[base], 2), us, " ")
		for (i = 1; i <= n; i++) {
			v = median(extra[base, us[i]])
			line = line sprintf((v >= 1000 || v <= -1000) ? "  %s %.0f" : "  %s %.3g", us[i], v)
		}
		print line
	}
}
