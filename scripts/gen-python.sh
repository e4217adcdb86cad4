#!/usr/bin/env bash
# Regenerates the Python stubs from protos/ into clients/python/chargepath_protos/ (the one
# folder of generated Python code, the import package `chargepath_protos` that both the
# gateway and chargepath_client depend on). Never edit that folder by hand; CI runs
# `make check-gen`.
#
# protoc names Python modules after the .proto paths (chargepath/v1/...), so the output is
# made in a scratch folder and its cross-module imports are rewritten to `chargepath_protos.v1`
# (the descriptors keep their proto file names; only the Python module path changes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=clients/python/chargepath_protos
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out="$TMP" --pyi_out="$TMP" --grpc_python_out="$TMP" \
  protos/chargepath/v1/*.proto
rm -rf "$OUT"
mkdir -p "$OUT/v1"
for f in "$TMP"/chargepath/v1/*; do
  sed -e 's/^from chargepath\.v1 import /from chargepath_protos.v1 import /' \
      -e 's/^import chargepath\.v1\./import chargepath_protos.v1./' \
      -e "s/(DESCRIPTOR, 'chargepath\.v1\./(DESCRIPTOR, 'chargepath_protos.v1./" \
      "$f" > "$OUT/v1/$(basename "$f")"
done
HEADER='# Code generated from protos/chargepath/v1 by scripts/gen-python.sh. DO NOT EDIT.'
printf '%s\n"""Protobuf and gRPC stubs of chargepath.v1, generated from protos/."""\n' "$HEADER" \
  > "$OUT/__init__.py"
printf '%s\n' "$HEADER" > "$OUT/v1/__init__.py"
: > "$OUT/py.typed"
