#!/usr/bin/env bash
# Issue #6: a 10-minute sustained StreamUsage load (RATE reports/s in batches of 64) on a
# gateway with its embedded Redis, a `chargepath ledger consume` reading and acknowledging the
# ledger, and Redis' used_memory, ledger length and key count sampled every 15 s: memory must
# stay flat. Usage: bash loadtest/soak.sh [RATE]   (default 2000; about 11 minutes; prints the
# samples at the end)
set -u
RATE=${1:-2000}
cd "$(dirname "$0")/.."
pkill -f "port 50075"; sleep 1
rm -rf /tmp/soak-data
.venv/bin/chargepath serve --plans loadtest/bench-plans.yaml --port 50075 --data-dir /tmp/soak-data --log-level WARNING > /tmp/soak-serve.log 2>&1 &
SUP=$!
sleep 6
URL=$(cat /tmp/soak-data/redis/url)
# redis-cli -u does not undo the URL's percent-encoding of the password: give it the port and
# the password (REDISCLI_AUTH, never on a command line) instead
RPORT=$(sed -E 's#.*:([0-9]+)/.*#\1#' /tmp/soak-data/redis/url)
rcli() { REDISCLI_AUTH=$(cat /tmp/soak-data/redis/password) .venv/bin/redis-cli -p "$RPORT" "$@"; }
echo "redis on port $RPORT"
.venv/bin/chargepath ledger consume --tenant mvno-demo --group billing --redis-url "$URL" > /dev/null 2> /tmp/soak-consumer.log &
CONS=$!
( for i in $(seq 1 44); do
    M=$(rcli info memory | grep -E "^used_memory:" | cut -d: -f2 | tr -d '\r')
    L=$(rcli xlen "cp:{mvno-demo}:ledger" | tr -d '\r')
    K=$(rcli dbsize | tr -d '\r')
    echo "$(date +%T) used_memory=$M ledger_len=$L keys=$K"
    sleep 15
  done ) > /tmp/soak-mem.log &
SAMPLER=$!
.venv/bin/python -m loadtest stream --batch 64 --streams 8 --target 127.0.0.1:50075 --plans loadtest/bench-plans.yaml --rate "$RATE" --duration 600 --warmup 5 --name soak-10min --out loadtest/results --quiet --api-key "$(cat /tmp/soak-data/operator.key)"
kill $CONS; kill $SAMPLER
rcli xinfo groups "cp:{mvno-demo}:ledger"
kill -TERM $SUP; wait $SUP
cat /tmp/soak-mem.log
echo SOAK-DONE
