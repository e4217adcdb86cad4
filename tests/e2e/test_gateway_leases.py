"""Gateway-held leases in a real gateway: Checks answered from a lease (``leased``), the gateway
SIGKILLed with its leases open, the ledger against the verdicts, and the leases' units back at
expiry; a drain reports and releases."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import grpc
import redis

from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.conftest import ledger_entries
from tests.e2e.conftest import GatewayProcess, start_gateway
from tests.e2e.test_loadtest_smoke import ROOT, run_loadtest

CAPACITY = 1000
GRANT = 200
PLANS = f"""
metrics: [{{name: api.sms.send}}]
plans:
  - name: hot
    limits:
      - {{name: sms-key, metric: api.sms.send, scope: key,
         rate: {{capacity: {CAPACITY}, refill: 1, per: hour}},
         lease: {{max_units: {GRANT}, max_share_pct: 50, validity: 3s, gateway: true}}}}
tenants:
  - {{name: hot, plan: hot}}
"""


def check(meter: pb_grpc.MeteringServiceStub, rid: str) -> pb.Verdict:
    usage = pb.Usage(
        request_id=rid,
        subject=pb.Subject(tenant="hot", key="k1"),
        metric="api.sms.send",
        amount=1,
        mode=pb.MODE_ADMIT,
    )
    return meter.Check(pb.CheckRequest(usage=usage), timeout=5).verdict


def remaining(gw: GatewayProcess) -> int:
    with gw.channel() as ch:
        state = apb_grpc.AdminServiceStub(ch).GetState(
            apb.GetStateRequest(subject=pb.Subject(tenant="hot", key="k1")), timeout=5
        )
    return next(lim.remaining for lim in state.limits if lim.name == "sms-key")


def open_leases(gw: GatewayProcess) -> int:
    with gw.channel() as ch:
        state = apb_grpc.AdminServiceStub(ch).GetState(
            apb.GetStateRequest(subject=pb.Subject(tenant="hot", key="k1")), timeout=5
        )
    return len(state.leases)


def test_a_sigkilled_gateway_loses_at_most_its_unreported_units_and_they_come_back(
    tmp_path: Path,
) -> None:
    plans = tmp_path / "plans.yaml"
    plans.write_text(PLANS)
    a = start_gateway(tmp_path / "a", plans=plans, extra_args=("--workers", "1"))
    b: GatewayProcess | None = None
    raw = redis.Redis.from_url(a.redis_url)
    try:
        verdicts: list[pb.Verdict] = []
        with a.channel() as ch:
            meter = pb_grpc.MeteringServiceStub(ch)
            for i in range(400):
                verdicts.append(check(meter, f"k-{i}"))
            a.process.send_signal(signal.SIGKILL)
            a.process.wait(10)
        allowed = [v for v in verdicts if v.decision == pb.DECISION_ALLOW]
        leased = [v for v in allowed if v.leased]
        assert len(allowed) == 400 and len(leased) > 200, (len(allowed), len(leased))
        assert all(not v.recorded for v in leased)
        assert raw.zcard("cp:{hot}:leases") >= 1  # the dead gateway's lease is still open
        ledger = ledger_entries(raw, "hot")
        ids = [e.request_id for e in ledger]
        assert len(ids) == len(set(ids))  # nothing twice
        # every admit the store recorded is there; of the leased ones, all but those the
        # gateway had not reported when it died, which are fewer than one lease's grant
        assert {v.request_id for v in allowed if v.recorded} <= set(ids)
        unreported = {v.request_id for v in leased} - set(ids)
        assert len(unreported) < GRANT, len(unreported)
        assert set(ids) <= {v.request_id for v in allowed}
        # another gateway on the same store sweeps: at expiry (3 s) the leases' units come
        # back, the unreported ones included: the bucket holds all but what the ledger holds
        b = start_gateway(
            tmp_path / "b", plans=None, redis_url=a.redis_url, extra_args=("--workers", "1")
        )
        deadline = time.monotonic() + 15
        while raw.zcard("cp:{hot}:leases"):  # until the sweeper closed every lease
            assert time.monotonic() < deadline, "the dead gateway's leases never expired"
            time.sleep(0.2)
        assert open_leases(b) == 0
        # (the bucket refills 1 unit an hour: at most 1 more in these seconds)
        assert 0 <= remaining(b) - (CAPACITY - len(ledger)) <= 1
    finally:
        raw.close()
        if b is not None:
            assert b.stop() == 0, b.log()
        if a.process.poll() is None:
            a.stop()
        assert a.redis is not None
        a.redis.stop()


def test_a_drain_reports_and_releases(tmp_path: Path) -> None:
    plans = tmp_path / "plans.yaml"
    plans.write_text(PLANS)
    a = start_gateway(tmp_path / "a", plans=plans, extra_args=("--workers", "1"))
    raw = redis.Redis.from_url(a.redis_url)
    try:
        with a.channel() as ch:
            meter = pb_grpc.MeteringServiceStub(ch)
            verdicts = [check(meter, f"d-{i}") for i in range(150)]
        assert any(v.leased for v in verdicts)
        assert a.stop() == 0, a.log()
        ids = sorted(e.request_id for e in ledger_entries(raw, "hot"))
        assert ids == sorted(v.request_id for v in verdicts)
        assert not raw.zcard("cp:{hot}:leases")  # released: nothing held
    finally:
        raw.close()
        if a.process.poll() is None:
            a.stop()
        assert a.redis is not None
        a.redis.stop()


def test_callers_are_refused_before_any_lease(tmp_path: Path) -> None:
    plans = tmp_path / "plans.yaml"
    plans.write_text(
        PLANS.replace(
            "  - {name: hot, plan: hot}", "  - {name: hot, plan: hot}\n  - {name: other, plan: hot}"
        )
    )
    a = start_gateway(tmp_path / "a", plans=plans, extra_args=("--workers", "1"))
    try:
        with a.channel() as ch:
            meter = pb_grpc.MeteringServiceStub(ch)
            for i in range(60):  # a lease is held on hot/k1 now
                check(meter, f"r-{i}")
            from chargepath_protos.v1 import keys_pb2 as kpb
            from chargepath_protos.v1 import keys_pb2_grpc as kpb_grpc

            other = (
                kpb_grpc.KeyServiceStub(ch)
                .CreateKey(kpb.CreateKeyRequest(tenant="other", role=kpb.ROLE_METER), timeout=5)
                .secret_key
            )
        with a.channel(other) as foreign:
            try:
                check(pb_grpc.MeteringServiceStub(foreign), "x-1")
                raise AssertionError("another tenant's key was not refused")
            except grpc.RpcError as err:
                assert err.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        with a.raw_channel() as anonymous:
            try:
                check(pb_grpc.MeteringServiceStub(anonymous), "x-2")
                raise AssertionError("a call without a credential was not refused")
            except grpc.RpcError as err:
                assert err.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    finally:
        assert a.stop() == 0, a.log()
        assert a.redis is not None
        a.redis.stop()


def test_the_leased_hot_load_scenario_is_answered_and_all_of_it_reaches_the_ledger(
    tmp_path: Path,
) -> None:
    """``python -m loadtest leased-hot`` on its plan file: every Check allowed, no error; after
    the drain the ledger holds one entry per allowed Check."""
    gw = start_gateway(
        tmp_path / "gw",
        plans=ROOT / "loadtest" / "leased-plans.yaml",
        extra_args=("--workers", "1"),
    )
    raw = redis.Redis.from_url(gw.redis_url)
    try:
        proc = run_loadtest(
            "leased-hot", "--target", gw.address, "--api-key", gw.operator_key,
            "--rate", "100", "--duration", "3", "--warmup", "0", "--procs", "1",
            "--connections", "1", "--out", str(tmp_path), "--name", "lh", "--quiet",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        doc = json.loads((tmp_path / "lh.json").read_text())
        (measurement,) = doc["measurements"]
        (phase,) = measurement["phases"]
        (flow,) = phase["flows"]
        allowed = flow["tally"]["decisions"]["ALLOW"]
        assert allowed >= 250 and flow["tally"]["error_ops"] == 0, flow["tally"]
        assert gw.stop() == 0, gw.log()
        assert len(ledger_entries(raw, "cpaas-demo")) == allowed
    finally:
        raw.close()
        if gw.process.poll() is None:
            gw.stop()
        assert gw.redis is not None
        gw.redis.stop()
