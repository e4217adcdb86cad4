"""The Python client's own validation: the server's input rules, checked before sending."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from chargepath_client import AsyncClient, Client, InvalidUsage, validate_usage

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
