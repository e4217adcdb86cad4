"""The load generator against a live gateway (the demo plans): each scenario runs for a few
seconds at a low rate and must write its JSON and PNG reports, with decisions and no errors."""

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
    ("scenario", "flows"),
    [("check", ["check"]), ("stream", ["stream"]), ("mixed", ["check", "stream"])],
)
def test_scenario_runs_and_writes_reports(
    gateway: GatewayProcess, tmp_path: Path, scenario: str, flows: list[str]
) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "loadtest", scenario,
            "--target", gateway.address,
            "--rate", "60", "--duration", "3", "--warmup", "0",
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
        assert tally["error_ops"] == 0, tally["errors"]
        assert tally["dropped_ops"] == tally["incomplete_ops"] == 0
        assert flow["latency_ms"]["p50"] is not None
    assert phase["decided_usages"] > 0
    assert phase["error_ops"] == 0
