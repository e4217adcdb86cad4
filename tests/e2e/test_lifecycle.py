"""Start-up, store failure and drain, on real processes: the embedded Redis, health, SIGTERM."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import start_gateway

NOT_SERVING, SERVING = 2, 1


def check(stub: pb_grpc.MeteringServiceStub, tenant: str = "cpaas-demo") -> pb.Verdict:
    u = pb.Usage(
        request_id=str(uuid.uuid4()),
        subject=pb.Subject(tenant=tenant, key="k1"),
        metric="api.sms.send",
        amount=1,
        mode=pb.MODE_ADMIT,
    )
    return stub.Check(pb.CheckRequest(usage=u), timeout=5).verdict


def test_embedded_redis_is_started_announced_and_stopped(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, embedded=True)
    try:
        lines = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
        first = lines[0]["msg"]
        assert first.startswith("embedded redis-server") and "AOF" in first
        port = re.search(r"127\.0\.0\.1:(\d+)", first)
        assert port is not None
        with gw.channel() as ch:
            v = check(pb_grpc.MeteringServiceStub(ch))
        assert v.decision == pb.DECISION_ALLOW and v.recorded
        # Redis 6 writes chargepath.aof; Redis 7 a multi-part AOF under appendonlydir/
        redis_dir = tmp_path / "data" / "redis"
        aof = [*redis_dir.glob("chargepath.aof"), *redis_dir.glob("appendonlydir/chargepath.aof*")]
        assert aof
    finally:
        assert gw.stop() == 0
    # the embedded redis-server is gone with the gateway
    out = subprocess.run(["pgrep", "-f", f"redis-server.*{port.group(1)}"], capture_output=True)
    assert out.stdout.strip() == b""
    assert "embedded redis-server stopped" in gw.log()


def test_store_down_gives_bounded_degraded_verdicts_and_not_serving(tmp_path: Path) -> None:
    # a sampler, so that the log lines carry trace ids (with no exporter and no sampler, the
    # default, nothing is traced and the logs have none)
    gw = start_gateway(tmp_path, env={"OTEL_TRACES_SAMPLER": "parentbased_always_on"})
    assert gw.redis is not None
    try:
        with gw.channel() as ch:
            stub = pb_grpc.MeteringServiceStub(ch)
            assert check(stub).recorded
            gw.redis.kill()
            timings = []
            for _ in range(30):
                started = time.perf_counter()
                cpaas = check(stub)
                timings.append(time.perf_counter() - started)
                mvno = check(stub, "mvno-demo")
                assert cpaas.degraded and not cpaas.recorded
                assert (cpaas.decision, cpaas.reason) == (
                    pb.DECISION_DENY,
                    pb.REASON_STORE_UNAVAILABLE,
                )
                assert (
                    mvno.degraded and mvno.reason == pb.REASON_NO_ENTITLEMENT
                )  # no api.sms on mvno
            # 50 ms store timeout + gRPC round trip on a busy 2-core machine
            assert max(timings) < 0.5
            deadline = time.monotonic() + 5
            while gw.health() != NOT_SERVING and time.monotonic() < deadline:
                time.sleep(0.1)
            assert gw.health() == NOT_SERVING
            # the log says why, with the trace id of a decision it concerns
            lines = [json.loads(x) for x in gw.log().splitlines() if x.startswith("{")]
            outage = [x for x in lines if x["msg"].startswith("store unavailable")]
            assert outage and len(outage[0]["trace_id"]) == 32 and outage[0]["level"] == "WARNING"
            gw.redis.start()
            deadline = time.monotonic() + 10
            while gw.health() != SERVING and time.monotonic() < deadline:
                time.sleep(0.1)
            assert gw.health() == SERVING
            deadline = time.monotonic() + 5
            while (v := check(stub)).degraded and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not v.degraded and v.recorded
    finally:
        assert gw.stop() == 0
        gw.redis.stop()


def test_sigterm_drains_open_streams(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path)
    assert gw.redis is not None
    outcome: dict[str, object] = {}
    got_first = threading.Event()
    release = threading.Event()

    def requests():  # type: ignore[no-untyped-def]
        yield pb.StreamUsageRequest(
            usages=[
                pb.Usage(
                    request_id="d1",
                    subject=pb.Subject(tenant="mvno-demo", slice="1-000001"),
                    metric="slice.bytes",
                    amount=10,
                    mode=pb.MODE_REPORT,
                )
            ]
        )
        release.wait(10)  # keep the stream open, as a slice controller does

    def run() -> None:
        with gw.channel() as ch:
            stream = pb_grpc.MeteringServiceStub(ch).StreamUsage(requests(), timeout=30)
            try:
                for r in stream:
                    outcome.setdefault("verdicts", []).append(r.verdicts[0].recorded)  # type: ignore[union-attr]
                    got_first.set()
            except grpc.RpcError as err:
                outcome["code"] = err.code()  # type: ignore[attr-defined]
                outcome["details"] = err.details()  # type: ignore[attr-defined]

    t = threading.Thread(target=run)
    t.start()
    try:
        assert got_first.wait(10)
        started = time.perf_counter()
        code = gw.stop()
        t.join(10)
        assert code == 0
        assert outcome["verdicts"] == [True]
        assert outcome["code"] is grpc.StatusCode.UNAVAILABLE
        assert "draining" in str(outcome["details"])
        assert time.perf_counter() - started < 5  # did not wait for the grace period
    finally:
        release.set()
        t.join(5)
        gw.redis.stop()


@pytest.mark.parametrize("bad", ["metrics: [{name: BAD}]", "plans: [{name: p, limits: 3}]"])
def test_invalid_plan_file_fails_fast_with_the_field(tmp_path: Path, bad: str) -> None:
    plans = tmp_path / "bad.yaml"
    plans.write_text(bad + "\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "chargepath",
            "serve",
            "--plans",
            str(plans),
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "d"),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert f"{plans}:1:" in out.stderr


def test_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, embedded=True, workers=2)
    try:
        pids: set[int] = set()
        for _ in range(20):  # new connections spread over the workers (SO_REUSEPORT)
            with gw.channel() as ch:
                v = check(pb_grpc.MeteringServiceStub(ch), tenant="cpaas-demo")
                assert v.decision in (pb.DECISION_ALLOW, pb.DECISION_THROTTLE) and not v.degraded
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            lines = [json.loads(x) for x in gw.log().splitlines() if x.startswith("{")]
            pids = {x["worker"] for x in lines if "worker" in x and x["msg"].startswith("serving")}
            if pids == {0, 1}:
                break
            time.sleep(0.2)
        assert pids == {0, 1}
    finally:
        assert gw.stop() == 0
    out = subprocess.run(
        ["pgrep", "-f", "chargepath-worker|multiprocessing.spawn"], capture_output=True
    )
    assert str(gw.process.pid) not in out.stdout.decode()
    assert "embedded redis-server stopped" in gw.log()
