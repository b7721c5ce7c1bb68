#!/usr/bin/env bash
# Runs the demo and checks that each section printed what it shows: make test
# calls it, so the README's demo command is tested on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp)
trap 'rm -f "$out"' EXIT
if ! ./scripts/demo.sh >"$out" 2>&1; then
	cat "$out"
	echo "check-demo: the demo failed" >&2
	exit 1
fi
missing=0
while IFS= read -r want; do
	if ! grep -qF -- "$want" "$out"; then
		echo "check-demo: the demo's output lacks: $want" >&2
		missing=1
	fi
done <<'WANT'
== 1. quickstart
Could not acquire lock!
ErrNotAcquired=true DeadlineExceeded=true held=false
most handlers inside at once for order 42: 1
409 Conflict, Retry-After: 1
each holding its key while it queries the pool: 64 x 200 OK
1000 locks held at once by one Locker: 2 lock connections, 0 pool connections in use
pg_locks: 1000 advisory locks on 2 sessions
balance: 60 (6 x 10: no update was lost)
ran the tick
msg="gocronlock: skip" replica=replica-
each tick ran on exactly one scheduler
most postings of one account at once: 1
transfer 2: Aborted
balance 60 (want 60); most deposits running at once: 1
exit status 75 (75: held elsewhere, skipped)
nightly-report  exclusive  held
replica 2 made the report
nightly-report: released
every lock the demo took was released
WANT
if [ "$missing" -ne 0 ]; then
	cat "$out"
	exit 1
fi
echo "check-demo: every section of the demo ran and showed what it should"
