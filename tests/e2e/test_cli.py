"""The CLI an operator runs at 3 a.m., against a live gateway: check, plans, state, explain,
grant, suspend, ledger export."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import DEMO_PLANS, GatewayProcess, start_gateway


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
    assert (v["decision"], v["reason"]) == ("DENY", "AMOUNT_EXCEEDS_CAPACITY")
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
    assert (per_key["remaining_before"], per_key["remaining_after"]) == (20, 17)

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
    assert grant.returncode == 0 and "capacity 5,007" in grant.stdout
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


def test_the_cli_finds_the_operator_key_of_serve_on_the_same_machine(tmp_path: Path) -> None:
    """`chargepath serve` and the CLI run in the same folder with no option: the CLI reads the
    operator key that serve wrote to .chargepath/operator.key; elsewhere it has none."""
    gw = start_gateway(tmp_path, data_dir=tmp_path / ".chargepath")
    try:
        assert "--data-dir" not in " ".join(map(str, gw.process.args))  # type: ignore[arg-type]
        key_file = tmp_path / ".chargepath" / "operator.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert f"operator key in {key_file}" in gw.log()
        assert gw.operator_key not in gw.log()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGEPATH_")}

        def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
            cmd = [sys.executable, "-m", "chargepath", *args, "--target", gw.address]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd, env=env)

        here = run("keys", "list", "--json", cwd=tmp_path)
        assert here.returncode == 0, here.stderr
        assert [k["role"] for k in json.loads(here.stdout)["keys"]] == ["OPERATOR"]
        elsewhere = run("plans", "list", cwd=tmp_path.parent)
        assert elsewhere.returncode == 1
        assert elsewhere.stderr.startswith("chargepath: UNAUTHENTICATED: ")
        assert "--api-key" in elsewhere.stderr and len(elsewhere.stderr.splitlines()) == 1
        pointed = run(
            "plans", "list", "--data-dir", str(tmp_path / ".chargepath"), cwd=tmp_path.parent
        )
        assert pointed.returncode == 0, pointed.stderr
    finally:
        assert gw.stop() == 0, gw.log()
        assert gw.redis is not None
        gw.redis.stop()


def test_keys_create_list_rotate_revoke(gateway: GatewayProcess) -> None:
    created = cli(
        gateway, "keys", "create", "--tenant", "cpaas-demo", "--role", "meter",
        "--expires", "30d", "--description", "cli test",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    first, key = created.stdout.splitlines()
    key_id = first.split()[1]
    assert first.startswith(f"created {key_id} (meter of tenant cpaas-demo, expires 20")
    assert key.startswith(f"cpk_{key_id}_")
    assert "only time the key is shown" in created.stderr

    def check_as(api_key: str, tenant: str) -> subprocess.CompletedProcess[str]:
        metric = "api.sms.send" if tenant == "cpaas-demo" else "slice.bytes"
        return cli(
            gateway, "check", "--api-key", api_key, "--tenant", tenant, "--metric", metric,
            "--key", "cli-keys", "--json",
        )  # fmt: skip

    assert check_as(key, "cpaas-demo").returncode == 0
    other = check_as(key, "mvno-demo")
    assert other.returncode == 1
    assert "PERMISSION_DENIED: usage.subject.tenant:" in other.stderr

    listed = cli(gateway, "keys", "list", "--tenant", "cpaas-demo", "--json")
    keys = {k["key_id"]: k for k in json.loads(listed.stdout)["keys"]}
    assert keys[key_id]["description"] == "cli test" and "secret_key" not in keys[key_id]
    assert key not in listed.stdout

    rotated = cli(gateway, "keys", "rotate", key_id, "--grace", "1h")
    assert rotated.returncode == 0, rotated.stderr
    lines = rotated.stdout.splitlines()
    assert lines[0].startswith(f"rotated {key_id}: it stops working at ")
    new_key = lines[-1]
    assert new_key.startswith("cpk_") and new_key != key
    assert check_as(key, "cpaas-demo").returncode == 0  # within its grace period
    assert check_as(new_key, "cpaas-demo").returncode == 0

    revoked = cli(gateway, "keys", "revoke", key_id)
    assert revoked.returncode == 0 and revoked.stdout.startswith(f"revoked {key_id}")
    deadline = time.monotonic() + 2
    while (after := check_as(key, "cpaas-demo")).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after.returncode == 1 and "UNAUTHENTICATED: API key revoked" in after.stderr
    assert key not in after.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("keys", "create", "--role", "meter"), "chargepath: --tenant: required for a meter key"),
        (
            ("keys", "create", "--role", "operator", "--tenant", "a"),
            "chargepath: --tenant: an operator key acts for every tenant",
        ),
        (
            ("keys", "create", "--role", "viewer", "--tenant", "a", "--expires", "soon"),
            "chargepath: --expires: expected a duration",
        ),
        (("keys", "rotate", "aaaaaaaaaaaa", "--grace", "1y"), "chargepath: --grace: expected"),
        (("keys", "revoke", "nope"), "chargepath: INVALID_ARGUMENT: key_id: must be 12"),
        (
            ("keys", "list", "--api-key", "secret"),
            "chargepath: --api-key: not a Chargepath API key",
        ),
        (
            ("plans", "list", "--tls-cert", "c.pem"),
            "chargepath: --tls-key: --tls-cert and --tls-key",
        ),
        (
            ("check", "--tenant", "a", "--metric", "m", "--tls-ca", "/nonexistent/ca.pem"),
            "chargepath: --tls-ca: cannot read",
        ),
    ],
)
def test_cli_errors_are_one_line_naming_the_field(
    gateway: GatewayProcess, args: tuple[str, ...], message: str
) -> None:
    out = cli(gateway, *args)
    assert out.returncode in (1, 2)
    assert out.stderr.startswith(message), out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr
