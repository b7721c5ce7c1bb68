#!/usr/bin/env bash
# The demo behind `make demo`: every capability of pglockkit in a few
# seconds of output. make demo runs it under withpg, which sets DATABASE_URL
# (a server found or a throwaway one started); run by hand, set DATABASE_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?set DATABASE_URL, or run: make demo}"

bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
# Section titles in bold on a terminal; plain text when stdout is a pipe or
# a file, or when NO_COLOR is set (https://no-color.org).
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then
	section() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
	section() { printf '\n== %s\n' "$*"; }
fi

echo "building the examples and the pglock command..."
go build -o "$bin/" ./cmd/pglock
(cd examples && go build -o "$bin/" ./quickstart ./http ./echo ./echo5 ./cron ./gocron ./river ./grpc ./lockconns ./otel)

section "1. quickstart: the Python package's README examples, in Go"
"$bin/quickstart"

section "2. net/http: two replicas of a service serialize requests for one key"
"$bin/http"

section "2b. lock connections: a held lock costs no pool connection"
"$bin/lockconns"

section "3. Echo v4: the same for an Echo service, with transaction scope"
"$bin/echo"

section "3b. Echo v5: no SKU oversold across two replicas; a busy key refused with 409"
"$bin/echo5"

section "4. cron: one of three schedulers runs each tick"
"$bin/cron" 2>/dev/null

section "4b. gocron v2: the same with three gocron schedulers and gocronlock's Locker"
"$bin/gocron" 2>/dev/null

section "5. River: jobs of one key run one at a time across two nodes"
"$bin/river"

section "6. gRPC: a call for a busy key is rejected with Aborted"
"$bin/grpc"

section "7. pglock run: a crontab line made a cluster singleton"
pglock() { "$bin/pglock" "$@"; }
echo "\$ pglock key nightly-report"
pglock key nightly-report
echo "\$ pglock run --no-wait nightly-report -- sleep 2   (replica 1, in the background)"
pglock run --no-wait nightly-report -- sleep 2 &
holder=$!
sleep 0.5
for replica in 2 3; do
	echo "\$ pglock run --no-wait nightly-report -- echo report   (replica $replica)"
	set +e
	pglock run --no-wait nightly-report -- echo "replica $replica made the report"
	status=$?
	set -e
	echo "  exit status $status (75: held elsewhere, skipped)"
done

section "8. pglock locks: who holds what, mid-way"
echo "\$ pglock locks --key nightly-report"
pglock locks --key nightly-report
wait "$holder"
echo "\$ pglock run --no-wait nightly-report -- echo ...   (after replica 1 finished)"
pglock run --no-wait nightly-report -- echo "replica 2 made the report"
echo "\$ pglock locks --key nightly-report"
after=$(pglock locks --key nightly-report)
echo "$after"
if grep -q ' nightly-report ' <<<"$after"; then
	echo "nightly-report is still held" >&2
	exit 1
fi
echo "nightly-report: released"

section "9. OpenTelemetry: the spans of a Locker's locks, and its metrics as Prometheus reads them"
# The example prints every pglock series; the demo keeps the acquisitions and
# the locks held (go run ./examples/otel prints them all).
"$bin/otel" | grep -v -E '^  pglock_(lock_(hold|wait)_duration|locker)_'
echo "  ... and the wait and hold durations, the Locker's connections, queue and lock-table use"

section "done"
echo "every lock the demo took was released; nothing it started is left running"
