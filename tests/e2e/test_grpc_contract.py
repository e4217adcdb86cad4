"""The public contract over real gRPC: verdicts, health, reflection, and bad input."""

from __future__ import annotations

import uuid

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.conftest import ledger_entries
from tests.e2e.conftest import GatewayProcess


def ledger_rids(redis_client: redis.Redis, tenant: str) -> list[str]:
    """The request ids of the tenant's ledger entries, oldest first."""
    return [e.request_id for e in ledger_entries(redis_client, tenant)]


def usage(**kw: object) -> pb.Usage:
    base: dict[str, object] = dict(
        request_id=str(uuid.uuid4()),
        subject=pb.Subject(tenant="cpaas-demo", key="key-e2e"),
        metric="api.sms.send",
        amount=1,
        mode=pb.MODE_ADMIT,
    )
    base.update(kw)
    return pb.Usage(**base)  # type: ignore[arg-type]


@pytest.fixture
def stub(gateway: GatewayProcess) -> pb_grpc.MeteringServiceStub:
    channel = gateway.channel(options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    return pb_grpc.MeteringServiceStub(channel)


def test_check_allows_and_records(
    stub: pb_grpc.MeteringServiceStub, redis_client: redis.Redis
) -> None:
    u = usage()
    v = stub.Check(pb.CheckRequest(usage=u), timeout=5).verdict
    assert (v.decision, v.reason, v.recorded) == (pb.DECISION_ALLOW, pb.REASON_OK, True)
    assert v.request_id == u.request_id and len(v.decision_id) == 32
    assert v.policy_version >= 1
    # no trace exporter is configured here, so nothing is sampled and no trace id is given
    # (test_telemetry_export.py checks the ids of an exporting gateway)
    assert v.trace_id == ""
    assert [lim.name for lim in v.limits] == ["sms-per-key", "sms-account", "sms-monthly"]
    rids = ledger_rids(redis_client, "cpaas-demo")
    assert rids.count(u.request_id) == 1
    again = stub.Check(pb.CheckRequest(usage=u), timeout=5).verdict
    assert again.replayed and again.decision_id == v.decision_id


def test_health_and_reflection(gateway: GatewayProcess) -> None:
    assert gateway.health() == 1  # SERVING
    with gateway.channel() as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    # every service the port serves is listed, Envoy's included (grpcurl needs it)
    assert {
        "chargepath.v1.MeteringService",
        "chargepath.v1.AdminService",
        "chargepath.v1.KeyService",
        "envoy.service.ratelimit.v3.RateLimitService",
        "envoy.service.rate_limit_quota.v3.RateLimitQuotaService",
        "grpc.health.v1.Health",
    } <= names


def field_violations(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    out = []
    for detail in status.details:
        br = error_details_pb2.BadRequest()
        assert detail.Unpack(br)
        out += [f.field for f in br.field_violations]
    return out


BAD = [
    ({"subject": pb.Subject(tenant="")}, "subject.tenant"),
    ({"amount": 0}, "amount"),
    ({"amount": -7}, "amount"),
    ({"mode": 7}, "mode"),
    ({"mode": pb.MODE_UNSPECIFIED}, "mode"),
    ({"subject": pb.Subject(tenant="t" * 10_000)}, "subject.tenant"),
    ({"request_id": "r" * 10_000}, "request_id"),
    ({"metric": "m" * 10_000}, "metric"),
    ({"subject": pb.Subject(tenant="cpaas-demo", key="k" * 10_000)}, "subject.key"),
    ({"labels": {f"label{i}": "v" for i in range(5000)}}, "labels"),
    ({"metric": "api.sms.unknown"}, "metric"),
    ({"session_id": "s1", "sequence": 1}, "session_id"),
]


@pytest.mark.parametrize(("kw", "field"), BAD, ids=[f for _, f in BAD])
def test_check_bad_input_is_invalid_argument_naming_the_field(
    stub: pb_grpc.MeteringServiceStub, kw: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.Check(pb.CheckRequest(usage=usage(**kw)), timeout=5)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert field in field_violations(e.value)
    details = e.value.details()  # type: ignore[attr-defined]
    assert details.startswith(field) or f"; {field}" in details
    assert len(details) < 500 and "Traceback" not in details


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def test_amount_beyond_int64_on_the_wire(gateway: GatewayProcess) -> None:
    """A varint larger than int64 (a client sending uint64 max) is refused, not wrapped."""
    inner = usage().SerializeToString() + b"\x20" + _varint(2**64 - 1)  # field 4 again: last wins
    body = b"\x0a" + _varint(len(inner)) + inner
    with gateway.channel() as ch:
        call = ch.unary_unary("/chargepath.v1.MeteringService/Check")
        with pytest.raises(grpc.RpcError) as e:
            call(body, timeout=5)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "amount" in field_violations(e.value)


def test_stream_bad_item_gets_invalid_usage_and_the_stream_goes_on(
    stub: pb_grpc.MeteringServiceStub, redis_client: redis.Redis
) -> None:
    session = str(uuid.uuid4())

    def report(seq: int, **kw: object) -> pb.Usage:
        base: dict[str, object] = dict(
            subject=pb.Subject(tenant="mvno-demo", slice="1-000001"),
            metric="slice.bytes",
            amount=1000,
            mode=pb.MODE_REPORT,
            session_id=session,
            sequence=seq,
        )
        base.update(kw)
        return usage(**base)

    batches = [
        pb.StreamUsageRequest(
            usages=[
                report(1),
                report(2, amount=-1),
                report(3),
                report(4, subject=pb.Subject(tenant="")),
            ]
        ),
        pb.StreamUsageRequest(
            usages=[report(5, labels={str(i): "x" for i in range(3000)}), report(6)]
        ),
        pb.StreamUsageRequest(usages=[report(2000)]),
    ]
    responses = list(stub.StreamUsage(iter(batches), timeout=10))
    assert len(responses) == 3
    first = responses[0].verdicts
    assert [v.reason for v in first] == [
        pb.REASON_OK,
        pb.REASON_INVALID_USAGE,
        pb.REASON_OK,
        pb.REASON_INVALID_USAGE,
    ]
    assert first[1].message.startswith("amount:") and first[3].message.startswith("subject.tenant:")
    # the same reasons as structures, on the wire: nothing to parse out of the message
    assert [(f.field, f.description) for f in first[1].violations] == [
        ("amount", "must be between 1 and 1000000000000, got -1")
    ]
    assert [f.field for f in first[3].violations] == ["subject.tenant"]
    assert first[3].message == "; ".join(f"{f.field}: {f.description}" for f in first[3].violations)
    assert not first[0].violations and not first[2].violations
    assert [v.request_id for v in first] == [u.request_id for u in batches[0].usages]
    assert [v.reason for v in responses[1].verdicts] == [pb.REASON_INVALID_USAGE, pb.REASON_OK]
    assert responses[2].verdicts[0].recorded
    recorded = {v.request_id for r in responses for v in r.verdicts if v.recorded}
    rids = ledger_rids(redis_client, "mvno-demo")
    assert recorded <= set(rids) and len(recorded) == 4
    # the invalid ones were not recorded
    assert batches[0].usages[1].request_id not in rids


def test_an_oversized_batch_ends_the_stream_once_with_invalid_argument(
    stub: pb_grpc.MeteringServiceStub, redis_client: redis.Redis
) -> None:
    """More than 1000 usages in one message cannot be answered usage by usage: the stream
    ends with INVALID_ARGUMENT on ``usages``; what was answered before stands, nothing of the
    oversized message (or after it) is decided."""
    session = str(uuid.uuid4())

    def report(seq: int) -> pb.Usage:
        return usage(
            subject=pb.Subject(tenant="mvno-demo", slice="1-000001"),
            metric="slice.bytes",
            amount=1000,
            mode=pb.MODE_REPORT,
            session_id=session,
            sequence=seq,
        )

    oversized = [report(2 + i) for i in range(1001)]
    batches = [
        pb.StreamUsageRequest(usages=[report(1)]),
        pb.StreamUsageRequest(usages=oversized),
        pb.StreamUsageRequest(usages=[report(5000)]),
    ]
    call = stub.StreamUsage(iter(batches), timeout=10)
    first = next(call)
    assert first.verdicts[0].recorded
    with pytest.raises(grpc.RpcError) as e:
        next(call)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert e.value.details() == "usages: at most 1000 per message, got 1001"  # type: ignore[attr-defined]
    assert field_violations(e.value) == ["usages"]
    rids = set(ledger_rids(redis_client, "mvno-demo"))
    assert batches[0].usages[0].request_id in rids
    assert not rids & {u.request_id for u in [*oversized, *batches[2].usages]}


def test_bad_input_of_one_tenant_does_not_harm_another(stub: pb_grpc.MeteringServiceStub) -> None:
    for _ in range(20):
        with pytest.raises(grpc.RpcError):
            stub.Check(
                pb.CheckRequest(usage=usage(amount=-1, subject=pb.Subject(tenant="x" * 9999)))
            )
    v = stub.Check(
        pb.CheckRequest(usage=usage(subject=pb.Subject(tenant="cpaas-demo", key="calm")))
    )
    assert v.verdict.decision == pb.DECISION_ALLOW


def test_basic_view_leaves_out_the_limits_of_plain_allows_only(
    stub: pb_grpc.MeteringServiceStub,
) -> None:
    key = f"view-{uuid.uuid4().hex[:8]}"
    subject = pb.Subject(tenant="cpaas-demo", key=key)
    # sms-per-key holds 20: 15 fit, the next 10 are throttled
    batch = pb.StreamUsageRequest(
        usages=[usage(subject=subject, amount=15), usage(subject=subject, amount=10)],
        view=pb.VERDICT_VIEW_BASIC,
    )
    (response,) = stub.StreamUsage(iter([batch]), timeout=10)
    allowed, throttled = response.verdicts
    assert (allowed.decision, allowed.reason) == (pb.DECISION_ALLOW, pb.REASON_OK)
    assert len(allowed.limits) == 0 and allowed.recorded and len(allowed.decision_id) == 32
    assert throttled.decision == pb.DECISION_THROTTLE
    assert [lim.name for lim in throttled.limits] == ["sms-per-key", "sms-account", "sms-monthly"]
    assert throttled.limits[0].exceeded and throttled.retry_after.ToMilliseconds() > 0
    # Check takes the same view; the default (and a view this gateway does not know) is FULL
    other = pb.Subject(tenant="cpaas-demo", key=f"{key}-2")
    basic = stub.Check(pb.CheckRequest(usage=usage(subject=other), view=pb.VERDICT_VIEW_BASIC))
    assert basic.verdict.decision == pb.DECISION_ALLOW and len(basic.verdict.limits) == 0
    full = stub.Check(pb.CheckRequest(usage=usage(subject=other)))
    assert len(full.verdict.limits) == 3 and full.verdict.limits[0].remaining == 18
    unknown = stub.Check(pb.CheckRequest(usage=usage(subject=other), view=7))  # type: ignore[arg-type]
    assert len(unknown.verdict.limits) == 3
