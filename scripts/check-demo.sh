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
== 3b. Echo v5
answers: [201 Created 201 Created 201 Created 422 Unprocessable Entity 422 Unprocessable Entity]
stock: 0 (3 reserved, none oversold)
the SKU is busy elsewhere (the error matches echo5lock.ErrBusy)
replica-B answers: 409 Conflict, Retry-After: 1
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
== 9. OpenTelemetry
2 invoices sent; the report, held: TryDo ran false; a 50 ms wait: true
  pglock.do pglock.key_name=otel-demo:invoice:1 pglock.outcome=acquired
    pglock.acquire pglock.key_name=otel-demo:invoice:1 pglock.outcome=acquired
  pglock.trydo pglock.key_name=otel-demo:report pglock.outcome=busy
  pglock.acquire pglock.key_name=otel-demo:report pglock.outcome=cancelled error.type=timeout
pglock_lock_acquisitions_total{pglock_mode="exclusive",pglock_outcome="acquired",pglock_scope="session"} 3
pglock_lock_held{pglock_mode="exclusive",pglock_scope="session"} 0
every lock the demo took was released
WANT
# Written to a file, the demo is plain text, and its programs do not
# announce the server each (the demo's caller says which it is, once).
if grep -q $'\033' "$out"; then
	echo "check-demo: the demo wrote terminal escape codes to a file" >&2
	missing=1
fi
if grep -q '^PostgreSQL: ' "$out"; then
	echo "check-demo: an example printed which server it uses" >&2
	missing=1
fi
if [ "$missing" -ne 0 ]; then
	cat "$out"
	exit 1
fi
echo "check-demo: every section of the demo ran and showed what it should"
