"""The Python client's own validation: the server's input rules, checked before sending."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from chargepath_client import AsyncClient, Client, InvalidUsage, validate_usage
from chargepath_client._validation import validate_occurred_at
from tests.validation_cases import VALID

pytestmark = pytest.mark.unit


def check(**changes: Any) -> None:
    fields = {k: v for k, v in VALID.items() if k not in ("occurred_at", "session_id")}
    validate_usage(**{**fields, **changes})


def test_a_valid_usage_passes() -> None:
    check()
    check(slice="", key="", labels=None, request_id=None)


# The rules themselves (bounds, characters) are one table shared with the server's
# validation: tests/validation_cases.py, run by test_validation_parity.py. Here: what only
# Python callers can get wrong, the types.
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tenant", None),
        ("key", 42),
        ("metric", b"api.sms.send"),
        ("amount", 1.0),
        ("amount", "1"),
        ("amount", True),
        ("request_id", 7),
    ],
)
def test_a_value_of_the_wrong_type_raises_invalid_usage_naming_it(
    field: str, value: object
) -> None:
    with pytest.raises(InvalidUsage) as caught:
        check(**{field: value})
    assert caught.value.field == field
    assert caught.value.reason.startswith("must be")
    assert str(caught.value).startswith(f"{field}: ")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("labels", [{"k": 1}, {1: "v"}, [("k", "v")]])
def test_labels_of_the_wrong_type_raise_invalid_usage_naming_labels(labels: Any) -> None:
    with pytest.raises(InvalidUsage) as caught:
        check(labels=labels)
    assert caught.value.field == "labels"


@pytest.mark.parametrize("occurred_at", ["2026-01-01T00:00:00Z", 1_700_000_000])
def test_occurred_at_must_be_a_datetime(occurred_at: object) -> None:
    with pytest.raises(InvalidUsage) as caught:
        validate_occurred_at(occurred_at)
    assert caught.value.field == "occurred_at"


def test_a_naive_occurred_at_is_taken_as_utc() -> None:
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    validate_occurred_at(datetime(2026, 11, 29, 12, 5), now)  # 5 minutes ahead, as UTC
    with pytest.raises(InvalidUsage):
        validate_occurred_at(datetime(2026, 11, 29, 12, 5, 1), now)


def test_occurred_at_is_judged_against_the_window_around_now() -> None:
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    validate_occurred_at(now - timedelta(days=35), now)
    with pytest.raises(InvalidUsage) as caught:
        validate_occurred_at(now - timedelta(days=35, seconds=1), now)
    assert caught.value.field == "occurred_at"
    assert "35 days before" in caught.value.reason


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
        with pytest.raises(InvalidUsage) as caught:
            await client.report("mvno-demo", "slice.bytes", 1, occurred_at=datetime(1969, 7, 20))
        assert caught.value.field == "occurred_at"


def test_the_sync_client_validates_before_sending() -> None:
    with Client("127.0.0.1:9") as client, pytest.raises(InvalidUsage) as caught:
        client.check("cpaas-demo", "api.sms.send", 1, labels={"k": "v" * 300})
    assert caught.value.field == "labels"
