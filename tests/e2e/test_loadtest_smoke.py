"""The load generator against a live gateway (the demo plans): each scenario runs for 10
seconds at a low rate and must write its JSON and PNG reports, with decisions, no errors and no
degraded verdicts; and the ceilings run and report. No timed assertion: figures are measured
with the load generator, not asserted in tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from chargepath.store.embedded import free_port
from tests.conftest import ledger_entries
from tests.e2e.conftest import GatewayProcess, start_gateway

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GO_LOADGEN = ROOT / "clients/go/bin/chargepath-loadgen"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The demo plans' gateway, with a store timeout well above a loaded machine's scheduling
    noise: these runs check the load generator and its reports, and a verdict degraded by a
    50 ms timeout missed while other processes hold both cores (one in 600 was seen at load
    10) is not the generator's doing. A degraded verdict still fails the run."""
    gw = start_gateway(
        tmp_path_factory.mktemp("gateway"), extra_args=("--store-timeout-ms", "1000")
    )
    yield gw
    code = gw.stop()
    if gw.redis is not None:
        gw.redis.stop()
    assert code == 0, gw.log()


def run_loadtest(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m loadtest ARGS`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_answered_cleanly(flow: dict[str, Any]) -> None:
    """A flow of a report: decisions came back, none degraded, nothing failed or dropped."""
    tally = flow["tally"]
    assert sum(tally["decisions"].values()) > 0, flow
    assert not any(k.startswith("DEGRADED") for k in tally["decisions"]), tally["decisions"]
    assert tally["error_ops"] == 0, tally["errors"]
    assert tally["dropped_ops"] == tally["incomplete_ops"] == 0
    assert flow["latency_ms"]["p50"] is not None


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
    proc = run_loadtest(
        scenario,
        "--target", gateway.address, "--api-key", gateway.operator_key,
        "--rate", "60", "--duration", "10", "--warmup", "0", "--tenants", tenants,
        "--procs", "1", "--connections", "1", "--streams", "2", "--batch", "5",
        "--out", str(tmp_path), "--name", "smoke", "--quiet",
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
        assert_answered_cleanly(flow)
    assert phase["decided_usages"] > 0
    assert phase["error_ops"] == 0


@pytest.mark.parametrize(
    ("scenario", "flows"), [("check", ["check"]), ("mixed", ["check", "stream"])]
)
def test_go_generator_runs_and_writes_reports(
    gateway: GatewayProcess, tmp_path: Path, scenario: str, flows: list[str]
) -> None:
    """--generator go: the check flow's calls come from clients/go/bin/chargepath-loadgen."""
    if not GO_LOADGEN.is_file():
        pytest.fail(f"{GO_LOADGEN} is missing: run `make clients` (scripts/setup-go.sh)")
    proc = run_loadtest(
        scenario, "--generator", "go",
        "--target", gateway.address, "--api-key", gateway.operator_key,
        "--rate", "60", "--duration", "3", "--warmup", "1", "--procs", "2",
        "--connections", "2", "--streams", "2", "--batch", "5",
        "--out", str(tmp_path), "--name", "smoke-go", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert (tmp_path / "smoke-go-gateway.png").read_bytes()[:8] == PNG_SIGNATURE
    doc = json.loads((tmp_path / "smoke-go.json").read_text())
    assert doc["settings"]["generator"] == "go"
    (measurement,) = doc["measurements"]
    assert [(f["name"], f["generator"]) for f in measurement["flows"]] == [
        (name, "go" if name == "check" else "python") for name in flows
    ]
    (phase,) = measurement["phases"]
    for flow in phase["flows"]:
        assert_answered_cleanly(flow)
        tally = flow["tally"]
        assert tally["scheduled_ops"] == tally["sent_ops"] == tally["ok_ops"]
    check = next(f for f in phase["flows"] if f["flow"] == "check")
    share = 0.5 if scenario == "mixed" else 1.0
    assert check["tally"]["scheduled_ops"] == round(60 * share * 3)


def test_go_generator_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    """Without the binary, the command says how to build it (checked before any worker starts)."""
    proc = run_loadtest(
        "check", "--generator", "go", "--smoke", "--quiet",
        env={**os.environ, "CHARGEPATH_LOADGEN": str(tmp_path / "chargepath-loadgen")},
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bash scripts/setup-go.sh" in proc.stderr and "make clients" in proc.stderr


def test_ceilings_run_and_report(tmp_path: Path) -> None:
    proc = run_loadtest(
        "ceiling", "--scenario", "stream",
        "--rate", "200", "--duration", "3", "--warmup", "0", "--procs", "1",
        "--batch", "16", "--out", str(tmp_path), "--name", "ceil", "--quiet",
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "ceil.json").read_text())
    labels = {m["label"] for m in doc["measurements"]}
    assert labels == {"redis ceiling", "echo ceiling"}
    for m in doc["measurements"]:
        (phase,) = m["phases"]
        assert phase["decided_usages"] > 0 and phase["error_ops"] == 0


def test_rls_scenario_is_answered_and_reaches_the_ledger(
    gateway: GatewayProcess, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """rls: Envoy-shaped ShouldRateLimit calls for one key of the demo plans (a bucket of 20,
    refilled 10/s): the first are OK, the rest OVER_LIMIT, none fails, and every OK is one
    admit in the tenant's ledger (the descriptor reached the same subject and metric)."""
    key = "key-hot"
    before = ledger_entries(redis_client, "cpaas-demo")
    proc = run_loadtest(
        "rls",
        "--target", gateway.address, "--api-key", gateway.operator_key,
        "--rate", "60", "--duration", "3", "--warmup", "0", "--tenants", "hot",
        "--procs", "1", "--connections", "1",
        "--out", str(tmp_path), "--name", "smoke-rls", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert (tmp_path / "smoke-rls-gateway.png").read_bytes()[:8] == PNG_SIGNATURE
    doc = json.loads((tmp_path / "smoke-rls.json").read_text())
    assert doc["scenario"] == "rls"
    (phase,) = doc["measurements"][0]["phases"]
    (flow,) = phase["flows"]
    assert flow["flow"] == "rls"
    assert_answered_cleanly(flow)
    tally = flow["tally"]
    assert tally["scheduled_ops"] == tally["sent_ops"] == tally["ok_ops"] == 180
    allowed = tally["decisions"].get("ALLOW", 0)  # OK
    over = tally["decisions"].get("THROTTLE", 0)  # OVER_LIMIT
    assert allowed + over == 180 and allowed >= 20 and over > 0, tally["decisions"]

    new = ledger_entries(redis_client, "cpaas-demo")[len(before) :]
    assert [(e.metric, e.key, e.mode, e.amount) for e in new] == [
        ("api.sms.send", key, "admit", 1)
    ] * allowed


def test_rls_refuses_a_plan_file_that_does_not_map_its_descriptor(tmp_path: Path) -> None:
    """An unmapped descriptor would be answered OK and counted nowhere: refused up front."""
    proc = run_loadtest(
        "rls", "--rls-route", "no-such-route", "--smoke", "--quiet", timeout=60
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "does not map the descriptor" in proc.stderr and "no-such-route" in proc.stderr


def test_alternate_measures_check_and_rls_on_one_gateway(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    """alternate: check and rls in turn against the same gateway process, each with the
    gateway's CPU per usage, and the per-round ratio rls/check."""
    proc = run_loadtest(
        "alternate", "--scenarios", "check,rls", "--rounds", "2",
        "--target", gateway.address, "--api-key", gateway.operator_key,
        "--target-pid", str(gateway.process.pid),
        "--rate", "40", "--duration", "2", "--warmup", "0", "--procs", "1",
        "--connections", "1", "--out", str(tmp_path), "--name", "alt", "--quiet",
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr

    doc = json.loads((tmp_path / "alt.json").read_text())
    assert [m["label"] for m in doc["measurements"]] == [
        "check round 1", "rls round 1", "rls round 2", "check round 2",
    ]  # fmt: skip
    for m in doc["measurements"]:
        (phase,) = m["phases"]
        (flow,) = phase["flows"]
        assert flow["flow"] == m["label"].split()[0]
        assert flow["tally"]["ok_ops"] == 80 and flow["tally"]["error_ops"] == 0
        assert phase["target_cpu_s"] > 0
    alternation = doc["alternation"]
    assert alternation["baseline"] == "check" and alternation["rounds"] == 2
    cpu = {s: f["cpu_us_per_usage"] for s, f in alternation["scenarios"].items()}
    assert all(v is not None and v > 0 for values in cpu.values() for v in values), cpu
    assert alternation["cpu_ratio_to_baseline"]["rls"] == [
        pytest.approx(r / c, abs=0.001) for r, c in zip(cpu["rls"], cpu["check"], strict=True)
    ]
    assert "rls / check" in proc.stdout


def test_compare_interleaves_the_echo_and_the_gateway_step_by_step(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    """compare --interleave: the echo's and the gateway's find-max searches in lockstep (echo
    step 1, gateway step 1, gateway step 2, echo step 2, ...), each judged on its own, and the
    ratio of their highest sustained rates."""
    proc = run_loadtest(
        "compare", "--scenario", "check", "--only", "echo", "--interleave",
        "--target", gateway.address, "--api-key", gateway.operator_key,
        "--target-pid", str(gateway.process.pid),
        "--find-max", "--rate", "20", "--step-factor", "2", "--step-seconds", "1",
        "--max-steps", "3", "--p99-bound-ms", "1000", "--warmup", "0", "--procs", "1",
        "--connections", "1", "--out", str(tmp_path), "--name", "inter", "--quiet",
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = re.findall(r"(echo ceiling|gateway): step (\d) @", proc.stdout)
    assert steps == [
        ("echo ceiling", "1"), ("gateway", "1"), ("gateway", "2"), ("echo ceiling", "2"),
        ("echo ceiling", "3"), ("gateway", "3"),
    ], proc.stdout  # fmt: skip
    doc = json.loads((tmp_path / "inter.json").read_text())
    by_label = {m["label"]: m for m in doc["measurements"]}
    assert set(by_label) == {"echo ceiling", "gateway"}
    for m in by_label.values():
        assert [p["offered_rate"] for p in m["phases"]] == [20, 40, 80]
        assert all(p["decided_usages"] > 0 and p["error_ops"] == 0 for p in m["phases"])
    (row,) = doc["comparison"]
    assert row["ceiling"] == "echo ceiling" and row["rate_ratio"] == pytest.approx(1.0)


def test_the_healthy_run_command_reports_degraded_verdicts_and_their_causes(
    tmp_path: Path,
) -> None:
    """``loadtest/healthy.sh`` (the 10-minute measurement of issue #13 item 3) for 5 seconds at
    a low rate: it starts its own gateway with the embedded Redis, and its report names the
    degraded verdicts per second, Redis' latency events and the gateway's store metrics."""
    port = free_port()
    env = {
        **os.environ,
        "CHARGEPATH_HEALTHY_OUT": str(tmp_path),
        "CHARGEPATH_HEALTHY_PORT": str(port),
        # a loaded CI machine misses 50 ms now and then; this smoke is about the report
        "CHARGEPATH_STORE_TIMEOUT_MS": "1000",
    }
    done = subprocess.run(
        ["bash", "loadtest/healthy.sh", "run", "everysec", "200", "5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (tmp_path / "healthy-run-everysec-200.txt").read_text()
    assert "appendfsync everysec" in text
    assert "run: 0 degraded, 0 failed operations" in text
    for section in ("redis LATENCY LATEST", "redis INFO commandstats:", "gateway store metrics:"):
        assert f"--- {section}" in text
    assert "chargepath_store_errors_total" in text  # the gateway's own metrics were read
    assert "cmdstat_evalsha:calls=" in text
    report = json.loads((tmp_path / "healthy-run-everysec-200.json").read_text())
    flows = report["measurements"][0]["phases"][-1]["flows"]
    assert {f["flow"] for f in flows} == {"check", "stream"}
    assert all("degraded" in p for f in flows for p in f["series"])
    assert sum(f["tally"]["ok_usages"] for f in flows) > 0
    assert (tmp_path / "healthy-run-everysec-200-gateway.png").read_bytes()[:8] == PNG_SIGNATURE
