#!/usr/bin/env bash
# Issue #13 item 3: degraded verdicts while Redis is healthy. A gateway (2 workers, the bench
# plans, its embedded Redis with `--redis-fsync FSYNC`) under a mixed load (10 % Checks, the
# rest StreamUsage in batches of 50 on 8 streams), with Redis' latency monitor on (10 ms), the
# load average sampled every 10 s, and at the end: the degraded verdicts (the load generator's
# table and its per-second series), Redis' LATENCY LATEST / HISTORY and INFO commandstats and
# errorstats, and the gateway's own store metrics (failures by cause, breaker openings,
# timeouts that ran late, late replies).
#
#   bash loadtest/healthy.sh run FSYNC RATE [SECONDS]      # a steady run (default 600 s)
#   bash loadtest/healthy.sh restart FSYNC RATE [SECONDS]  # the gateway restarted at 1/3 of it
#   bash loadtest/healthy.sh findmax FSYNC RATE            # the highest sustained rate from RATE
#
# FSYNC: always or everysec. Reports in loadtest/results/healthy-<mode>-<fsync>-<rate>.*
# (the generator's JSON and PNG, and a .txt with everything above; CHARGEPATH_HEALTHY_OUT names
# another folder, CHARGEPATH_HEALTHY_PORT another port than 50261). Exit status: the load
# generator's. Needs `make setup`.
set -u
MODE=${1:?mode: run, restart or findmax}
FSYNC=${2:?fsync: always or everysec}
RATE=${3:?rate: usages per second}
SECONDS_=${4:-600}
cd "$(dirname "$0")/.."
PORT=${CHARGEPATH_HEALTHY_PORT:-50261}
METRICS=$((PORT + 10))
DATA=$(mktemp -d /tmp/chargepath-healthy.XXXXXX)
OUT=${CHARGEPATH_HEALTHY_OUT:-loadtest/results}
NAME=healthy-$MODE-$FSYNC-$RATE
TXT=$OUT/$NAME.txt
mkdir -p "$OUT"
: > "$TXT"
say() { echo "$*" | tee -a "$TXT"; }

serve() {  # start the gateway; return once both workers serve (a restart: serve again)
  local before
  before=$(grep -c '"serving chargepath.v1' "$DATA/serve.log" 2>/dev/null)
  .venv/bin/chargepath serve --plans loadtest/bench-plans.yaml --port "$PORT" \
    --data-dir "$DATA" --redis-fsync "$FSYNC" --metrics-port "$METRICS" --log-level INFO \
    >> "$DATA/serve.log" 2>&1 &
  SUP=$!
  for _ in $(seq 1 600); do
    [ "$(grep -c '"serving chargepath.v1' "$DATA/serve.log")" -ge $((${before:-0} + 2)) ] && break
    sleep 0.1
  done
  say "$(date -u +%T.%N | cut -c1-12) serving ($(grep -c '"serving chargepath.v1' "$DATA/serve.log") serving lines in the log)"
  if [ "$(grep -c '"serving chargepath.v1' "$DATA/serve.log")" -lt $((${before:-0} + 2)) ]; then
    say "the gateway's two workers did not both serve within 60 s; its log:"
    tail -c 6000 "$DATA/serve.log" | tee -a "$TXT"
    kill -TERM "$SUP" 2>/dev/null; wait "$SUP" 2>/dev/null; rm -rf "$DATA"
    exit 3
  fi
  REDIS_PORT=$(sed -E 's#.*:([0-9]+)/.*#\1#' "$DATA/redis/url")
  rcli config set latency-monitor-threshold 10 > /dev/null
}
rcli() { REDISCLI_AUTH=$(cat "$DATA/redis/password") .venv/bin/redis-cli -p "$REDIS_PORT" "$@"; }
metrics() {  # the store metrics of both workers
  for p in "$METRICS" $((METRICS + 1)); do
    echo "worker on :$p"
    curl -s "localhost:$p/metrics" | grep -E '^chargepath_store_(failures|breaker_opened|errors|deadline_extended)_total|^chargepath_store_late_replies_total.* [1-9]' \
      | sed -E 's/otel_scope_[a-z_]+="[^"]*",?//g; s/,?\}/}/; s/\{\}//'
  done
}

serve
say "gateway pid $SUP on :$PORT, data $DATA, redis :$REDIS_PORT, appendfsync $(rcli config get appendfsync | tail -1)"
say "machine: $(nproc) cores, $(uptime)"
( while sleep 10; do echo "$(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; done ) > "$DATA/load.log" &
SAMPLER=$!
KEY=$(cat "$DATA/operator.key")
ARGS=(mixed --target "127.0.0.1:$PORT" --plans loadtest/bench-plans.yaml --check-share 0.1
  --batch 50 --streams 8 --api-key "$KEY" --out "$OUT" --name "$NAME" --quiet)
case "$MODE" in
  run)
    .venv/bin/python -m loadtest "${ARGS[@]}" --rate "$RATE" --duration "$SECONDS_" --warmup 5 \
      2>&1 | tee -a "$TXT"
    STATUS=${PIPESTATUS[0]}
    ;;
  findmax)
    .venv/bin/python -m loadtest "${ARGS[@]}" --rate "$RATE" --find-max --step-factor 1.2 \
      --step-seconds 15 --p99-bound-ms 50 2>&1 | tee -a "$TXT"
    STATUS=${PIPESTATUS[0]}
    ;;
  restart)
    .venv/bin/python -m loadtest "${ARGS[@]}" --rate "$RATE" --duration "$SECONDS_" --warmup 3 \
      > "$DATA/gen.out" 2>&1 &
    GEN=$!
    sleep $((SECONDS_ / 3 + 3))
    say "$(date -u +%T.%N | cut -c1-12) restarting the gateway (SIGTERM, then serve again on the same data dir)"
    say "metrics before the restart:"; metrics >> "$TXT"
    kill -TERM "$SUP"; wait "$SUP"
    say "$(date -u +%T.%N | cut -c1-12) stopped"
    serve
    say "AOF $(du -h "$DATA/redis" | tail -1 | cut -f1) on disk"
    wait "$GEN"
    STATUS=$?
    tee -a "$TXT" < "$DATA/gen.out"
    ;;
  *) echo "unknown mode $MODE" >&2; kill "$SAMPLER"; kill -TERM "$SUP"; exit 2 ;;
esac
kill "$SAMPLER"
{
  echo "--- degraded verdicts per second of the measured phase (seconds with any):"
  .venv/bin/python - "$OUT/$NAME.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for m in report["measurements"]:
    for phase in m["phases"]:
        per: dict[int, list[float]] = {}
        for flow in phase["flows"]:
            for p in flow["series"]:
                row = per.setdefault(int(p["t"]), [0.0, 0.0, 0.0])
                row[0] += p["usages_per_s"] or 0.0
                row[1] += p.get("degraded") or 0.0
                row[2] += p["errors"] or 0.0
        bad = [(t, r) for t, r in sorted(per.items()) if r[1] or r[2]]
        print(f"{phase['label']}: {sum(r[1] for r in per.values()):.0f} degraded, "
              f"{sum(r[2] for r in per.values()):.0f} failed operations")
        for t, (answered, degraded, errors) in bad[:60]:
            print(f"  t={t:4d}s answered {answered:7.0f} degraded {degraded:6.0f} failed ops {errors:4.0f}")
PY
  echo "--- load average every 10 s:"; cat "$DATA/load.log"
  echo "--- redis LATENCY LATEST (event, time, latest ms, max ms):"; rcli latency latest | paste - - - -
  for e in aof-fsync-always aof-write command fast-command; do
    echo "--- redis LATENCY HISTORY $e (>= 20 ms):"
    rcli latency history "$e" | paste - - | awk '$2 >= 20 {print strftime("%T", $1, 1), $2 " ms"}'
  done
  echo "--- redis INFO commandstats:"; rcli info commandstats | grep -E "evalsha|cmdstat_ping|script"
  echo "--- redis INFO errorstats (the errors behind failed_calls), and the commands that failed:"
  rcli info errorstats | grep -E "^errorstat_" || echo "none"
  rcli info commandstats | grep -E "(rejected|failed)_calls=[1-9]" || true
  echo "--- gateway store metrics:"; metrics
  echo "--- gateway log lines about the store:"
  grep -E 'store timeout|breaker|store unavailable|late store|waiting for the store' "$DATA/serve.log" | cut -c1-300 | tail -40
} | tee -a "$TXT"
kill -TERM "$SUP"; wait "$SUP"
rm -rf "$DATA"
echo "wrote $TXT"
exit "$STATUS"
