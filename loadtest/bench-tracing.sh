#!/usr/bin/env bash
# The cost of tracing (issue #4): one gateway process on the bench plans, run four times with
# tracing off (OTEL_SDK_DISABLED), the default (no trace exporter configured: nothing sampled),
# every decision recorded, and 1% sampling, each under the same fixed-rate StreamUsage (batches
# of 64) and Check loads. The gateway's CPU time per usage (from /proc) is the steady figure;
# the difference per span is the cost of a span. No exporter runs, so the recorded runs measure
# building and recording spans, not exporting them.
# Usage: bash loadtest/bench-tracing.sh [stream_rate] [check_rate] [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
STREAM_RATE=${1:-2000}
CHECK_RATE=${2:-400}
SECONDS_EACH=${3:-20}
PORT=50073
OUT=loadtest/results
PY=.venv/bin/python

run() { # name, then env assignments for the gateway
  local name=$1
  shift
  rm -rf "/tmp/chargepath-bench-$name"
  env "$@" .venv/bin/chargepath serve --plans loadtest/bench-plans.yaml --port $PORT \
    --workers 1 --data-dir "/tmp/chargepath-bench-$name" --log-level WARNING &
  local pid=$!
  sleep 4
  # the gateway's operator key (authentication is on by default)
  local key
  key=$(cat "/tmp/chargepath-bench-$name/operator.key")
  $PY -m loadtest stream --target 127.0.0.1:$PORT --plans loadtest/bench-plans.yaml \
    --rate "$STREAM_RATE" --batch 64 --streams 8 --duration "$SECONDS_EACH" \
    --target-pid $pid --api-key "$key" --quiet --name "tracing-$name-stream" --out $OUT |
    grep -E "run @" || true
  $PY -m loadtest check --target 127.0.0.1:$PORT --plans loadtest/bench-plans.yaml \
    --rate "$CHECK_RATE" --duration "$SECONDS_EACH" \
    --target-pid $pid --api-key "$key" --quiet --name "tracing-$name-check" --out $OUT |
    grep -E "run @" || true
  kill -TERM $pid
  wait $pid || true
}

echo "== tracing off"
run off OTEL_SDK_DISABLED=true
echo "== default (no trace exporter: nothing sampled)"
run default
echo "== every decision recorded"
run all OTEL_TRACES_SAMPLER=parentbased_always_on
echo "== 1% sampled"
run 1pct OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01
