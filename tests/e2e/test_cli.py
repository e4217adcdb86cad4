"""The CLI an operator runs at 3 a.m., against a live gateway: check, plans, state, explain,
grant, suspend, ledger export."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import DEMO_PLANS, GatewayProcess


def cli(
    gateway: GatewayProcess, *args: str, target: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as on the gateway's machine: it finds the operator key in the gateway's data
    dir (CHARGEPATH_DATA_DIR, as an operator who set it once in their shell)."""
    cmd = [sys.executable, "-m", "chargepath", *args]
    if target:
        cmd += ["--target", gateway.address]
    env = {
        **{k: v for k, v in os.environ.items() if k != "CHARGEPATH_API_KEY"},
        "CHARGEPATH_DATA_DIR": str(gateway.data_dir),
    }
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_check_prints_the_verdict_and_exits_by_decision(gateway: GatewayProcess) -> None:
    ok = cli(
        gateway,
        "check",
        "--tenant",
        "cpaas-demo",
        "--key",
        "cli-1",
        "--metric",
        "api.sms.send",
        "--amount",
        "2",
    )
    assert ok.returncode == 0, ok.stderr
    assert "ALLOW OK" in ok.stdout and "sms-per-key" in ok.stdout
    deny = cli(
        gateway,
        "check",
        "--tenant",
        "cpaas-demo",
        "--key",
        "cli-1",
        "--metric",
        "api.sms.send",
        "--amount",
        "21",
        "--json",
    )
    assert deny.returncode == 0  # --json prints the verdict whatever it is
    v = json.loads(deny.stdout)
    assert (v["decision"], v["reason"]) == ("DECISION_DENY", "REASON_AMOUNT_EXCEEDS_CAPACITY")
    bad = cli(gateway, "check", "--tenant", "", "--metric", "api.sms.send")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT: subject.tenant: is required" in bad.stderr


def test_plans_state_explain_grant_and_suspend(gateway: GatewayProcess, tmp_path: Path) -> None:
    dry = cli(gateway, "plans", "apply", str(DEMO_PLANS), "--dry-run")
    assert dry.returncode == 0 and "no change" in dry.stdout
    changed = tmp_path / "plans.yaml"
    changed.write_text(DEMO_PLANS.read_text().replace("capacity: 20,", "capacity: 25,"))
    diff = cli(gateway, "plans", "apply", str(changed), "--dry-run")
    assert "~ plans.cpaas-starter.limits.sms-per-key.rate.capacity: 20 -> 25" in diff.stdout
    listed = cli(gateway, "plans", "list")
    assert "cpaas-starter" in listed.stdout and "slice-urllc" in listed.stdout

    v = json.loads(
        cli(
            gateway,
            "check",
            "--tenant",
            "cpaas-demo",
            "--key",
            "cli-2",
            "--metric",
            "api.sms.send",
            "--amount",
            "3",
            "--json",
        ).stdout
    )
    explain = cli(gateway, "explain", v["decision_id"], "--tenant", "cpaas-demo", "--json")
    record = json.loads(explain.stdout)
    per_key = next(c for c in record["limits"] if c["name"] == "sms-per-key")
    assert (per_key["remaining_before"], per_key["remaining_after"]) == ("20", "17")

    grant = cli(
        gateway,
        "grant",
        "--tenant",
        "cpaas-demo",
        "--limit",
        "voice-daily",
        "--amount",
        "7",
        "--expires",
        "2h",
        "--note",
        "INC-7",
    )
    assert grant.returncode == 0 and "capacity 5007" in grant.stdout
    assert (
        cli(gateway, "suspend", "cpaas-demo", "--key", "cli-2", "--reason", "INC-8").returncode == 0
    )
    state = cli(gateway, "state", "cpaas-demo", "--key", "cli-2")
    assert "SUSPENDED cpaas-demo/cli-2: INC-8" in state.stdout
    assert "INC-7" in state.stdout and "sms-per-key" in state.stdout
    as_json = json.loads(cli(gateway, "state", "cpaas-demo", "--key", "cli-2", "--json").stdout)
    assert as_json["recent"][0]["decision_id"] == v["decision_id"]
    denied = cli(
        gateway, "check", "--tenant", "cpaas-demo", "--key", "cli-2", "--metric", "api.sms.send"
    )
    assert denied.returncode == 3 and "SUSPENDED" in denied.stdout
    assert cli(gateway, "resume", "cpaas-demo", "--key", "cli-2").returncode == 0
    unknown = cli(gateway, "suspend", "nobody")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_ledger_export_as_csv(gateway: GatewayProcess) -> None:
    v = json.loads(
        cli(
            gateway,
            "check",
            "--tenant",
            "mvno-demo",
            "--slice",
            "1-000001",
            "--metric",
            "slice.bytes",
            "--amount",
            "1234",
            "--report",
            "--json",
        ).stdout
    )
    out = cli(
        gateway,
        "ledger",
        "export",
        "--tenant",
        "mvno-demo",
        "--format",
        "csv",
        "--no-mark",
        "--redis-url",
        gateway.redis_url,
        target=False,
    )
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    mine = [r for r in rows if r["request_id"] == v["request_id"]]
    assert len(mine) == 1 and mine[0]["amount"] == "1234" and mine[0]["slice"] == "1-000001"
