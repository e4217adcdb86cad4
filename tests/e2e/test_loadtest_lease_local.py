"""`python -m loadtest lease-local` against a live gateway serving loadtest/lease-plans.yaml: a
short run writes its JSON with every round, the machine and a spent/ledger that agree. No timed
assertion: the figures are measured with the command, not asserted in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import ledger_entries
from tests.e2e.conftest import ROOT, GatewayProcess, start_gateway

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway(
        tmp_path_factory.mktemp("gateway"), plans=ROOT / "loadtest" / "lease-plans.yaml"
    )
    yield gw
    code = gw.stop()
    if gw.redis is not None:
        gw.redis.stop()
    assert code == 0, gw.log()


def lease_local(gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtest", "lease-local", "--target", gateway.address, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_short_run_reports_rounds_and_the_ledger_holds_what_was_spent(
    gateway: GatewayProcess, tmp_path: Path, client: str
) -> None:
    out = tmp_path / "lease-local.json"
    ledger = redis.Redis.from_url(gateway.redis_url, decode_responses=True)
    before = sum(e.amount for e in ledger_entries(ledger, "lease-bench"))
    proc = lease_local(
        gateway,
        "--api-key",
        gateway.operator_key,
        "--client",
        client,
        "--duration",
        "1",
        "--rounds",
        "2",
        "--cpu",
        "-1",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 2
    assert all(r["calls"] > 0 and r["lease_s"] > 0 and r["ceiling_s"] > 0 for r in result["rounds"])
    assert result["summary"]["ratio"] > 0
    assert result["machine"]["python"] and result["cpu"] is None
    assert result["unreported_after_close"] == 0
    spent = result["spent"]
    assert spent == sum(r["allowed"] for r in result["rounds"]) > 0
    after = sum(e.amount for e in ledger_entries(ledger, "lease-bench"))
    ledger.close()
    assert after - before == spent
    assert "median:" in proc.stdout and "decisions/s" in proc.stdout


def test_a_caller_without_a_key_is_refused(gateway: GatewayProcess) -> None:
    proc = lease_local(gateway, "--api-key", "", "--duration", "1", "--rounds", "1")
    assert proc.returncode != 0
    assert "UNAUTHENTICATED" in proc.stderr
