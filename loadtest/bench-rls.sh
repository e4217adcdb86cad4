#!/usr/bin/env bash
# The CPU of one Envoy RLS call against one Check (issue #17): one gateway process on the bench
# plans, loaded in alternating rounds with the `check` and `rls` scenarios at the same fixed
# rate (`python -m loadtest alternate`). Both ask for the same admit (cpaas-demo, the same keys,
# api.sms.send: the bench plans' envoy mapping), so Redis does the same work for each; the
# gateway's CPU time per call (from /proc, --target-pid) and the ratio rls/check per round are
# the figures. The store timeout is long so that no decision goes degraded on a busy machine (a
# degraded one skips Redis and would look cheaper; an RLS answer does not say it was degraded).
# Usage: bash loadtest/bench-rls.sh [rate] [seconds] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-300}
SECONDS_EACH=${2:-20}
ROUNDS=${3:-3}
PORT=${CHARGEPATH_BENCH_PORT:-50075}
DIR=$(mktemp -d /tmp/chargepath-bench-rls.XXXXXX)
.venv/bin/chargepath serve --plans loadtest/bench-plans.yaml --port "$PORT" --workers 1 \
  --data-dir "$DIR" --log-level ERROR --store-timeout-ms 1000 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT
# Ready once the port answers and the operator key is written.
for _ in $(seq 1 300); do
  [ -s "$DIR/operator.key" ] && (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break
  sleep 0.1
done
.venv/bin/python -m loadtest alternate --scenarios check,rls --rounds "$ROUNDS" \
  --target 127.0.0.1:"$PORT" --plans loadtest/bench-plans.yaml \
  --api-key "$(cat "$DIR/operator.key")" --target-pid "$PID" \
  --rate "$RATE" --duration "$SECONDS_EACH" --procs 1 --quiet --name "${NAME:-bench-rls}"
