"""The load generator against a live gateway (the demo plans): each scenario runs for 10
seconds at a low rate and must write its JSON and PNG reports, with decisions, no errors and no
degraded verdicts; and the ceilings run and report. No timed assertion: figures are measured
with the load generator, not asserted in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import GatewayProcess

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("scenario", "flows", "tenants"),
    [
        ("check", ["check"], "many"),
        ("stream", ["stream"], "many"),
        ("mixed", ["check", "stream"], "many"),
        ("stream", ["stream"], "hot"),
    ],
)
def test_scenario_runs_and_writes_reports(
    gateway: GatewayProcess, tmp_path: Path, scenario: str, flows: list[str], tenants: str
) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "loadtest", scenario,
            "--target", gateway.address,
            "--rate", "60", "--duration", "10", "--warmup", "0", "--tenants", tenants,
            "--procs", "1", "--connections", "1", "--streams", "2", "--batch", "5",
            "--out", str(tmp_path), "--name", "smoke", "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr

    png = tmp_path / "smoke-gateway.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    doc = json.loads((tmp_path / "smoke.json").read_text())
    (measurement,) = doc["measurements"]
    assert measurement["label"] == "gateway"
    (phase,) = measurement["phases"]
    assert [f["flow"] for f in phase["flows"]] == flows
    for flow in phase["flows"]:
        tally = flow["tally"]
        assert sum(tally["decisions"].values()) > 0, flow
        assert not any(k.startswith("DEGRADED") for k in tally["decisions"]), tally["decisions"]
        assert tally["error_ops"] == 0, tally["errors"]
        assert tally["dropped_ops"] == tally["incomplete_ops"] == 0
        assert flow["latency_ms"]["p50"] is not None
    assert phase["decided_usages"] > 0
    assert phase["error_ops"] == 0


def test_ceilings_run_and_report(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "loadtest", "ceiling", "--scenario", "stream",
            "--rate", "200", "--duration", "3", "--warmup", "0", "--procs", "1",
            "--batch", "16", "--out", str(tmp_path), "--name", "ceil", "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "ceil.json").read_text())
    labels = {m["label"] for m in doc["measurements"]}
    assert labels == {"redis ceiling", "echo ceiling"}
    for m in doc["measurements"]:
        (phase,) = m["phases"]
        assert phase["decided_usages"] > 0 and phase["error_ops"] == 0
