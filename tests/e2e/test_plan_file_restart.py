"""Runtime state survives restarts: real gateways restarted with ``--plans`` on one real Redis.

Suspensions, failure policies, slice assignments, plan edits and grants made through the admin
API are kept by a restart with the same plan file; a changed file is applied without reverting
them; ``--plans-mode replace`` makes the file win. The log names every field (asserted)."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from chargepath.store.embedded import EmbeddedRedis
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import DEMO_PLANS, GatewayProcess, start_gateway


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis that outlives the gateways of one test."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def policy_log(gw: GatewayProcess) -> list[str]:
    """The start-up policy lines of a gateway's (JSON) log, in order."""
    out = []
    for line in gw.log().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record["logger"] == "chargepath.policy":
                out.append(record["msg"])
    return out


def check(gw: GatewayProcess, key: str, metric: str = "api.sms.send") -> pb.Verdict:
    with gw.channel() as ch:
        u = pb.Usage(
            request_id=uuid.uuid4().hex,
            subject=pb.Subject(tenant="cpaas-demo", key=key),
            metric=metric,
            amount=1,
            mode=pb.MODE_ADMIT,
        )
        return pb_grpc.MeteringServiceStub(ch).Check(pb.CheckRequest(usage=u), timeout=5).verdict


def admin(gw: GatewayProcess) -> tuple[grpc.Channel, apb_grpc.AdminServiceStub]:
    ch = gw.channel()
    return ch, apb_grpc.AdminServiceStub(ch)


def restart(
    gw: GatewayProcess, workdir: Path, plans: Path, *extra: str, workers: int = 1
) -> GatewayProcess:
    assert gw.stop() == 0, gw.log()
    return start_gateway(
        workdir, plans=plans, redis_url=gw.redis_url, extra_args=extra, workers=workers
    )


def test_admin_changes_survive_restarts_and_a_changed_file(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    plans = tmp_path / "plans.yaml"
    shutil.copy(DEMO_PLANS, plans)
    gw = start_gateway(tmp_path / "run1", plans=plans, redis_url=redis_server.url)
    try:
        first = f"plan file {plans} published as policy version 1 (no live policy before)"
        assert policy_log(gw) == [first]
        ch, stub = admin(gw)
        with ch:
            stub.Suspend(
                apb.SuspendRequest(
                    subject=pb.Subject(tenant="cpaas-demo", key="k-stolen"), reason="fraud"
                ),
                timeout=5,
            )
            stub.SetFailurePolicy(
                apb.SetFailurePolicyRequest(tenant="mvno-demo", mode=apb.FAILURE_MODE_DENY),
                timeout=5,
            )
            stub.AssignPlan(
                apb.AssignPlanRequest(tenant="mvno-demo", slice="1-000002", plan="slice-embb"),
                timeout=5,
            )
            plan = stub.GetPlan(apb.GetPlanRequest(name="cpaas-starter"), timeout=5).plan
            next(lim for lim in plan.limits if lim.name == "sms-per-key").rate.capacity = 3
            stub.PutPlan(apb.PutPlanRequest(plan=plan), timeout=5)
            granted = stub.Grant(
                apb.GrantRequest(
                    subject=pb.Subject(tenant="cpaas-demo"),
                    limit="voice-daily",
                    amount=500,
                    note="ticket-7",
                ),
                timeout=5,
            )
        assert check(gw, "k-stolen").reason == pb.REASON_SUSPENDED

        # 1. the same plan file: nothing is published, nothing reverts
        gw = restart(gw, tmp_path / "run2", plans)
        assert_runtime_state(gw, granted.grant_id)
        logged = policy_log(gw)
        assert logged[:2] == [
            f"plan file {plans} unchanged since version 1; live policy version 5 kept "
            "(4 runtime changes since)",
            f"live policy version 5 drifts from plan file {plans} in 4 fields (runtime changes "
            "kept): plans ~cpaas-starter; tenants ~mvno-demo ~cpaas-demo",
        ]
        drift = "drift from the plan file:"
        assert sorted(logged[2:]) == [
            f"{drift} + tenants.cpaas-demo.keys.k-stolen suspended='fraud'",
            f"{drift} ~ plans.cpaas-starter.limits.sms-per-key.rate.capacity: 20 -> 3",
            f"{drift} ~ tenants.mvno-demo.failure_policy.mode: 'allow' -> 'deny'",
            f"{drift} ~ tenants.mvno-demo.slices.1-000002.plan: 'slice-urllc' -> 'slice-embb'",
        ]

        # 2. a changed file: plans added, the starter's SMS account rate raised, and the slice
        # the runtime reassigned assigned by the file too. Applied; the runtime changes are
        # still there, but for the one field both changed, where the file wins and says so
        data = yaml.safe_load(plans.read_text())
        data["plans"].append(
            {
                "name": "platinum",
                "limits": [
                    {"name": "sms", "metric": "api.sms.send", "rate": {"capacity": 9, "refill": 9}}
                ],
            }
        )
        data["plans"].append(
            {
                "name": "slice-mmtc",
                "limits": [
                    {
                        "name": "mmtc-sessions",
                        "metric": "slice.sessions",
                        "scope": "slice",
                        "rate": {"capacity": 5, "refill": 1},
                    }
                ],
            }
        )
        data["tenants"][0]["slices"][1]["plan"] = "slice-mmtc"
        starter = next(p for p in data["plans"] if p["name"] == "cpaas-starter")
        starter["limits"][1]["rate"]["capacity"] = 300  # sms-account
        plans.write_text(yaml.safe_dump(data, sort_keys=False))
        gw = restart(gw, tmp_path / "run3", plans)
        assert_runtime_state(gw, granted.grant_id, slice_plan="slice-mmtc")
        ch, stub = admin(gw)
        with ch:
            platinum = stub.GetPlan(apb.GetPlanRequest(name="platinum"), timeout=5).plan
            assert [lim.name for lim in platinum.limits] == ["sms"]
            got = stub.GetPlan(apb.GetPlanRequest(name="cpaas-starter"), timeout=5).plan
            rates = {lim.name: lim.rate.capacity for lim in got.limits if lim.HasField("rate")}
            assert (rates["sms-account"], rates["sms-per-key"]) == (300, 3)
        logged = policy_log(gw)
        assert logged[0] == (
            f"plan file {plans} changed since version 1: plans ~cpaas-starter +platinum "
            "+slice-mmtc; tenants ~mvno-demo; live policy published as version 6, runtime "
            "changes since kept unless the file changes the same field (1 overridden)"
        )
        assert (
            "plan file wins over a runtime change: tenants.mvno-demo.slices.1-000002.plan: the "
            "file's 'slice-mmtc' replaces the runtime 'slice-embb'" in logged
        )
        assert (
            "plan file change: ~ plans.cpaas-starter.limits.sms-account.rate.capacity: 200 -> 300"
            in logged
        )
        assert any(
            line.startswith("plan file change: + plans.platinum 1 limits") for line in logged
        )
        assert (
            "drift from the plan file: + tenants.cpaas-demo.keys.k-stolen suspended='fraud'"
            in logged
        )

        # 3. --plans-mode replace: the file wins wholesale, and the log says what it dropped;
        # grants are not policy and stay
        gw = restart(gw, tmp_path / "run4", plans, "--plans-mode", "replace")
        assert check(gw, "k-stolen").decision == pb.DECISION_ALLOW
        ch, stub = admin(gw)
        with ch:
            state = stub.GetState(
                apb.GetStateRequest(subject=pb.Subject(tenant="mvno-demo", slice="1-000002")),
                timeout=5,
            )
            assert (state.failure_mode, state.slice_plan) == (
                apb.FAILURE_MODE_ALLOW,
                "slice-mmtc",
            )
            cpaas = stub.GetState(
                apb.GetStateRequest(subject=pb.Subject(tenant="cpaas-demo")), timeout=5
            )
            assert [g.grant_id for g in cpaas.grants] == [granted.grant_id]
        logged = policy_log(gw)
        assert logged[0].startswith(
            f"plan file {plans} replaces live policy version 6 (--plans-mode replace): now "
            "version 7; runtime changes dropped: plans ~cpaas-starter; tenants ~mvno-demo "
            "~cpaas-demo"
        )
        assert "dropped by --plans-mode replace: - tenants.cpaas-demo.keys.k-stolen" in logged
        assert (
            "dropped by --plans-mode replace: ~ tenants.mvno-demo.failure_policy.mode: 'deny' "
            "-> 'allow'" in logged
        )
    finally:
        assert gw.stop() == 0, gw.log()


def assert_runtime_state(
    gw: GatewayProcess, grant_id: str, *, slice_plan: str = "slice-embb"
) -> None:
    """Every admin change made in the first run is live (``slice_plan``: the plan of slice
    1-000002 of mvno-demo, reassigned at runtime)."""
    stolen = check(gw, "k-stolen")
    assert (stolen.decision, stolen.reason) == (pb.DECISION_DENY, pb.REASON_SUSPENDED)
    # the plan edit: sms-per-key holds 3
    key = f"fresh-{uuid.uuid4().hex[:6]}"
    assert [check(gw, key).decision for _ in range(4)] == [
        pb.DECISION_ALLOW,
        pb.DECISION_ALLOW,
        pb.DECISION_ALLOW,
        pb.DECISION_THROTTLE,
    ]
    ch, stub = admin(gw)
    with ch:
        slice_state = stub.GetState(
            apb.GetStateRequest(subject=pb.Subject(tenant="mvno-demo", slice="1-000002")),
            timeout=5,
        )
        assert slice_state.failure_mode == apb.FAILURE_MODE_DENY
        assert slice_state.slice_plan == slice_plan
        cpaas = stub.GetState(
            apb.GetStateRequest(subject=pb.Subject(tenant="cpaas-demo")), timeout=5
        )
        assert [(g.grant_id, g.amount, g.note) for g in cpaas.grants] == [
            (grant_id, 500, "ticket-7")
        ]
        daily = next(lim for lim in cpaas.limits if lim.name == "voice-daily")
        assert daily.capacity == 5000 + 500


def test_the_supervisor_applies_the_file_once_and_workers_never_republish(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    plans = tmp_path / "plans.yaml"
    shutil.copy(DEMO_PLANS, plans)
    gw = start_gateway(tmp_path / "run1", plans=plans, redis_url=redis_server.url)
    try:
        ch, stub = admin(gw)
        with ch:
            stub.Suspend(
                apb.SuspendRequest(
                    subject=pb.Subject(tenant="cpaas-demo", key="k-stolen"), reason="fraud"
                ),
                timeout=5,
            )
        gw = restart(gw, tmp_path / "run2", plans, workers=2)
        # every worker serves the suspension (new connections spread across the workers)
        assert {check(gw, "k-stolen").reason for _ in range(8)} == {pb.REASON_SUSPENDED}
        logged = policy_log(gw)
        assert logged[0] == (
            f"plan file {plans} unchanged since version 1; live policy version 2 kept "
            "(1 runtime changes since)"
        )
        # the supervisor logged the start once; no worker applied the file again
        assert sum(line.startswith("plan file ") for line in logged) == 1
    finally:
        assert gw.stop() == 0, gw.log()
