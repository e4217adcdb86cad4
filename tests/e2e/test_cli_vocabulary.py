"""The CLI as people and scripts read it, against a live gateway: one spelling of decisions,
plain JSON, human units, plan files that round-trip, refusals that say what to do, and a watch
that outlives a gateway restart. Each surface is also tried by a caller who must be refused."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import DEMO_PLANS, GatewayProcess, start_gateway
from tests.e2e.test_cli import cli

#: A plan file with every kind of limit: rate per second, minute and hour; quota per hour, day
#: and month; soft; tenant, slice and key scope; a metric pattern; slices, a suspended key, both
#: failure policies and caps.
EVERY_KIND = """
metrics:
  - {name: slice.bytes, unit: byte, description: bytes}
  - {name: api.sms.send, unit: message}
  - {name: api.sms.bulk, unit: message}
plans:
  - name: every-kind
    description: one of each
    limits:
      - {name: r-second, metric: slice.bytes, scope: tenant,
         rate: {capacity: 2000000000000, refill: 1000000000, per: second}}
      - {name: r-minute, metric: "api.sms.*", scope: key,
         rate: {capacity: 60, refill: 30, per: minute}}
      - {name: r-hour, metric: api.sms.send, scope: slice,
         rate: {capacity: 5, refill: 1, per: hour}}
      - {name: q-hour, metric: api.sms.send, scope: tenant, quota: {amount: 100, per: hour}}
      - {name: q-day, metric: slice.bytes, scope: slice, quota: {amount: 9000000000000, per: day},
         soft: true}
      - {name: q-month, metric: api.sms.bulk, scope: key, quota: {amount: 1000000, per: month}}
  - name: spare
    limits:
      - {name: s, metric: slice.bytes, scope: tenant, quota: {amount: 1, per: month}}
  - name: slice-spare
    limits:
      - {name: ss, metric: slice.bytes, scope: slice, rate: {capacity: 1, refill: 1, per: second}}
tenants:
  - name: acme
    plan: every-kind
    failure_policy: {mode: allow}
    caps: {request_ids: 5000, sessions: null}
    slices:
      - {name: "1-000009", plan: slice-spare}
    keys:
      - {name: k1, suspended: fraud review}
  - name: beta
    plan: spare
    failure_policy: {mode: deny}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """This module's own gateway: its tests change the policy."""
    gw = start_gateway(tmp_path_factory.mktemp("vocabulary"))
    yield gw
    code = gw.stop()
    if gw.redis is not None:
        gw.redis.stop()
    assert code == 0, gw.log()


def _key(gateway: GatewayProcess, role: str, tenant: str) -> str:
    made = cli(gateway, "keys", "create", "--role", role, "--tenant", tenant)
    assert made.returncode == 0, made.stderr
    return made.stdout.splitlines()[-1]


def _one_line(out: subprocess.CompletedProcess[str], code: int, start: str) -> None:
    assert out.returncode == code, (out.stdout, out.stderr)
    assert out.stderr.startswith(start), out.stderr
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr


def test_check_json_is_plain_names_and_numbers(gateway: GatewayProcess) -> None:
    # voice-per-key: 60 minutes of burst, one more every 6 s
    args = ("check", "--tenant", "cpaas-demo", "--key", "v-1", "--metric", "api.voice.minutes")
    first = json.loads(cli(gateway, *args, "--amount", "60", "--json").stdout)
    assert (first["decision"], first["reason"]) == ("ALLOW", "OK")
    assert isinstance(first["policy_version"], int) and first["policy_version"] >= 1
    per_key = next(x for x in first["limits"] if x["name"] == "voice-per-key")
    assert (per_key["remaining"], per_key["capacity"], per_key["kind"]) == (0, 60, "RATE")
    assert per_key["scope"] == "KEY" and isinstance(per_key["reset_after_ms"], int)
    assert first["decided_at"].endswith("Z")
    throttled = json.loads(cli(gateway, *args, "--json").stdout)
    assert (throttled["decision"], throttled["reason"]) == ("THROTTLE", "RATE_LIMITED")
    assert 0 < throttled["retry_after_ms"] <= 6000
    text = cli(gateway, *args, "--label", "campaign=x")
    assert text.stdout.split()[0] in ("ALLOW", "THROTTLE")
    assert "DECISION_" not in text.stdout and "REASON_" not in text.stdout


def test_check_shows_bytes_in_units_and_label_without_value_is_refused(
    gateway: GatewayProcess,
) -> None:
    out = cli(
        gateway, "check", "--tenant", "mvno-demo", "--slice", "1-000001", "--metric",
        "slice.bytes", "--amount", "1048576", "--report",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "190.7 MiB" in out.stdout  # slice-bytes-rate capacity 200,000,000 B
    assert "TiB" in out.stdout and "1048576" not in out.stdout
    _one_line(
        cli(gateway, "check", "--tenant", "t", "--metric", "m", "--label", "foo"),
        2,
        "chargepath check: --label: expected KEY=VALUE, got 'foo'",
    )


def test_state_at_100_columns_shows_units_and_whole_numbers(gateway: GatewayProcess) -> None:
    env = {**os.environ, "COLUMNS": "100"}
    cmd = [sys.executable, "-m", "chargepath", "state", "mvno-demo", "--slice", "1-000001"]
    cmd += ["--target", gateway.address, "--data-dir", str(gateway.data_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert all(len(line) <= 100 for line in out.stdout.splitlines()), out.stdout
    assert "…" not in out.stdout
    assert "45.5 TiB" in out.stdout  # tenant-bytes-monthly: 50,000,000,000,000 bytes
    assert "1.9 GiB" in out.stdout  # tenant-bytes-rate capacity
    as_json = json.loads(cli(gateway, "state", "mvno-demo", "--json").stdout)
    monthly = next(x for x in as_json["limits"] if x["name"] == "tenant-bytes-monthly")
    assert monthly["capacity"] == 50_000_000_000_000 and monthly["kind"] == "QUOTA"
    assert as_json["failure_mode"] == "ALLOW"


def test_plans_show_round_trips_through_apply(gateway: GatewayProcess, tmp_path: Path) -> None:
    every = tmp_path / "every.yaml"
    demo = yaml.safe_load(DEMO_PLANS.read_text())
    extra = yaml.safe_load(EVERY_KIND)
    names = {m["name"] for m in demo["metrics"]}
    demo["metrics"] += [m for m in extra["metrics"] if m["name"] not in names]
    demo["plans"] += extra["plans"]
    demo["tenants"] += extra["tenants"]
    every.write_text(yaml.safe_dump(demo))
    applied = cli(gateway, "plans", "apply", str(every))
    assert applied.returncode == 0, applied.stderr
    for document in ("demo and every kind", "demo alone"):
        shown = cli(gateway, "plans", "show")
        assert shown.returncode == 0, shown.stderr
        version = shown.stdout.splitlines()[0]
        assert version.startswith("# chargepath plans show: policy version ")
        f = tmp_path / f"{document}.yaml"
        f.write_text(shown.stdout)
        again = cli(gateway, "plans", "apply", str(f))
        assert again.returncode == 0, again.stderr
        assert "no change" in again.stdout, (document, again.stdout)
        assert cli(gateway, "plans", "show").stdout == shown.stdout
        if document == "demo and every kind":
            assert "every-kind" in shown.stdout and "fraud review" in shown.stdout
            pruned = cli(gateway, "plans", "apply", str(DEMO_PLANS), "--prune", "--yes")
            assert pruned.returncode == 0, pruned.stderr
    one = cli(gateway, "plans", "show", "slice-embb")
    plan_file = yaml.safe_load(one.stdout)
    assert [p["name"] for p in plan_file["plans"]] == ["slice-embb"]
    assert [m["name"] for m in plan_file["metrics"]] == ["slice.bytes", "slice.sessions"]
    _one_line(
        cli(gateway, "plans", "show", "slice-emb"),
        2,
        "chargepath: name: unknown plan 'slice-emb'; did you mean 'slice-embb'?",
    )
    viewer = _key(gateway, "viewer", "cpaas-demo")
    _one_line(
        cli(gateway, "plans", "show", "--api-key", viewer), 1, "chargepath: PERMISSION_DENIED"
    )


def test_assign_refuses_a_typo_and_creates_only_when_asked(gateway: GatewayProcess) -> None:
    _one_line(
        cli(gateway, "assign", "cpaas-dmeo", "cpaas-starter"),
        2,
        "chargepath: tenant: 'cpaas-dmeo' is not in the policy; did you mean 'cpaas-demo'? "
        "(--create adds a new tenant)",
    )
    state = cli(gateway, "state", "cpaas-dmeo")
    assert state.returncode == 1 and "NOT_FOUND" in state.stderr  # nothing was created
    made = cli(gateway, "assign", "new-co", "cpaas-starter", "--create")
    assert made.returncode == 0, made.stderr
    assert json.loads(cli(gateway, "state", "new-co", "--json").stdout)["plan"] == "cpaas-starter"
    assert cli(gateway, "assign", "new-co", "cpaas-starter").returncode == 0  # it exists now
    viewer = _key(gateway, "viewer", "new-co")
    _one_line(
        cli(gateway, "assign", "new-co", "cpaas-starter", "--api-key", viewer),
        1,
        "chargepath: PERMISSION_DENIED",
    )


def test_a_second_resume_is_already_active(gateway: GatewayProcess) -> None:
    subject = ("cpaas-demo", "--key", "resume-1")
    assert cli(gateway, "suspend", *subject, "--reason", "INC-9").returncode == 0
    first = cli(gateway, "resume", *subject)
    assert first.returncode == 0 and first.stdout.startswith("policy version "), first.stderr
    second = cli(gateway, "resume", *subject)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "cpaas-demo/resume-1 is already active"
    _one_line(cli(gateway, "resume", "nobody"), 1, "chargepath: NOT_FOUND: ")
    viewer = _key(gateway, "viewer", "cpaas-demo")
    _one_line(
        cli(gateway, "resume", *subject, "--api-key", viewer), 1, "chargepath: PERMISSION_DENIED"
    )


def test_tail_refuses_at_once_what_it_cannot_follow(gateway: GatewayProcess) -> None:
    started = time.monotonic()
    _one_line(
        cli(gateway, "tail", "--tenant", "nobody-here"),
        1,
        "chargepath: NOT_FOUND: tenant: unknown tenant 'nobody-here'",
    )
    assert time.monotonic() - started < 50  # it did not wait for cli()'s 60 s timeout
    _one_line(
        cli(gateway, "tail", "--tenant", "cpaas-demo", "--reason", "BOGUS"),
        2,
        "chargepath tail: --reason: unknown reason 'BOGUS'",
    )
    meter = _key(gateway, "meter", "cpaas-demo")
    _one_line(
        cli(gateway, "tail", "--tenant", "mvno-demo", "--api-key", meter),
        1,
        "chargepath: PERMISSION_DENIED",
    )


def test_tail_prints_decisions_in_one_spelling(gateway: GatewayProcess) -> None:
    cmd = [sys.executable, "-m", "chargepath", "tail", "--tenant", "cpaas-demo", "--json"]
    cmd += ["--decision", "throttle", "--target", gateway.address]
    env = {**os.environ, "CHARGEPATH_DATA_DIR": str(gateway.data_dir)}
    tail = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert tail.stdout is not None
        line = _read_until(tail, lambda text: text.strip() != "", poke=_throttle(gateway))
        event = json.loads(line)
        assert event["decision"]["decision"] == "THROTTLE"
        assert event["decision"]["reason"] == "RATE_LIMITED"
        assert isinstance(event["decision"]["amount"], int)
    finally:
        tail.terminate()
        tail.wait(10)
        if tail.stdout is not None:
            tail.stdout.close()


def _throttle(gateway: GatewayProcess) -> object:
    def poke() -> None:
        metric = "api.voice.minutes"
        args = ("check", "--tenant", "cpaas-demo", "--key", "tail-1", "--metric", metric)
        cli(gateway, *args, "--amount", "60")
        cli(gateway, *args)

    return poke


def _read_until(
    proc: subprocess.Popen[str], done: object, poke: object = None, timeout: float = 60
) -> str:
    """Lines of ``proc``'s stdout until ``done(line)``; ``poke()`` runs every 2 s meanwhile
    (to make the event the reader waits for). Returns that line."""
    assert proc.stdout is not None and callable(done)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    next_poke = time.monotonic()
    seen: list[str] = []
    while time.monotonic() < deadline:
        if callable(poke) and time.monotonic() >= next_poke:
            poke()
            next_poke = time.monotonic() + 2
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if done(line):
                return line
    raise AssertionError("not seen; output was:\n" + "".join(seen[-40:]))


def test_state_watch_reconnects_after_a_gateway_restart(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path / "first")
    assert gw.redis is not None
    port = int(gw.address.rsplit(":", 1)[1])
    cmd = [sys.executable, "-m", "chargepath", "state", "cpaas-demo", "--key", "watch-1"]
    cmd += ["--watch", "--interval", "0.2", "--target", gw.address]
    env = {**os.environ, "CHARGEPATH_API_KEY": gw.operator_key}
    watch = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    second: GatewayProcess | None = None
    try:
        _read_until(watch, lambda line: "policy v" in line)
        assert gw.stop() == 0, gw.log()
        _read_until(watch, lambda line: line.startswith(f"reconnecting to {gw.address}"))
        assert watch.poll() is None  # still watching
        # the same Redis (the same state) and operator key, on the same port
        second = start_gateway(
            tmp_path / "second",
            redis_url=gw.redis_url,
            port=port,
            env={"CHARGEPATH_API_KEY": gw.operator_key},
            data_dir=gw.data_dir,
        )
        _read_until(watch, lambda line: line.startswith(f"reconnected to {gw.address}"))
        suspended = cli(second, "suspend", "cpaas-demo", "--key", "watch-1", "--reason", "INC-3")
        assert suspended.returncode == 0, suspended.stderr
        _read_until(watch, lambda line: "SUSPENDED cpaas-demo/watch-1: INC-3" in line)
        assert watch.poll() is None
    finally:
        watch.terminate()
        _, err = watch.communicate(timeout=10)
        assert "Traceback" not in err
        if second is not None:
            assert second.stop() == 0, second.log()
        gw.redis.stop()


def test_explain_from_the_id_alone_beyond_the_last_1000_decisions(
    gateway: GatewayProcess,
) -> None:
    args = ("check", "--tenant", "mvno-demo", "--slice", "1-000002", "--metric", "slice.bytes")
    first = json.loads(cli(gateway, *args, "--amount", "1234", "--report", "--json").stdout)
    with gateway.channel() as ch:
        stub = pb_grpc.MeteringServiceStub(ch)
        for b in range(11):  # 1,100 decisions of the same tenant after it
            usages = [
                pb.Usage(
                    request_id=f"explain-{b}-{i}",
                    subject=pb.Subject(tenant="mvno-demo", slice="1-000001"),
                    metric="slice.bytes",
                    amount=1,
                    mode=pb.MODE_REPORT,
                )
                for i in range(100)
            ]
            (answer,) = stub.StreamUsage(iter([pb.StreamUsageRequest(usages=usages)]), timeout=10)
            assert all(v.recorded for v in answer.verdicts)
    explained = cli(gateway, "explain", first["decision_id"])
    assert explained.returncode == 0, explained.stderr
    assert "ALLOW" in explained.stdout and "OK" in explained.stdout
    assert "1.2 KiB" in explained.stdout and first["request_id"] in explained.stdout
    as_json = json.loads(cli(gateway, "explain", first["decision_id"], "--json").stdout)
    assert (as_json["decision"], as_json["amount"]) == ("ALLOW", 1234)
    assert as_json["subject"] == {"tenant": "mvno-demo", "slice": "1-000002", "key": ""}
    # a viewer of another tenant: as if the id did not exist
    viewer = _key(gateway, "viewer", "cpaas-demo")
    theirs = cli(gateway, "explain", first["decision_id"], "--api-key", viewer)
    made_up = cli(gateway, "explain", "f" * 32, "--api-key", viewer)
    _one_line(theirs, 1, "chargepath: NOT_FOUND: decision_id: no decision ")
    assert theirs.stderr.replace(first["decision_id"], "f" * 32) == made_up.stderr
