"""DESIGN property 4 across processes: two gateways on one Redis under load; once an admin
change has returned, no verdict from either carries the older version, and usage counted in the
period carries over."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import GatewayProcess, start_gateway


def test_plan_change_mid_run_reaches_both_gateways(tmp_path: Path) -> None:
    a = start_gateway(tmp_path / "a")
    b = start_gateway(tmp_path / "b", plans=None, redis_url=a.redis_url)
    results: list[tuple[float, int, int, int]] = []  # (sent at, version, decision, amount)
    lock = threading.Lock()
    stop = threading.Event()

    def load(gw: GatewayProcess, worker: int) -> None:
        with gw.channel() as ch:
            stub = pb_grpc.MeteringServiceStub(ch)
            n = 0
            while not stop.is_set():
                n += 1
                u = pb.Usage(
                    request_id=f"{worker}-{n}-{uuid.uuid4().hex[:6]}",
                    subject=pb.Subject(tenant="cpaas-demo", key=f"load-{worker}"),
                    metric="api.sms.send",
                    amount=1,
                    mode=pb.MODE_ADMIT,
                )
                sent = time.monotonic()
                v = stub.Check(pb.CheckRequest(usage=u), timeout=5).verdict
                assert not v.degraded, v.message
                with lock:
                    results.append((sent, v.policy_version, v.decision, u.amount))

    threads = [threading.Thread(target=load, args=(gw, i)) for i, gw in enumerate((a, b, a, b))]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        with a.channel() as ch:
            admin = apb_grpc.AdminServiceStub(ch)
            plan = admin.GetPlan(apb.GetPlanRequest(name="cpaas-starter"), timeout=5).plan
            old_version = admin.GetPolicy(apb.GetPolicyRequest(), timeout=5).policy_version
            next(lim for lim in plan.limits if lim.name == "sms-per-key").rate.capacity = 40
            new_version = admin.PutPlan(apb.PutPlanRequest(plan=plan), timeout=5).policy_version
            returned = time.monotonic()
            time.sleep(1.5)
            stop.set()
            for t in threads:
                t.join(10)
            state = admin.GetState(
                apb.GetStateRequest(subject=pb.Subject(tenant="cpaas-demo")), timeout=5
            )
    finally:
        stop.set()
        assert b.stop() == 0
        assert a.stop() == 0
        if a.redis:
            a.redis.stop()
    assert new_version == old_version + 1
    before = [r for r in results if r[0] < returned]
    after = [r for r in results if r[0] >= returned]
    assert before and after, "the load ran on both sides of the change"
    assert {r[1] for r in before} <= {old_version, new_version}
    # every decision asked for after the call returned used the new version, on both gateways
    assert {r[1] for r in after} == {new_version}
    # the period's usage carried over: the monthly quota counts every unit allowed, both versions
    allowed = sum(r[3] for r in results if r[2] == pb.DECISION_ALLOW)
    monthly = next(lim for lim in state.limits if lim.name == "sms-monthly")
    assert monthly.used == allowed
    print(f"{len(results)} decisions, {len(before)} before and {len(after)} after the change")
