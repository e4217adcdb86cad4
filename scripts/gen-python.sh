#!/usr/bin/env bash
# Regenerates the Python stubs from protos/ into server/chargepath/v1/ (the one folder of
# generated Python code). Never edit that folder by hand; CI runs `make check-gen`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=server/chargepath/v1
rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out=server --pyi_out=server --grpc_python_out=server \
  protos/chargepath/v1/*.proto
cat > "$OUT/__init__.py" <<'PYEOF'
# Code generated from protos/chargepath/v1 by scripts/gen-python.sh. DO NOT EDIT.
PYEOF
