#!/usr/bin/env bash
# The cost of authentication and of TLS per Check (issue #12): one gateway process on the bench
# plans, run with and without authentication (API keys, verified once and then cached) and with
# and without TLS, in alternating rounds, each under the same fixed-rate Check load. The
# gateway's CPU time per call (from /proc, --target-pid) is the figure; the differences are what
# authentication and TLS cost. Certificates are made on the fly (trustme). The store timeout is
# long so that no decision goes degraded on a busy machine (a degraded one skips Redis, and
# would make its configuration look cheaper).
# Usage: bash loadtest/bench-auth.sh [check_rate] [seconds] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK_RATE=${1:-300}
SECONDS_EACH=${2:-20}
ROUNDS=${3:-2}
PORT=50074
OUT=loadtest/results
PY=.venv/bin/python
PKI=$(mktemp -d /tmp/chargepath-bench-pki.XXXXXX)
trap 'rm -rf "$PKI"' EXIT
$PY - "$PKI" <<'EOF'
import sys, trustme
d = sys.argv[1]
ca = trustme.CA()
ca.cert_pem.write_to_path(f"{d}/ca.pem")
leaf = ca.issue_cert("127.0.0.1", "localhost")
leaf.private_key_pem.write_to_path(f"{d}/server.key")
with open(f"{d}/server.pem", "wb") as out:
    out.write(b"".join(b.bytes() for b in leaf.cert_chain_pems))
EOF

run() { # name, auth (keys|none), tls (tls|plain)
  local name=$1 auth=$2 tls=$3 dir="/tmp/chargepath-bench-auth-$1"
  local serve_tls=() client_tls=() key=()
  if [ "$tls" = tls ]; then
    serve_tls=(--tls-cert "$PKI/server.pem" --tls-key "$PKI/server.key")
    client_tls=(--tls-ca "$PKI/ca.pem")
  fi
  rm -rf "$dir"
  .venv/bin/chargepath serve --plans loadtest/bench-plans.yaml --port $PORT --workers 1 \
    --data-dir "$dir" --log-level ERROR --auth "$auth" --store-timeout-ms 1000 "${serve_tls[@]}" &
  local pid=$!
  # The port opens once the gateway is ready (after it wrote its operator key).
  for _ in $(seq 1 300); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
    sleep 0.1
  done
  if [ "$auth" = keys ]; then
    key=(--api-key "$(cat "$dir/operator.key")")
  fi
  $PY -m loadtest check --target 127.0.0.1:$PORT --plans loadtest/bench-plans.yaml \
    --rate "$CHECK_RATE" --duration "$SECONDS_EACH" --procs 1 "${client_tls[@]}" "${key[@]}" \
    --target-pid $pid --quiet --name "auth-$name" --out $OUT | grep -E "run @" || true
  kill -TERM $pid
  wait $pid || true
}

for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round: plaintext, no auth"
  run plain-none none plain
  echo "== round $round: plaintext, API key (cached)"
  run plain-keys keys plain
  echo "== round $round: TLS, no auth"
  run tls-none none tls
  echo "== round $round: TLS, API key (cached)"
  run tls-keys keys tls
done
