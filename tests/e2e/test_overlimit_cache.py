"""The over-limit cache in real gateways (``serve --overlimit-cache``): two processes on one
Redis, a grant made through one reaching the other's cache, callers refused as before, the
retry marker, explain on a cached decision."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from chargepath.core.overlimit import CACHED_MESSAGE
from chargepath.transport.metering import RETRY_METADATA
from chargepath_client._base import RETRY_METADATA as CLIENT_RETRY_METADATA
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import keys_pb2 as kpb
from chargepath_protos.v1 import keys_pb2_grpc as kpb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import GatewayProcess, start_gateway
from tests.e2e.test_loadtest_smoke import ROOT, run_loadtest

LIVE = "over-limit cache on: subscribed to room events"

PLANS = """
metrics: [{name: api.sms.send}, {name: api.voice.minutes}]
plans:
  - name: olc
    limits:
      - {name: sms-key, metric: api.sms.send, scope: key,
         rate: {capacity: 3, refill: 1, per: hour}}
      - {name: voice-daily, metric: api.voice.minutes, scope: key,
         quota: {amount: 3, per: day}}
tenants:
  - {name: olc, plan: olc}
  - {name: other, plan: olc}
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, ...]]:
    root = tmp_path_factory.mktemp("overlimit")
    plans = root / "plans.yaml"
    plans.write_text(PLANS)
    a = start_gateway(root / "a", plans=plans, extra_args=("--overlimit-cache",))
    b = start_gateway(
        root / "b", plans=None, redis_url=a.redis_url, extra_args=("--overlimit-cache",)
    )
    deadline = time.monotonic() + 10
    while not all(LIVE in gw.log() for gw in (a, b)):
        assert time.monotonic() < deadline, a.log() + b.log()
        time.sleep(0.05)
    yield a, b
    codes = [gw.stop() for gw in (b, a)]
    assert a.redis is not None
    a.redis.stop()
    assert codes == [0, 0], a.log() + b.log()


def meter_key(gw: GatewayProcess, tenant: str) -> str:
    with gw.channel() as ch:
        created = kpb_grpc.KeyServiceStub(ch).CreateKey(
            kpb.CreateKeyRequest(tenant=tenant, role=kpb.ROLE_METER), timeout=5
        )
    return str(created.secret_key)


def check(
    stub: pb_grpc.MeteringServiceStub,
    rid: str,
    amount: int,
    *,
    key: str = "k1",
    metric: str = "api.voice.minutes",
    metadata: tuple[tuple[str, str], ...] = (),
) -> pb.Verdict:
    usage = pb.Usage(
        request_id=rid,
        subject=pb.Subject(tenant="olc", key=key),
        metric=metric,
        amount=amount,
        mode=pb.MODE_ADMIT,
    )
    return stub.Check(pb.CheckRequest(usage=usage), timeout=5, metadata=metadata).verdict


def test_a_grant_through_one_gateway_empties_the_other_gateways_cache(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, b = pair
    with a.channel(meter_key(a, "olc")) as ca, b.channel() as cb:
        meter = pb_grpc.MeteringServiceStub(ca)
        assert check(meter, "g-0", 3).decision == pb.DECISION_ALLOW
        first = check(meter, "g-1", 1)
        assert (first.decision, first.reason) == (pb.DECISION_DENY, pb.REASON_QUOTA_EXHAUSTED)
        assert first.message != CACHED_MESSAGE
        cached = check(meter, "g-2", 2)
        assert (cached.decision, cached.reason) == (pb.DECISION_DENY, pb.REASON_QUOTA_EXHAUSTED)
        assert cached.message == CACHED_MESSAGE and not cached.recorded
        assert cached.decision_id != first.decision_id
        assert 0 < cached.retry_after.ToMilliseconds() <= first.retry_after.ToMilliseconds()
        apb_grpc.AdminServiceStub(cb).Grant(
            apb.GrantRequest(
                subject=pb.Subject(tenant="olc", key="k1"), limit="voice-daily", amount=2
            ),
            timeout=5,
        )
        granted_at = time.monotonic()
        answers = []
        while True:  # the room event reaches gateway a within moments
            v = check(meter, f"g-after-{len(answers)}", 1)
            answers.append(v.message == CACHED_MESSAGE)
            if v.decision == pb.DECISION_ALLOW:
                break
            assert v.message == CACHED_MESSAGE, v  # the store itself would allow
            assert time.monotonic() - granted_at < 1.0, answers
            time.sleep(0.01)
        assert v.recorded and v.message != CACHED_MESSAGE


def test_callers_are_refused_before_the_cache_and_retries_bypass_it(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    a, _ = pair
    with a.channel(meter_key(a, "olc")) as ca:
        meter = pb_grpc.MeteringServiceStub(ca)
        for i in range(3):
            check(meter, f"s-{i}", 1, key="k2", metric="api.sms.send")
        assert check(meter, "s-3", 1, key="k2", metric="api.sms.send").message != CACHED_MESSAGE
        hit = check(meter, "s-4", 1, key="k2", metric="api.sms.send")
        assert hit.message == CACHED_MESSAGE and hit.reason == pb.REASON_RATE_LIMITED
        # a marked retry goes to the store (which has no record of s-5: it decides it)
        marked = check(
            meter, "s-5", 1, key="k2", metric="api.sms.send", metadata=((RETRY_METADATA, "1"),)
        )
        assert marked.decision == pb.DECISION_THROTTLE and marked.message != CACHED_MESSAGE
        # the id answered from the cache is answered the same way again
        again = check(meter, "s-4", 1, key="k2", metric="api.sms.send")
        assert again.replayed and again.decision_id == hit.decision_id
        # explain cannot find a cached decision, and says why
        with a.channel() as op, pytest.raises(grpc.RpcError) as err:
            apb_grpc.AdminServiceStub(op).ExplainDecision(
                apb.ExplainDecisionRequest(tenant="olc", decision_id=hit.decision_id),
                timeout=5,
            )
        assert err.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        assert "over-limit cache" in err.value.details()  # type: ignore[attr-defined]
    # another tenant's meter key: refused, as without the cache, though an entry is there
    with a.channel(meter_key(a, "other")) as foreign:
        with pytest.raises(grpc.RpcError) as err:
            check(pb_grpc.MeteringServiceStub(foreign), "f-1", 1, key="k2", metric="api.sms.send")
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    # no credential at all: refused
    with a.raw_channel() as anonymous:
        with pytest.raises(grpc.RpcError) as err:
            check(pb_grpc.MeteringServiceStub(anonymous), "n-1", 1, key="k2", metric="api.sms.send")
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert CLIENT_RETRY_METADATA == RETRY_METADATA  # the Python client marks its retries so


def test_without_the_flag_there_is_no_cache(tmp_path: Path) -> None:
    plans = tmp_path / "plans.yaml"
    plans.write_text(PLANS)
    gw = start_gateway(tmp_path / "plain", plans=plans)
    try:
        with gw.channel() as ch:
            meter = pb_grpc.MeteringServiceStub(ch)
            check(meter, "p-0", 3)
            answers = [check(meter, f"p-{i}", 1) for i in range(1, 4)]
        assert all(v.reason == pb.REASON_QUOTA_EXHAUSTED for v in answers)
        assert not any(v.message == CACHED_MESSAGE for v in answers)
    finally:
        assert gw.stop() == 0, gw.log()
        assert gw.redis is not None
        gw.redis.stop()


def test_the_over_limit_load_scenario_refuses_all_but_the_first(tmp_path: Path) -> None:
    """``python -m loadtest over-limit`` on its plan file: one subject, one ALLOW, then every
    Check refused (by the cache once it learned), nothing failed."""
    gw = start_gateway(
        tmp_path / "gw",
        plans=ROOT / "loadtest" / "overlimit-plans.yaml",
        extra_args=("--overlimit-cache",),
    )
    try:
        proc = run_loadtest(
            "over-limit", "--target", gw.address, "--api-key", gw.operator_key,
            "--rate", "100", "--duration", "3", "--warmup", "0", "--procs", "1",
            "--connections", "1", "--out", str(tmp_path), "--name", "ol", "--quiet",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        doc = json.loads((tmp_path / "ol.json").read_text())
        (measurement,) = doc["measurements"]
        (phase,) = measurement["phases"]
        (flow,) = phase["flows"]
        decisions = flow["tally"]["decisions"]
        assert decisions.get("ALLOW", 0) <= 1 and decisions["THROTTLE"] >= 250, decisions
        assert flow["tally"]["error_ops"] == 0
    finally:
        assert gw.stop() == 0, gw.log()
        assert gw.redis is not None
        gw.redis.stop()
