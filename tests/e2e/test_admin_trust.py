"""Admin changes that can be audited and cannot wipe the policy by accident, on a live gateway
with its embedded Redis, driven by the real CLI: ``plans apply`` (empty files, ``--prune``),
``chargepath audit``, and the embedded Redis's password (the gateway and ``ledger export`` use
it; nobody else gets in; it is never logged)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from chargepath.core.auth import parse_key
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import DEMO_PLANS, GatewayProcess, start_gateway


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Path]]:
    """A gateway on its own embedded Redis; (the gateway, its data dir)."""
    work = tmp_path_factory.mktemp("trust")
    gw = start_gateway(work, embedded=True)
    yield gw, work / "data"
    assert gw.stop() == 0, gw.log()


def operator_env(gw: GatewayProcess) -> dict[str, str]:
    """The environment of an operator on the gateway's machine: the CLI finds the operator key
    in the gateway's data dir (not in a .chargepath of the working directory)."""
    return {
        **{k: v for k, v in os.environ.items() if k != "CHARGEPATH_API_KEY"},
        "CHARGEPATH_DATA_DIR": str(gw.data_dir),
    }


def cli(
    gw: GatewayProcess, *args: str, target: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "chargepath", *args]
    if target:
        cmd += ["--target", gw.address]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=operator_env(gw),
    )


def audit(gw: GatewayProcess, *args: str) -> list[dict[str, object]]:
    out = cli(gw, "audit", "--json", *args)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_the_embedded_redis_needs_its_password_which_is_never_logged(
    embedded: tuple[GatewayProcess, Path],
) -> None:
    gw, data = embedded
    password_file = data / "redis" / "password"
    password = password_file.read_text().strip()
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    url = (data / "redis" / "url").read_text().strip()
    assert password in url
    with gw.channel() as ch:
        usage = pb.Usage(
            request_id="trust-1",
            subject=pb.Subject(tenant="cpaas-demo", key="trust"),
            metric="api.sms.send",
            amount=1,
            mode=pb.MODE_ADMIT,
        )
        verdict = pb_grpc.MeteringServiceStub(ch).Check(pb.CheckRequest(usage=usage)).verdict
    assert verdict.decision == pb.DECISION_ALLOW and verdict.recorded
    # the ledger command finds the URL (with its password) in the data dir
    out = cli(
        gw, "ledger", "export", "--tenant", "cpaas-demo", "--data-dir", str(data), target=False
    )
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["request_id"] for line in out.stdout.splitlines()] == ["trust-1"]
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    bare = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        bare.ping()
    bare.close()
    log = gw.log()
    assert "embedded redis-server" in log and "***@127.0.0.1" in log
    assert password not in log


def test_empty_documents_and_unconfirmed_removals_change_nothing_and_prune_applies(
    embedded: tuple[GatewayProcess, Path], tmp_path: Path
) -> None:
    gw, _ = embedded
    assert cli(gw, "assign", "trial-co", "cpaas-starter", "--create").returncode == 0
    for text in ("", "{}\n", "null\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        out = cli(gw, "plans", "apply", str(empty))
        assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr, out
        assert "document" in out.stderr

    # the demo file does not name trial-co: refused, with the list
    out = cli(gw, "plans", "apply", str(DEMO_PLANS))
    assert out.returncode == 1
    assert "- tenant trial-co" in out.stdout and "--prune" in out.stdout

    preview = cli(gw, "plans", "apply", str(DEMO_PLANS), "--prune", "--dry-run")
    assert preview.returncode == 0, preview.stderr
    assert "- tenants.trial-co" in preview.stdout and "removes tenant trial-co" in preview.stdout
    assert "nothing changed" in preview.stdout

    # no terminal to confirm on, and no --yes: nothing is removed
    unconfirmed = cli(gw, "plans", "apply", str(DEMO_PLANS), "--prune")
    assert unconfirmed.returncode == 1 and "--yes" in unconfirmed.stdout
    state = cli(gw, "state", "trial-co", "--json")
    assert state.returncode == 0 and json.loads(state.stdout)["plan"] == "cpaas-starter"

    applied = cli(gw, "plans", "apply", str(DEMO_PLANS), "--prune", "--yes")
    assert applied.returncode == 0, applied.stderr
    assert "removes tenant trial-co" in applied.stdout and "(new)" in applied.stdout
    gone = cli(gw, "state", "trial-co", "--json")
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr

    events = audit(gw, "--tenant", "trial-co")
    assert [(e["method"], e["outcome"]) for e in events] == [
        ("AssignPlan", "OK"),
        ("ApplyPolicy", "FAILED_PRECONDITION"),
        ("ApplyPolicy", "OK"),  # the preview (a dry run)
        ("ApplyPolicy", "OK"),  # the preview of the unconfirmed apply
        ("ApplyPolicy", "OK"),  # the preview of the confirmed apply
        ("ApplyPolicy", "OK"),  # the apply
    ]
    # the CLI acted with the operator key the gateway bootstrapped: its key id, not "anonymous"
    operator = parse_key(gw.operator_key).key_id
    assert all((e["identity"], e["role"]) == (operator, "operator") for e in events)
    last = events[-1]
    assert int(str(last["policy_version_after"])) == int(str(last["policy_version_before"])) + 1
    assert "prune" in str(last["summary"]) and "expected_version=" in str(last["summary"])
    # the empty documents named no tenant; they are in the unfiltered trail
    everything = audit(gw, "--since", "1h")
    refused = [e for e in everything if e["outcome"] == "INVALID_ARGUMENT"]
    assert len(refused) == 3 and all("document" in str(e["detail"]) for e in refused)
    text = cli(gw, "audit", "--tenant", "trial-co")
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 6
    assert f" {operator}(operator) AssignPlan OK " in text.stdout


def test_audit_follow_prints_new_events_as_they_come(
    embedded: tuple[GatewayProcess, Path],
) -> None:
    gw, _ = embedded
    follow = subprocess.Popen(
        [sys.executable, "-m", "chargepath", "audit", "--follow", "--json", "--interval", "0.2",
         "--tenant", "mvno-demo", "--target", gw.address],
        stdout=subprocess.PIPE,
        text=True,
        env=operator_env(gw),
    )  # fmt: skip
    try:
        time.sleep(1.5)  # it has read the (empty) trail of mvno-demo
        assert cli(gw, "suspend", "mvno-demo", "--reason", "audit follow").returncode == 0
        assert follow.stdout is not None
        event = json.loads(follow.stdout.readline())
        assert (event["method"], event["outcome"], event["tenants"]) == (
            "Suspend",
            "OK",
            ["mvno-demo"],
        )
        assert "reason=audit follow" in event["summary"]
    finally:
        follow.terminate()
        follow.wait(10)
        if follow.stdout is not None:
            follow.stdout.close()
