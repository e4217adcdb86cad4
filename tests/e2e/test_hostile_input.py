"""Hostile input on a live gateway: malformed bytes on every RPC, a bounded log however many
there are, occurred_at's window, oversized messages, and an empty policy document. Calls carry
the operator key: the input is judged past authentication."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from chargepath.transport import services
from chargepath.transport.envoy import RLQS_DESCRIPTOR, RLS_DESCRIPTOR
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.conftest import ledger_entries
from tests.e2e.conftest import GatewayProcess

pytestmark = pytest.mark.e2e

MALFORMED = b"\xff\xff\xff"  # a field number 0 (and a varint cut short): no message decodes it
#: Every service the gateway serves (each registered through services.add_service).
SERVED = [
    m
    for s in (services.METERING, services.ADMIN, services.KEYS, RLS_DESCRIPTOR, RLQS_DESCRIPTOR)
    for m in s.methods
]


def path(method: object) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"  # type: ignore[attr-defined]


def bad_fields(error: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    out = []
    for detail in status.details:
        br = error_details_pb2.BadRequest()
        assert detail.Unpack(br)
        out += [(f.field, f.description) for f in br.field_violations]
    return out


def usage(**kw: object) -> pb.Usage:
    base: dict[str, object] = dict(
        request_id=str(uuid.uuid4()),
        subject=pb.Subject(tenant="mvno-demo", slice="1-000001"),
        metric="slice.bytes",
        amount=100,
        mode=pb.MODE_REPORT,
    )
    base.update(kw)
    return pb.Usage(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", SERVED, ids=[path(m) for m in SERVED])
def test_malformed_bytes_are_invalid_argument_on_every_rpc(
    gateway: GatewayProcess, method: object
) -> None:
    name = method.input_type.full_name  # type: ignore[attr-defined]
    with gateway.channel() as ch:
        if method.client_streaming:  # type: ignore[attr-defined]
            call = ch.stream_stream(path(method))(iter([MALFORMED]), timeout=5)
        elif method.server_streaming:  # type: ignore[attr-defined]
            call = ch.unary_stream(path(method))(MALFORMED, timeout=5)
        else:
            call = ch.unary_unary(path(method)).future(MALFORMED, timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            if method.server_streaming:  # type: ignore[attr-defined]
                list(call)
            else:
                call.result()
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    expected = f"not a valid {name} (protobuf decode failed)"
    assert error.details() == f"request: {expected}"  # type: ignore[attr-defined]
    assert bad_fields(error) == [("request", expected)]


def test_reflection_still_describes_the_services(gateway: GatewayProcess) -> None:
    with gateway.channel() as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="chargepath.v1.MeteringService"
            ),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="chargepath.v1.AdminService"
            ),
        ]
        listed, metering, admin = stub.ServerReflectionInfo(iter(requests), timeout=5)
    names = {s.name for s in listed.list_services_response.service}
    assert {"chargepath.v1.MeteringService", "chargepath.v1.AdminService"} <= names
    assert metering.file_descriptor_response.file_descriptor_proto
    assert admin.file_descriptor_response.file_descriptor_proto


def test_a_malformed_stream_message_ends_the_stream_after_what_was_answered(
    gateway: GatewayProcess, redis_client: redis.Redis
) -> None:
    good = usage(session_id=str(uuid.uuid4()), sequence=1)
    after = usage()
    messages = [
        pb.StreamUsageRequest(usages=[good]).SerializeToString(),
        MALFORMED,
        pb.StreamUsageRequest(usages=[after]).SerializeToString(),
    ]
    with gateway.channel() as ch:
        call = ch.stream_stream(
            "/chargepath.v1.MeteringService/StreamUsage",
            response_deserializer=pb.StreamUsageResponse.FromString,
        )(iter(messages), timeout=5)
        first = next(call)
        with pytest.raises(grpc.RpcError) as caught:
            next(call)
    assert [v.request_id for v in first.verdicts] == [good.request_id]
    assert first.verdicts[0].recorded
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert bad_fields(caught.value)[0][0] == "request"
    rids = {e.request_id for e in ledger_entries(redis_client, "mvno-demo")}
    assert good.request_id in rids and after.request_id not in rids


def test_ten_thousand_malformed_messages_write_a_bounded_log(gateway: GatewayProcess) -> None:
    before = gateway.log()
    codes: dict[str, int] = {}
    with gateway.channel() as ch:
        check = ch.unary_unary("/chargepath.v1.MeteringService/Check")
        stream = ch.stream_stream("/chargepath.v1.MeteringService/StreamUsage")
        for _ in range(10_000 // 200):
            calls = [check.future(MALFORMED + bytes([i % 256]), timeout=30) for i in range(150)]
            calls += [stream(iter([MALFORMED]), timeout=30) for _i in range(50)]
            for call in calls:
                try:
                    call.result() if hasattr(call, "result") else list(call)
                except grpc.RpcError as error:
                    name = error.code().name  # type: ignore[attr-defined]
                    codes[name] = codes.get(name, 0) + 1
    time.sleep(0.2)  # the last lines reach the file
    grown = gateway.log()[len(before) :]
    lines = grown.splitlines()
    print(
        f"\n10,000 malformed messages: {codes}; the log grew {len(grown)} bytes, {len(lines)} lines"
    )
    assert codes == {"INVALID_ARGUMENT": 10_000}
    # two kinds (CheckRequest, StreamUsageRequest): 10 lines each and one "not logging more"
    # per minute; the issue measured 10.7 MB for this
    assert len(lines) <= 2 * 11 * 2
    assert len(grown) < 16 * 1024
    assert "Traceback" not in grown and "DecodeError" not in grown


# -- occurred_at ------------------------------------------------------------------------------


def test_occurred_at_out_of_bounds_is_invalid_argument_on_check(gateway: GatewayProcess) -> None:
    now = int(time.time())
    cases = [
        ((2**63 - 1, 0), "occurred_at"),
        ((now, -1), "occurred_at.nanos"),
        ((now, 1_000_000_000), "occurred_at.nanos"),
        ((now - 36 * 86_400, 0), "occurred_at"),
        ((now + 600, 0), "occurred_at"),
    ]
    with gateway.channel() as ch:
        stub = pb_grpc.MeteringServiceStub(ch)
        for (seconds, nanos), field in cases:
            u = usage()
            u.occurred_at.seconds, u.occurred_at.nanos = seconds, nanos
            with pytest.raises(grpc.RpcError) as caught:
                stub.Check(pb.CheckRequest(usage=u), timeout=5)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert [f for f, _ in bad_fields(caught.value)] == [field], (seconds, nanos)
        u = usage()
        u.occurred_at.seconds = now - 3600
        v = stub.Check(pb.CheckRequest(usage=u), timeout=5).verdict
        assert v.recorded


def test_occurred_at_out_of_bounds_is_an_invalid_usage_verdict_on_a_stream(
    gateway: GatewayProcess, redis_client: redis.Redis
) -> None:
    now = int(time.time())
    overflow, nanos, fine = usage(), usage(amount=0), usage()
    overflow.occurred_at.seconds = 2**63 - 1
    nanos.occurred_at.seconds, nanos.occurred_at.nanos = now, -5
    fine.occurred_at.seconds, fine.occurred_at.nanos = now - 60, 250_000_000
    with gateway.channel() as ch:
        stub = pb_grpc.MeteringServiceStub(ch)
        (response,) = stub.StreamUsage(
            iter([pb.StreamUsageRequest(usages=[overflow, fine, nanos])]), timeout=5
        )
    got = [(v.request_id, pb.Reason.Name(v.reason)) for v in response.verdicts]
    assert got == [
        (overflow.request_id, "REASON_INVALID_USAGE"),
        (fine.request_id, "REASON_OK"),
        (nanos.request_id, "REASON_INVALID_USAGE"),
    ]
    assert [f.field for f in response.verdicts[0].violations] == ["occurred_at"]
    # every fault of the usage is named, the nanos among them (not rounded into range)
    assert [f.field for f in response.verdicts[2].violations] == ["amount", "occurred_at.nanos"]
    entries = {e.request_id: e for e in ledger_entries(redis_client, "mvno-demo")}
    assert overflow.request_id not in entries and nanos.request_id not in entries
    assert entries[fine.request_id].occurred_at_ms == (now - 60) * 1000 + 250


# -- message size -----------------------------------------------------------------------------


def test_a_batch_of_100000_usages_is_refused_once_without_verdicts(
    gateway: GatewayProcess,
) -> None:
    one = usage(request_id="r", subject=pb.Subject(tenant="mvno-demo"))
    request = pb.StreamUsageRequest(usages=[one] * 100_000)
    assert request.ByteSize() < 8 * 1024 * 1024  # within the size bound: parsed, then refused
    with gateway.channel() as ch:
        stub = pb_grpc.MeteringServiceStub(ch)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.StreamUsage(iter([request]), timeout=10))
        elapsed = time.monotonic() - started
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert caught.value.details() == "usages: at most 1000 per message, got 100000"  # type: ignore[attr-defined]
    assert elapsed < 3  # no 100,000 verdicts built


def test_a_message_over_the_size_bound_is_refused_before_parsing(
    gateway: GatewayProcess,
) -> None:
    too_big = pb.StreamUsageRequest(usages=[usage(labels={"k": "v" * 256})] * 40_000)
    assert too_big.ByteSize() > 8 * 1024 * 1024
    with gateway.channel(options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as ch:
        stub = pb_grpc.MeteringServiceStub(ch)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.StreamUsage(iter([too_big]), timeout=10))
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "8388608" in caught.value.details()  # type: ignore[attr-defined]
        # the gateway goes on
        v = stub.Check(pb.CheckRequest(usage=usage()), timeout=5).verdict
        assert v.recorded


# -- admin ------------------------------------------------------------------------------------


@pytest.mark.parametrize("document", ["", "   \n", "{}", "null", "~", "metrics: []"])
def test_an_empty_policy_document_is_refused_and_changes_nothing(
    gateway: GatewayProcess, document: str
) -> None:
    with gateway.channel() as ch:
        admin = apb_grpc.AdminServiceStub(ch)
        before = admin.GetPolicy(apb.GetPolicyRequest(), timeout=5)
        for dry_run in (False, True):
            with pytest.raises(grpc.RpcError) as caught:
                admin.ApplyPolicy(
                    apb.ApplyPolicyRequest(document=document, dry_run=dry_run), timeout=5
                )
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            # blank text is "empty"; a document that parses to nothing "has no plans and no
            # tenants": both name the field and refuse before anything changes
            [(field, reason)] = bad_fields(caught.value)
            assert field == "document"
            assert reason.startswith(("is empty", "has no plans and no tenants"))
        after = admin.GetPolicy(apb.GetPolicyRequest(), timeout=5)
    assert after == before and before.policy_version >= 1
