"""The admin API on a live gateway: changes take effect on the next decision, state and explain
agree with Redis, bad input changes nothing, and the live feed shows decisions and thresholds."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
import redis
from google.protobuf.timestamp_pb2 import Timestamp

from chargepath.store.ledger import LedgerEntry
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import GatewayProcess


def ledger_rids(redis_client: redis.Redis, tenant: str) -> list[str]:
    """The request ids of the tenant's ledger entries, oldest first."""
    entries = redis_client.xrange(f"cp:{{{tenant}}}:ledger")
    return [LedgerEntry.from_fields(i, f).request_id for i, f in entries]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def channel(gateway: GatewayProcess) -> Iterator[grpc.Channel]:
    with gateway.channel() as ch:
        yield ch


@pytest.fixture
def admin(channel: grpc.Channel) -> apb_grpc.AdminServiceStub:
    return apb_grpc.AdminServiceStub(channel)


@pytest.fixture
def meter(channel: grpc.Channel) -> pb_grpc.MeteringServiceStub:
    return pb_grpc.MeteringServiceStub(channel)


def check(
    meter: pb_grpc.MeteringServiceStub,
    key: str,
    amount: int = 1,
    *,
    metric: str = "api.sms.send",
    mode: int = pb.MODE_ADMIT,
    tenant: str = "cpaas-demo",
    slice_: str = "",
) -> pb.Verdict:
    u = pb.Usage(
        request_id=str(uuid.uuid4()),
        subject=pb.Subject(tenant=tenant, slice=slice_, key=key),
        metric=metric,
        amount=amount,
        mode=mode,  # type: ignore[arg-type]
    )
    return meter.Check(pb.CheckRequest(usage=u), timeout=5).verdict


def live_version(admin: apb_grpc.AdminServiceStub) -> int:
    return int(admin.GetPolicy(apb.GetPolicyRequest(), timeout=5).policy_version)


def test_suspend_and_resume_take_effect_on_the_next_decision(
    admin: apb_grpc.AdminServiceStub, meter: pb_grpc.MeteringServiceStub, redis_client: redis.Redis
) -> None:
    assert check(meter, "adm-1").decision == pb.DECISION_ALLOW
    key = pb.Subject(tenant="cpaas-demo", key="adm-1")
    v = admin.Suspend(apb.SuspendRequest(subject=key, reason="fraud check"), timeout=5)
    denied = check(meter, "adm-1")
    assert (denied.decision, denied.reason) == (pb.DECISION_DENY, pb.REASON_SUSPENDED)
    assert denied.policy_version == v.policy_version and not denied.recorded
    assert check(meter, "adm-2").decision == pb.DECISION_ALLOW  # only that key
    v = admin.Resume(apb.ResumeRequest(subject=key), timeout=5)
    allowed = check(meter, "adm-1")
    assert allowed.decision == pb.DECISION_ALLOW and allowed.policy_version == v.policy_version

    admin.Suspend(apb.SuspendRequest(subject=pb.Subject(tenant="cpaas-demo")), timeout=5)
    assert check(meter, "adm-2").reason == pb.REASON_SUSPENDED
    # usage that already happened is still recorded, and the answer is "stop"
    reported = check(meter, "adm-2", mode=pb.MODE_REPORT)
    assert (reported.decision, reported.reason, reported.recorded) == (
        pb.DECISION_DENY,
        pb.REASON_SUSPENDED,
        True,
    )
    rids = ledger_rids(redis_client, "cpaas-demo")
    assert reported.request_id in rids
    admin.Resume(apb.ResumeRequest(subject=pb.Subject(tenant="cpaas-demo")), timeout=5)
    assert check(meter, "adm-2").decision == pb.DECISION_ALLOW


def test_grant_tops_up_an_exhausted_quota_at_once(
    admin: apb_grpc.AdminServiceStub, meter: pb_grpc.MeteringServiceStub
) -> None:
    # voice-daily: 5000 minutes a day for the tenant
    used = check(meter, "g-0", 5000, metric="api.voice.minutes", mode=pb.MODE_REPORT)
    assert (used.decision, used.reason) == (pb.DECISION_DENY, pb.REASON_QUOTA_EXHAUSTED)
    refused = check(meter, "g-1", 1, metric="api.voice.minutes")
    assert refused.reason == pb.REASON_QUOTA_EXHAUSTED
    g = admin.Grant(
        apb.GrantRequest(
            subject=pb.Subject(tenant="cpaas-demo"), limit="voice-daily", amount=10, note="T-1"
        ),
        timeout=5,
    )
    assert (g.capacity, g.remaining) == (5010, 10)
    v = check(meter, "g-1", 4, metric="api.voice.minutes")
    assert (v.decision, v.reason) == (pb.DECISION_ALLOW, pb.REASON_OK)
    daily = next(lim for lim in v.limits if lim.name == "voice-daily")
    assert (daily.remaining, daily.capacity) == (6, 5010)
    state = admin.GetState(apb.GetStateRequest(subject=pb.Subject(tenant="cpaas-demo")), timeout=5)
    assert [(x.limit, x.amount, x.note) for x in state.grants] == [("voice-daily", 10, "T-1")]
    # an expiry already past is refused and changes nothing
    past = Timestamp(seconds=int(time.time()) - 60)
    with pytest.raises(grpc.RpcError) as e:
        admin.Grant(
            apb.GrantRequest(
                subject=pb.Subject(tenant="cpaas-demo"),
                limit="voice-daily",
                amount=5,
                expires_at=past,
            ),
            timeout=5,
        )
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert e.value.details().startswith("expires_at")  # type: ignore[attr-defined]
    after = check(meter, "g-2", 1, metric="api.voice.minutes")
    assert next(lim for lim in after.limits if lim.name == "voice-daily").capacity == 5010


def test_state_and_explain_match_raw_redis(
    admin: apb_grpc.AdminServiceStub, meter: pb_grpc.MeteringServiceStub, redis_client: redis.Redis
) -> None:
    first = check(meter, "st-1", 3)
    throttled = check(meter, "st-1", 18)
    assert throttled.decision == pb.DECISION_THROTTLE
    state = admin.GetState(
        apb.GetStateRequest(subject=pb.Subject(tenant="cpaas-demo", key="st-1"), recent=5),
        timeout=5,
    )
    by_name = {lim.name: lim for lim in state.limits}
    assert set(by_name) == {
        "sms-per-key",
        "sms-account",
        "sms-monthly",
        "voice-per-key",
        "voice-daily",
    }
    # the per-key bucket, recomputed from the raw hash at the state's own read time
    raw = redis_client.hgetall("cp:{cpaas-demo}:r:sms-per-key::st-1")
    read_at = state.read_at.ToMilliseconds()
    scale, cap = 100, 20 * 100  # 10/s refill: 100 sub-units per unit, 1 per ms
    level = min(cap, int(raw["l"]) + (read_at - int(raw["t"])) * 1)  # type: ignore[index]
    assert by_name["sms-per-key"].remaining == level // scale
    assert by_name["sms-per-key"].capacity == 20 and by_name["sms-per-key"].per == "second"
    monthly = redis_client.hgetall("cp:{cpaas-demo}:q:sms-monthly::")
    assert by_name["sms-monthly"].used == int(monthly["u"])  # type: ignore[index]
    assert by_name["sms-monthly"].remaining == 1_000_000 - int(monthly["u"])  # type: ignore[index]
    assert [r.decision_id for r in state.recent[:2]] == [throttled.decision_id, first.decision_id]

    explained = admin.ExplainDecision(
        apb.ExplainDecisionRequest(tenant="cpaas-demo", decision_id=first.decision_id), timeout=5
    ).decision
    assert explained.request_id == first.request_id and explained.amount == 3
    assert explained.trace_id == first.trace_id and explained.policy_version == first.policy_version
    per_key = next(c for c in explained.limits if c.name == "sms-per-key")
    assert (per_key.remaining_before, per_key.remaining_after, per_key.capacity) == (20, 17, 20)
    for c, lim in zip(explained.limits, first.limits, strict=True):
        assert (c.name, c.remaining_after) == (lim.name, lim.remaining)
    refused = admin.ExplainDecision(
        apb.ExplainDecisionRequest(tenant="cpaas-demo", decision_id=throttled.decision_id),
        timeout=5,
    ).decision
    assert refused.decision == pb.DECISION_THROTTLE
    assert refused.retry_after.ToMilliseconds() == throttled.retry_after.ToMilliseconds()
    ex = next(c for c in refused.limits if c.name == "sms-per-key")
    assert ex.exceeded and ex.remaining_before == ex.remaining_after  # nothing taken


def expect_error(code: grpc.StatusCode, field: str, call: object, *args: object) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=5)  # type: ignore[operator]
    assert e.value.code() is code, e.value.details()  # type: ignore[attr-defined]
    assert e.value.details().startswith(field), e.value.details()  # type: ignore[attr-defined]


def test_bad_admin_input_names_the_field_and_changes_nothing(
    admin: apb_grpc.AdminServiceStub,
) -> None:
    before = admin.GetPolicy(apb.GetPolicyRequest(), timeout=5)
    bad_doc = (
        "metrics: [{name: api.sms.send}]\nplans:\n  - name: p\n"
        "    limits: [{name: l, metric: api.sms.send, rate: {capacity: 0, refill: 1}}]\n"
    )
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "document.plans.0.limits.0.rate.capacity",
        admin.ApplyPolicy,
        apb.ApplyPolicyRequest(document=bad_doc),
    )
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "document",
        admin.ApplyPolicy,
        apb.ApplyPolicyRequest(document="plans: [oops"),
    )
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        "plan",
        admin.AssignPlan,
        apb.AssignPlanRequest(tenant="cpaas-demo", plan="no-such-plan"),
    )
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        "subject.tenant",
        admin.Suspend,
        apb.SuspendRequest(subject=pb.Subject(tenant="nobody")),
    )
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "amount",
        admin.Grant,
        apb.GrantRequest(subject=pb.Subject(tenant="cpaas-demo"), limit="voice-daily", amount=-5),
    )
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        "limit",
        admin.Grant,
        apb.GrantRequest(subject=pb.Subject(tenant="cpaas-demo"), limit="sms-per-key", amount=5),
    )
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        "subject.tenant",
        admin.Grant,
        apb.GrantRequest(subject=pb.Subject(tenant="ghost"), limit="x", amount=5),
    )
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "plan",
        admin.PutPlan,
        apb.PutPlanRequest(
            plan=apb.Plan(
                name="p2",
                limits=[
                    apb.Limit(
                        name="l", metric="not.in.catalog", quota=apb.QuotaLimit(amount=5, per="day")
                    )
                ],
            )
        ),
    )
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "name",
        admin.DeletePlan,
        apb.DeletePlanRequest(name="cpaas-starter"),
    )
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "subject.tenant",
        admin.GetState,
        apb.GetStateRequest(subject=pb.Subject(tenant="")),
    )
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        "decision_id",
        admin.ExplainDecision,
        apb.ExplainDecisionRequest(tenant="cpaas-demo", decision_id="0" * 32),
    )
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        "mode",
        admin.SetFailurePolicy,
        apb.SetFailurePolicyRequest(tenant="cpaas-demo"),
    )
    after = admin.GetPolicy(apb.GetPolicyRequest(), timeout=5)
    assert (after.policy_version, after.document) == (before.policy_version, before.document)


def test_plan_change_keeps_usage_and_clamps_a_bucket(
    admin: apb_grpc.AdminServiceStub, meter: pb_grpc.MeteringServiceStub
) -> None:
    v = check(meter, "pc-1", 2)
    monthly_before = next(lim for lim in v.limits if lim.name == "sms-monthly").remaining
    plan = admin.GetPlan(apb.GetPlanRequest(name="cpaas-starter"), timeout=5).plan
    per_key = next(lim for lim in plan.limits if lim.name == "sms-per-key")
    per_key.rate.capacity = 5
    per_key.rate.refill = 1
    per_key.rate.per = "hour"
    changed = admin.PutPlan(apb.PutPlanRequest(plan=plan), timeout=5)
    assert changed.policy_version > v.policy_version
    after = check(meter, "pc-1", 5)
    assert after.policy_version == changed.policy_version
    # the bucket held 18 of 20: clamped to the new capacity 5, so 5 fits exactly, once
    assert after.decision == pb.DECISION_ALLOW
    assert next(lim for lim in after.limits if lim.name == "sms-per-key").remaining == 0
    assert (
        next(lim for lim in after.limits if lim.name == "sms-monthly").remaining
        == monthly_before - 5
    )
    assert check(meter, "pc-1", 1).decision == pb.DECISION_THROTTLE
    # restore the demo plan for the other tests
    per_key.rate.capacity, per_key.rate.refill, per_key.rate.per = 20, 10, "second"
    admin.PutPlan(apb.PutPlanRequest(plan=plan), timeout=5)


def test_watch_streams_decisions_and_quota_thresholds(
    admin: apb_grpc.AdminServiceStub, meter: pb_grpc.MeteringServiceStub
) -> None:
    events: list[apb.WatchDecisionsResponse] = []
    call = admin.WatchDecisions(
        apb.WatchDecisionsRequest(tenant="mvno-demo", decisions=[pb.DECISION_DENY])
    )

    def reader() -> None:
        try:
            for e in call:
                events.append(e)
        except grpc.RpcError:
            pass

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(1.0)  # the watch starts reading from "now"
    # slice-sessions-daily on the URLLC slice: 10,000 a day
    kw = {"metric": "slice.sessions", "tenant": "mvno-demo", "slice_": "1-000002"}
    check(meter, "", 7000, mode=pb.MODE_REPORT, **kw)  # type: ignore[arg-type]
    check(meter, "", 1500, mode=pb.MODE_REPORT, **kw)  # type: ignore[arg-type] # crosses 80%
    last = check(meter, "", 1500, mode=pb.MODE_REPORT, **kw)  # type: ignore[arg-type] # 100%
    assert last.decision == pb.DECISION_DENY
    deadline = time.monotonic() + 5
    while len(events) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    call.cancel()
    t.join(5)
    thresholds = [e.threshold for e in events if e.HasField("threshold")]
    decisions = [e.decision for e in events if e.HasField("decision")]
    assert [(x.limit, x.percent) for x in thresholds] == [
        ("slice-sessions-daily", 80),
        ("slice-sessions-daily", 100),
    ]
    assert thresholds[1].used == 10_000 and thresholds[1].capacity == 10_000
    # only DENY decisions passed the filter
    assert [d.decision_id for d in decisions] == [last.decision_id]
