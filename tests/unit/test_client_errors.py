"""Errors travel as structures: the client maps the server's field violations (the
google.rpc.BadRequest detail of a Check, `Verdict.violations` of a stream verdict) to
`InvalidUsage`, and never reads a field name out of message text."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from chargepath_client import (
    ChargepathError,
    DeadlineExceeded,
    InvalidUsage,
    PermissionDenied,
    ResourceExhausted,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    UsageStream,
)
from chargepath_client._errors import from_rpc_error, invalid_usage_from_verdict, public_field
from chargepath_protos.v1 import metering_pb2 as pb

pytestmark = pytest.mark.unit


class FakeRpcError(grpc.RpcError):
    """Just enough of a failed call for the status mapping (no network)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


def bad_request_error(message: str, *violations: tuple[str, str]) -> FakeRpcError:
    """An INVALID_ARGUMENT as the gateway sends it: a BadRequest detail in the rich status."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in violations
            ]
        )
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    return FakeRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        message,
        (("grpc-status-details-bin", status.SerializeToString()),),
    )


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("subject.tenant", "tenant"),
        ("usage.subject.key", "key"),
        ("usages[3].amount", "amount"),
        ("request_id", "request_id"),
        ("labels[country]", "labels"),
        ('usage.labels["country"]', "labels"),
        ("labels.region", "labels"),
    ],
)
def test_server_field_paths_map_to_argument_names(path: str, field: str) -> None:
    assert public_field(path) == field


def test_invalid_argument_takes_every_violation_from_the_bad_request_detail() -> None:
    error = from_rpc_error(
        bad_request_error(
            "something else entirely",
            ("subject.slice", "must be up to 128 characters"),
            ("amount", "must be between 1 and 1000000000000"),
        ),
        request_id="r-1",
    )
    assert isinstance(error, InvalidUsage)
    assert (error.field, error.reason) == ("slice", "must be up to 128 characters")
    assert error.violations == (
        ("slice", "must be up to 128 characters"),
        ("amount", "must be between 1 and 1000000000000"),
    )
    assert error.request_id == "r-1"
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_violation_without_description_keeps_the_status_message() -> None:
    error = from_rpc_error(bad_request_error("amount is wrong", ("amount", "")))
    assert isinstance(error, InvalidUsage)
    assert (error.field, error.reason) == ("amount", "amount is wrong")


def test_invalid_argument_without_detail_is_not_parsed_from_its_message() -> None:
    # The text looks like "field: reason", but text is for people: the error names the usage.
    error = from_rpc_error(
        FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "amount: must be between 1 and 10")
    )
    assert isinstance(error, InvalidUsage)
    assert error.field == "usage"
    assert error.reason == "amount: must be between 1 and 10"
    assert error.violations == (("usage", "amount: must be between 1 and 10"),)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.INTERNAL, ChargepathError),
    ],
)
def test_status_codes_map_to_their_exception(
    code: grpc.StatusCode, cls: type[ChargepathError]
) -> None:
    error = from_rpc_error(FakeRpcError(code, "went wrong"), request_id="r-9")
    assert type(error) is cls
    assert error.code == code
    assert error.request_id == "r-9"
    assert str(error) == f"{code.name}: went wrong"


def invalid_verdict(request_id: str, message: str, *violations: tuple[str, str]) -> pb.Verdict:
    return pb.Verdict(
        request_id=request_id,
        decision=pb.DECISION_DENY,
        reason=pb.REASON_INVALID_USAGE,
        message=message,
        violations=[pb.FieldViolation(field=f, description=d) for f, d in violations],
    )


def test_an_invalid_usage_verdict_takes_its_violations() -> None:
    error = invalid_usage_from_verdict(
        invalid_verdict(
            "r-7",
            "not what the violations say",
            ("metric", "unknown metric 'slice.unknown'"),
            ("labels.region", "values must be at most 256 chars"),
        )
    )
    assert isinstance(error, InvalidUsage)
    assert (error.field, error.reason) == ("metric", "unknown metric 'slice.unknown'")
    assert error.violations[1] == ("labels", "values must be at most 256 chars")
    assert error.request_id == "r-7"


def test_an_invalid_usage_verdict_without_violations_names_the_usage() -> None:
    error = invalid_usage_from_verdict(invalid_verdict("r-8", "metric: unknown metric"))
    assert (error.field, error.reason) == ("usage", "metric: unknown metric")


# -- the stream helper, against a fake StreamUsage call ---------------------------------------


class FakeUsageStreamCall:
    """A StreamUsage call answered in memory: each written batch gets one response with a
    verdict per usage, made by `answer`; EOF once the client is done writing."""

    def __init__(self, answer: Callable[[pb.Usage], pb.Verdict]) -> None:
        self._answer = answer
        self._responses: asyncio.Queue[pb.StreamUsageResponse | None] = asyncio.Queue()
        self.requests: list[pb.StreamUsageRequest] = []

    async def write(self, request: pb.StreamUsageRequest) -> None:
        self.requests.append(request)
        response = pb.StreamUsageResponse(verdicts=[self._answer(u) for u in request.usages])
        self._responses.put_nowait(response)

    async def read(self) -> pb.StreamUsageResponse | object:
        response = await self._responses.get()
        return grpc.aio.EOF if response is None else response

    async def done_writing(self) -> None:
        self._responses.put_nowait(None)

    def cancel(self) -> bool:
        return True


def fake_gateway(usage: pb.Usage) -> pb.Verdict:
    """Refuses the metric "slice.unknown" the way the gateway does (structured violations;
    a message that says something else, to show it is not read); allows everything else."""
    if usage.metric == "slice.unknown":
        return invalid_verdict(
            usage.request_id,
            "subject.tenant: not the field at fault",
            ("metric", f"unknown metric {usage.metric!r}"),
        )
    return pb.Verdict(
        request_id=usage.request_id,
        decision=pb.DECISION_ALLOW,
        reason=pb.REASON_OK,
        recorded=True,
    )


async def test_a_stream_invalid_usage_fails_only_its_own_future_with_the_structured_field() -> None:
    calls: list[FakeUsageStreamCall] = []

    def start(*, metadata: Any) -> FakeUsageStreamCall:
        calls.append(FakeUsageStreamCall(fake_gateway))
        return calls[-1]

    stream = UsageStream(
        start,
        session_id="session-1",
        batch_size=8,
        linger=0.0,
        max_in_flight=64,
        first_sequence=1,
        stall_timeout=5.0,
        retry=RetryPolicy(),
        metadata=(),
        validate=True,
    )
    async with stream:
        good = stream.submit_nowait(tenant="mvno-demo", metric="slice.bytes", amount=1)
        bad = stream.submit_nowait(
            tenant="mvno-demo", metric="slice.unknown", amount=1, request_id="bad-1"
        )
        also_good = stream.submit_nowait(tenant="mvno-demo", metric="slice.bytes", amount=2)
        with pytest.raises(InvalidUsage) as caught:
            await bad
        assert (await good).recorded and (await also_good).recorded
    assert caught.value.field == "metric"
    assert caught.value.reason == "unknown metric 'slice.unknown'"
    assert caught.value.request_id == "bad-1"
    assert stream.pending == 0
    sent = [u for call in calls for r in call.requests for u in r.usages]
    assert [u.sequence for u in sent] == [1, 2, 3]
    assert {u.session_id for u in sent} == {"session-1"}
