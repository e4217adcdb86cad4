"""The Python client's own validation: the server's input rules, checked before sending."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from chargepath_client import AsyncClient, Client, InvalidUsage, validate_usage
from chargepath_client._errors import from_rpc_error, invalid_usage_from_message, public_field

pytestmark = pytest.mark.unit

VALID: dict[str, Any] = {
    "tenant": "cpaas-demo",
    "metric": "api.sms.send",
    "amount": 1,
    "slice": "1-000001",
    "key": "key-42",
    "labels": {"country": "SE"},
    "request_id": "3f1c7a52-9f0e-4d3b-a1de-7c4b8e0f5a11",
}


def check(**changes: Any) -> None:
    validate_usage(**{**VALID, **changes})


def test_a_valid_usage_passes() -> None:
    check()
    check(slice="", key="", labels=None, request_id=None)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tenant", ""),
        ("tenant", "t" * 65),
        ("tenant", "cpaas demo"),
        ("tenant", "cpaas/demo"),
        ("tenant", "tenänt"),
        ("tenant", None),
        ("slice", "s" * 129),
        ("slice", "1 000001"),
        ("slice", "slice#1"),
        ("key", "k" * 129),
        ("key", "key\n42"),
        ("key", 42),
        ("metric", ""),
        ("metric", "m" * 129),
        ("metric", "Api.Sms"),
        ("metric", "api..sms"),
        ("metric", "api.sms."),
        ("amount", 0),
        ("amount", -1),
        ("amount", 1_000_000_000_001),
        ("amount", 1.0),
        ("amount", "1"),
        ("amount", True),
        ("request_id", ""),
        ("request_id", "r" * 129),
        ("request_id", "has space"),
        ("request_id", "tab\there"),
        ("request_id", "é"),
    ],
)
def test_a_bad_field_raises_invalid_usage_naming_it(field: str, value: object) -> None:
    with pytest.raises(InvalidUsage) as caught:
        check(**{field: value})
    assert caught.value.field == field
    assert caught.value.reason
    assert str(caught.value).startswith(f"{field}: ")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tenant", "t" * 64),
        ("tenant", "A.b_c-9"),
        ("slice", "s" * 128),
        ("slice", "a.b_c~d@e+f=g/h-1"),
        ("key", "k" * 128),
        ("metric", "m" * 128),
        ("metric", "slice.bytes"),
        ("metric", "api.voice_2.minutes"),
        ("amount", 1),
        ("amount", 1_000_000_000_000),
        ("request_id", "r" * 128),
        ("request_id", "!~"),
    ],
)
def test_values_at_the_bounds_pass(field: str, value: object) -> None:
    check(**{field: value})


@pytest.mark.parametrize(
    "labels",
    [
        {f"k{i}": "v" for i in range(17)},
        {"": "v"},
        {"k" * 65: "v"},
        {"k": "v" * 257},
        {"k": 1},
        [("k", "v")],
    ],
)
def test_bad_labels_raise_invalid_usage_naming_labels(labels: Any) -> None:
    with pytest.raises(InvalidUsage) as caught:
        check(labels=labels)
    assert caught.value.field == "labels"


def test_labels_at_the_bounds_pass() -> None:
    check(labels={f"k{i:02d}" + "k" * 61: "v" * 256 for i in range(16)})


def test_invalid_usage_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="amount"):
        check(amount=0)


async def test_the_async_client_validates_before_sending() -> None:
    # Nothing listens on port 9: a call that got as far as the network would not fail with
    # InvalidUsage but with Unavailable.
    async with AsyncClient("127.0.0.1:9") as client:
        with pytest.raises(InvalidUsage) as caught:
            await client.check("cpaas demo", "api.sms.send", 1)
        assert caught.value.field == "tenant"
        with pytest.raises(InvalidUsage) as caught:
            await client.report("mvno-demo", "slice.bytes", 0, slice="1-000001")
        assert caught.value.field == "amount"


def test_the_sync_client_validates_before_sending() -> None:
    with Client("127.0.0.1:9") as client, pytest.raises(InvalidUsage) as caught:
        client.check("cpaas-demo", "api.sms.send", 1, labels={"k": "v" * 300})
    assert caught.value.field == "labels"


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("subject.tenant", "tenant"),
        ("usage.subject.key", "key"),
        ("usages[3].amount", "amount"),
        ("request_id", "request_id"),
        ("labels[country]", "labels"),
        ('usage.labels["country"]', "labels"),
    ],
)
def test_server_field_paths_map_to_argument_names(path: str, field: str) -> None:
    assert public_field(path) == field


def test_a_server_message_is_parsed_into_field_and_reason() -> None:
    error = invalid_usage_from_message(
        "subject.tenant: must be 1 to 64 characters; amount: must be between 1 and 10"
    )
    assert error.field == "tenant"
    assert error.reason.startswith("must be 1 to 64 characters")
    assert invalid_usage_from_message("no field here").field == "usage"


class _FakeRpcError(grpc.RpcError):
    """Just enough of a failed call for the status mapping (no network)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


def test_invalid_argument_uses_the_bad_request_detail() -> None:
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2

    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="subject.slice", description="must be up to 128 characters"
                ),
                error_details_pb2.BadRequest.FieldViolation(
                    field="amount", description="must be between 1 and 1000000000000"
                ),
            ]
        )
    )
    message = "something else entirely"
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    error = from_rpc_error(
        _FakeRpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            message,
            (("grpc-status-details-bin", status.SerializeToString()),),
        ),
        request_id="r-1",
    )
    assert isinstance(error, InvalidUsage)
    assert (error.field, error.reason) == ("slice", "must be up to 128 characters")
    assert error.violations[1] == ("amount", "must be between 1 and 1000000000000")
    assert error.request_id == "r-1"


def test_invalid_argument_without_detail_falls_back_to_the_message() -> None:
    error = from_rpc_error(
        _FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "amount: must be between 1 and 10")
    )
    assert isinstance(error, InvalidUsage)
    assert (error.field, error.reason) == ("amount", "must be between 1 and 10")
