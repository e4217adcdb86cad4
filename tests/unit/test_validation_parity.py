"""The client's validation agrees with the server's on every case of one table
(tests/validation_cases.py): the same verdict, valid or invalid, and the same field named.

The server side gets exactly the message the client would send (built by the client's
`_wire.usage` with its own checks off), mapped and validated as the gateway does (the core's
rules, and occurred_at against the default window around the clock)."""

from __future__ import annotations

from typing import Any

import pytest

from chargepath.core.validation import OccurredAtWindow
from chargepath.transport.mapping import usage_from_pb
from chargepath.transport.metering import usage_violations, wall_ms
from chargepath_client import InvalidUsage, Mode
from chargepath_client._errors import public_field
from chargepath_client._validation import validate_session_id
from chargepath_client._wire import usage as client_usage
from tests.validation_cases import CASES, ValidationCase

pytestmark = pytest.mark.unit


def build(fields: dict[str, Any], *, validate: bool) -> Any:
    return client_usage(
        Mode.REPORT,
        fields["tenant"],
        fields["metric"],
        fields["amount"],
        fields["slice"],
        fields["key"],
        fields["labels"],
        fields["request_id"],
        fields["occurred_at"],
        validate=validate,
        session_id=fields["session_id"],
    )


def client_finds(case: ValidationCase) -> str | None:
    """The field the client refuses before sending (a stream checks its session id when it
    opens), or None."""
    fields = case.usage()
    try:
        if fields["session_id"]:
            validate_session_id(fields["session_id"])
        build(fields, validate=True)
    except InvalidUsage as error:
        return error.field
    return None


def server_finds(case: ValidationCase) -> str | None:
    """The field of the gateway's first violation, as the client reports it, or None."""
    fields = case.usage()
    message = build(fields, validate=False)
    on_stream = bool(fields["session_id"])
    if on_stream:
        message.sequence = 1
    violations = usage_violations(
        message,
        usage_from_pb(message),
        on_stream=on_stream,
        now_ms=wall_ms(),
        window=OccurredAtWindow(),
    )
    return public_field(violations[0].field) if violations else None


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_the_server_finds_the_field_of_the_table(case: ValidationCase) -> None:
    assert server_finds(case) == case.field


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_the_client_finds_what_the_server_finds(case: ValidationCase) -> None:
    assert client_finds(case) == case.field


def test_the_table_covers_every_field_the_client_checks() -> None:
    fields = {case.field for case in CASES} - {None}
    assert fields == {
        "tenant",
        "slice",
        "key",
        "metric",
        "amount",
        "request_id",
        "labels",
        "occurred_at",
        "session_id",
    }
