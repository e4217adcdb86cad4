"""One table of usage validation cases, for the server's rules and the client's alike.

Each case changes one thing in a valid usage and says which field is then wrong (by its
client argument name), or None when the usage is still valid. Values are ones the wire can
carry (strings, integers), so that the same usage can be sent to the server; the client's
checks of Python types (an amount of 1.0, a tenant of None) are tested on their own.

The server is the contract (`chargepath.core.validation.validate_usage`); the client
(`chargepath_client._validation`, run by every `check`, `report` and stream submit before
sending) must agree with it on every case: tests/unit/test_validation_parity.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

#: A valid usage, as the keyword arguments of `AsyncClient.report` (plus `session_id`, which
#: a stream sets: empty here, so the usage is a unary one).
VALID: dict[str, Any] = {
    "tenant": "cpaas-demo",
    "metric": "api.sms.send",
    "amount": 1,
    "slice": "1-000001",
    "key": "key-42",
    "labels": {"country": "SE"},
    "request_id": "3f1c7a52-9f0e-4d3b-a1de-7c4b8e0f5a11",
    "occurred_at": None,
    "session_id": "",
}

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NOW = datetime.now(UTC)
AGO_35_DAYS_AND_A_MINUTE = NOW - timedelta(days=35, minutes=1)


@dataclass(frozen=True)
class ValidationCase:
    id: str
    changes: dict[str, Any] = field(default_factory=dict)
    #: The client argument the server and the client must both name; None: valid.
    field: str | None = None

    def usage(self) -> dict[str, Any]:
        return {**VALID, **self.changes}


def _case(id: str, field: str | None = None, **changes: Any) -> ValidationCase:
    return ValidationCase(id, changes, field)


CASES: tuple[ValidationCase, ...] = (
    _case("valid"),
    _case("no slice, key, labels", slice="", key="", labels=None),
    # tenant
    _case("tenant at 64", tenant="t" * 64),
    _case("tenant of every allowed character", tenant="A.b_c-9"),
    _case("tenant empty", "tenant", tenant=""),
    _case("tenant at 65", "tenant", tenant="t" * 65),
    _case("tenant with a space", "tenant", tenant="cpaas demo"),
    _case("tenant with a slash", "tenant", tenant="cpaas/demo"),
    _case("tenant with a brace", "tenant", tenant="a{b}"),
    _case("tenant not ASCII", "tenant", tenant="tenänt"),
    _case("tenant with a newline", "tenant", tenant="acme\n"),
    # slice and key
    _case("slice at 128", slice="s" * 128),
    _case("slice of every allowed character", slice="a.b_c~d@e+f=g/h-1"),
    _case("slice at 129", "slice", slice="s" * 129),
    _case("slice with a space", "slice", slice="1 000001"),
    _case("slice with a hash", "slice", slice="slice#1"),
    _case("key at 128", key="k" * 128),
    _case("key at 129", "key", key="k" * 129),
    _case("key with a newline", "key", key="key\n42"),
    _case("key with a colon", "key", key="k:1"),
    # metric (syntax only: whether the catalog knows it is the policy's call)
    _case("metric at 128", metric="m" * 128),
    _case("metric of two words", metric="slice.bytes"),
    _case("metric with digits and underscores", metric="api.voice_2.minutes"),
    _case("metric not in any catalog", metric="api.fax.send"),
    _case("metric empty", "metric", metric=""),
    _case("metric at 129", "metric", metric="m" * 129),
    _case("metric in capitals", "metric", metric="Api.Sms"),
    _case("metric with an empty word", "metric", metric="api..sms"),
    _case("metric ending with a dot", "metric", metric="api.sms."),
    _case("metric with a dash", "metric", metric="api.sms-send"),
    # amount
    _case("amount 1", amount=1),
    _case("amount at the maximum", amount=1_000_000_000_000),
    _case("amount 0", "amount", amount=0),
    _case("amount negative", "amount", amount=-1),
    _case("amount past the maximum", "amount", amount=1_000_000_000_001),
    # request id
    _case("request id at 128", request_id="r" * 128),
    _case("request id of punctuation", request_id="!~"),
    _case("request id empty", "request_id", request_id=""),
    _case("request id at 129", "request_id", request_id="r" * 129),
    _case("request id with a space", "request_id", request_id="has space"),
    _case("request id with a tab", "request_id", request_id="tab\there"),
    _case("request id not ASCII", "request_id", request_id="é"),
    # labels
    _case(
        "16 labels at their bounds", labels={f"k{i:02d}" + "k" * 61: "v" * 256 for i in range(16)}
    ),
    _case("label with an empty value", labels={"k": ""}),
    _case("17 labels", "labels", labels={f"k{i}": "v" for i in range(17)}),
    _case("label with an empty key", "labels", labels={"": "v"}),
    _case("label key at 65", "labels", labels={"k" * 65: "v"}),
    _case("label value at 257", "labels", labels={"k": "v" * 257}),
    # occurred_at: within 35 days before and 5 minutes after the clock (the gateway's default
    # window; a minute of margin either side for the time between building and checking)
    _case("occurred now", occurred_at=NOW),
    # NOW is taken when the table is imported, and a full run reaches these cases many minutes
    # later: the cases near the window's edges keep a margin wider than any run.
    _case("occurred 34 days ago", occurred_at=NOW - timedelta(days=34)),
    _case("occurred 4 minutes ahead", occurred_at=NOW + timedelta(minutes=4)),
    _case("occurred 35 days and a minute ago", "occurred_at", occurred_at=AGO_35_DAYS_AND_A_MINUTE),
    _case("occurred 2 hours ahead", "occurred_at", occurred_at=NOW + timedelta(hours=2)),
    _case("occurred a year ahead", "occurred_at", occurred_at=NOW + timedelta(days=366)),
    _case("occurred at the epoch", "occurred_at", occurred_at=EPOCH),
    _case("occurred before the epoch", "occurred_at", occurred_at=EPOCH - timedelta(seconds=1)),
    _case(
        "occurred long before the epoch",
        "occurred_at",
        occurred_at=datetime(1900, 1, 1, tzinfo=UTC),
    ),
    _case(
        "occurred at the end of what a Timestamp holds",
        "occurred_at",
        occurred_at=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ),
    # session id (a stream's)
    _case("session id", session_id="3f1c7a52-9f0e-4d3b-a1de-7c4b8e0f5a11"),
    _case("session id at 128", session_id="s" * 128),
    _case("session id at 129", "session_id", session_id="s" * 129),
    _case("session id with a space", "session_id", session_id="has space"),
)
