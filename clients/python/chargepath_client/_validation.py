"""Client-side validation of a usage: the server's input rules, checked before sending.

The rules mirror `chargepath.v1.Usage` (protos/chargepath/v1/metering.proto). Checking them
here turns a round trip that would end in INVALID_ARGUMENT into an immediate `InvalidUsage`
naming the argument; the server still checks everything (clients can be older or newer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from chargepath_client._errors import InvalidUsage

TENANT_MAX = 64
SUBJECT_PART_MAX = 128
METRIC_MAX = 128
AMOUNT_MIN = 1
AMOUNT_MAX = 1_000_000_000_000
LABELS_MAX = 16
LABEL_KEY_MAX = 64
LABEL_VALUE_MAX = 256
REQUEST_ID_MAX = 128
HOLDER_MAX = 128
SESSION_ID_MAX = 128
SEQUENCE_MAX = 2**53 - 1  # the server keeps sequences exact in Lua numbers (doubles)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The gateway's default occurred_at window around its clock (it can be configured wider or
# narrower: CHARGEPATH_OCCURRED_AT_MAX_AGE_S / _MAX_AHEAD_S); here, around this machine's.
OCCURRED_AT_MAX_AGE = timedelta(days=35)
OCCURRED_AT_MAX_AHEAD = timedelta(minutes=5)

_TENANT = re.compile(r"[A-Za-z0-9._-]+")
_SUBJECT_PART = re.compile(r"[A-Za-z0-9._~@+=/-]*")
# Printable ASCII without the space, as the server has it.
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")
_METRIC = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)*")
_HOLDER = re.compile(r"[A-Za-z0-9._~@+=/:-]*")


def _check_str(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidUsage(field, f"must be a string, not {type(value).__name__}")
    return value


def _check_id(field: str, value: object, max_len: int) -> None:
    text = _check_str(field, value)
    if not 1 <= len(text) <= max_len:
        raise InvalidUsage(field, f"must be 1 to {max_len} characters, got {len(text)}")
    if _PRINTABLE_ASCII.fullmatch(text) is None:
        raise InvalidUsage(field, "must be printable ASCII")


def validate_request_id(request_id: object) -> None:
    """Raise InvalidUsage unless `request_id` is 1 to 128 printable ASCII characters
    (no spaces)."""
    _check_id("request_id", request_id, REQUEST_ID_MAX)


def validate_session_id(session_id: object) -> None:
    """Raise InvalidUsage unless `session_id` is 1 to 128 printable ASCII characters."""
    _check_id("session_id", session_id, SESSION_ID_MAX)


def validate_holder(holder: object) -> None:
    """Raise InvalidUsage unless `holder` (who holds a lease, for people reading the state;
    "" for the caller's identity) is up to 128 characters of [A-Za-z0-9._~@+=/:-]."""
    text = _check_str("holder", holder)
    if len(text) > HOLDER_MAX or _HOLDER.fullmatch(text) is None:
        raise InvalidUsage(
            "holder", f"must be at most {HOLDER_MAX} characters of [A-Za-z0-9._~@+=/:-]"
        )


def validate_occurred_at(occurred_at: object, now: datetime | None = None) -> None:
    """Raise InvalidUsage unless `occurred_at` is None or a datetime at most 35 days before
    and 5 minutes after `now` (default: this machine's clock), the gateway's default window.
    A naive datetime is taken as UTC, as protobuf takes it."""
    if occurred_at is None:
        return
    if not isinstance(occurred_at, datetime):
        raise InvalidUsage("occurred_at", f"must be a datetime, not {type(occurred_at).__name__}")
    if occurred_at.tzinfo is None:
        occurred_at = occurred_at.replace(tzinfo=UTC)
    if occurred_at < EPOCH:
        raise InvalidUsage("occurred_at", "must not be before 1970-01-01")
    now = now or datetime.now(UTC)
    if not now - OCCURRED_AT_MAX_AGE <= occurred_at <= now + OCCURRED_AT_MAX_AHEAD:
        raise InvalidUsage(
            "occurred_at",
            "must be at most 35 days before and 5 minutes after now, "
            f"got {occurred_at.isoformat()}",
        )


def validate_usage(
    *,
    tenant: object,
    metric: object,
    amount: object,
    slice: object = "",
    key: object = "",
    labels: Mapping[str, str] | None = None,
    request_id: object = None,
) -> None:
    """Check one usage against the server's input rules; raise `InvalidUsage` naming the field.

    `request_id=None` is accepted (the client generates one).

    >>> validate_usage(tenant="cpaas-demo", metric="api.sms.send", amount=1)
    >>> validate_usage(tenant="cpaas demo", metric="api.sms.send", amount=1)
    Traceback (most recent call last):
    ...
    chargepath_client.InvalidUsage: tenant: must be 1 to 64 characters of [A-Za-z0-9._-]
    """
    if request_id is not None:
        validate_request_id(request_id)

    tenant = _check_str("tenant", tenant)
    if not 1 <= len(tenant) <= TENANT_MAX or _TENANT.fullmatch(tenant) is None:
        raise InvalidUsage("tenant", f"must be 1 to {TENANT_MAX} characters of [A-Za-z0-9._-]")

    for name, part in (("slice", slice), ("key", key)):
        text = _check_str(name, part)
        if len(text) > SUBJECT_PART_MAX or _SUBJECT_PART.fullmatch(text) is None:
            raise InvalidUsage(
                name, f"must be at most {SUBJECT_PART_MAX} characters of [A-Za-z0-9._~@+=/-]"
            )

    metric = _check_str("metric", metric)
    if not 1 <= len(metric) <= METRIC_MAX or _METRIC.fullmatch(metric) is None:
        raise InvalidUsage(
            "metric", f"must be 1 to {METRIC_MAX} characters of dot-separated [a-z0-9_] words"
        )

    # bool is an int subclass; True is not an amount.
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise InvalidUsage("amount", f"must be an integer, not {type(amount).__name__}")
    if not AMOUNT_MIN <= amount <= AMOUNT_MAX:
        raise InvalidUsage("amount", f"must be between {AMOUNT_MIN} and {AMOUNT_MAX}, got {amount}")

    if labels is not None:
        _validate_labels(labels)


def _validate_labels(labels: object) -> None:
    if not isinstance(labels, Mapping):
        raise InvalidUsage("labels", f"must be a mapping, not {type(labels).__name__}")
    if len(labels) > LABELS_MAX:
        raise InvalidUsage("labels", f"at most {LABELS_MAX} labels, got {len(labels)}")
    for label_key, label_value in labels.items():
        if not isinstance(label_key, str) or not isinstance(label_value, str):
            raise InvalidUsage("labels", "keys and values must be strings")
        if not 1 <= len(label_key) <= LABEL_KEY_MAX:
            raise InvalidUsage(
                "labels",
                f"key {label_key[:LABEL_KEY_MAX]!r}: must be 1 to {LABEL_KEY_MAX} characters",
            )
        if len(label_value) > LABEL_VALUE_MAX:
            raise InvalidUsage(
                "labels", f"value of {label_key!r}: must be at most {LABEL_VALUE_MAX} characters"
            )
