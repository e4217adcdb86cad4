"""Input bounds of the public contract, checked before anything touches the store.

Every rule names the field it guards so that a caller gets ``INVALID_ARGUMENT`` with the field
and the reason. The bounds also keep Redis keys short and amounts exact in Lua, whose numbers
are doubles (integers are exact up to 2**53).

``occurred_at`` (when a reported usage happened) must lie in a window around the gateway's
wall clock: by default at most 35 days in the past (a month's usage, reported late, still
reaches its billing period) and 5 minutes in the future (clock skew between a controller and
the gateway). The gateway's settings ``occurred_at_max_age_s`` and ``occurred_at_max_ahead_s``
(``CHARGEPATH_OCCURRED_AT_MAX_AGE_S``, ``CHARGEPATH_OCCURRED_AT_MAX_AHEAD_S``) move it. Whatever
the window, the value in milliseconds lies in ``[0, 2**53 - 1]``, so that it fits an int64 for
billing readers and stays exact in Lua; ``nanos`` must be 0 to 999,999,999 (a
``google.protobuf.Timestamp``'s own rule), never rounded into range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from chargepath.core.model import FieldViolation, Mode, Usage

MAX_AMOUNT = 1_000_000_000_000
MAX_LABELS = 16
MAX_LABEL_KEY = 64
MAX_LABEL_VALUE = 256
MAX_REQUEST_ID = 128
MAX_SESSION_ID = 128
MAX_METRIC = 128
MAX_SEQUENCE = 2**53 - 1
MAX_BATCH = 1000
MAX_NANOS = 999_999_999
#: The largest ``occurred_at`` in milliseconds since the epoch: exact as a Lua number.
MAX_OCCURRED_AT_MS = 2**53 - 1
DEFAULT_OCCURRED_AT_MAX_AGE_S = 35 * 86_400
DEFAULT_OCCURRED_AT_MAX_AHEAD_S = 5 * 60

TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
SUBJECT_PART_RE = re.compile(r"[A-Za-z0-9._~@+=/-]{1,128}")
METRIC_RE = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")
PRINTABLE_RE = re.compile(r"[\x21-\x7e]+")


def _shorten(value: str) -> str:
    """A bounded rendering of a bad value, so a 10,000-character input is not echoed back."""
    return value if len(value) <= 32 else f"{value[:29]}... ({len(value)} characters)"


def check_tenant(tenant: str, path: str = "subject.tenant") -> FieldViolation | None:
    if not tenant:
        return FieldViolation(path, "is required")
    if not TENANT_RE.fullmatch(tenant):
        return FieldViolation(
            path, f"must be 1 to 64 characters of [A-Za-z0-9._-], got {_shorten(tenant)!r}"
        )
    return None


def check_subject_part(value: str, path: str) -> FieldViolation | None:
    if value and not SUBJECT_PART_RE.fullmatch(value):
        return FieldViolation(
            path, f"must be up to 128 characters of [A-Za-z0-9._~@+=/-], got {_shorten(value)!r}"
        )
    return None


def check_metric_name(metric: str, path: str = "metric") -> FieldViolation | None:
    if not metric:
        return FieldViolation(path, "is required")
    if len(metric) > MAX_METRIC or not METRIC_RE.fullmatch(metric):
        return FieldViolation(
            path,
            "must be up to 128 characters of dot-separated [a-z0-9_] words, "
            f"got {_shorten(metric)!r}",
        )
    return None


@dataclass(frozen=True, slots=True)
class OccurredAtWindow:
    """How far ``occurred_at`` may lie before and after the gateway's wall clock, in seconds."""

    max_age_s: int = DEFAULT_OCCURRED_AT_MAX_AGE_S
    max_ahead_s: int = DEFAULT_OCCURRED_AT_MAX_AHEAD_S


def _instant(ms: int) -> str:
    """``ms`` since the epoch as an ISO 8601 instant, or as a count where a date cannot be."""
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{ms // 1000} s since the epoch"


def _duration(seconds: int) -> str:
    """``seconds`` in the largest whole unit: "35 days", "1 hour", "90 seconds"."""
    count, unit = seconds, "second"
    for name, size in (("day", 86_400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count, unit = seconds // size, name
            break
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"


def check_occurred_at(
    seconds: int, nanos: int, now_ms: int, window: OccurredAtWindow
) -> FieldViolation | None:
    """The violation of a ``google.protobuf.Timestamp`` given as ``occurred_at`` when the
    gateway's wall clock reads ``now_ms``, or None. Pure: the caller reads the clock."""
    if not 0 <= nanos <= MAX_NANOS:
        return FieldViolation("occurred_at.nanos", f"must be 0 to {MAX_NANOS}, got {nanos}")
    ms = seconds * 1000 + nanos // 1_000_000
    earliest = max(0, now_ms - window.max_age_s * 1000)
    latest = min(MAX_OCCURRED_AT_MS, now_ms + window.max_ahead_s * 1000)
    if earliest <= ms <= latest:
        return None
    return FieldViolation(
        "occurred_at",
        f"must be at most {_duration(window.max_age_s)} before and {_duration(window.max_ahead_s)} "
        f"after the gateway's clock ({_instant(now_ms)}), got {_instant(ms)}",
    )


#: Subject-and-metric names, and session ids, already found valid: a stream repeats them in
#: every usage, and checking them again cost more than everything else validation does. A
#: valid name stays valid, so the only bound needed is on memory.
_VALID_NAMES: set[tuple[str, str, str, str]] = set()
_VALID_SESSIONS: set[str] = set()
_MEMO_SIZE = 100_000


def _remember(memo: set[Any], value: Any) -> None:
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo.add(value)


def validate_usage(usage: Usage, *, on_stream: bool) -> list[FieldViolation]:
    """Every violation of the contract in ``usage``; empty when it is valid.

    The metric is checked for syntax only; whether the catalog knows it is the policy's call.
    """
    out: list[FieldViolation] = []

    rid = usage.request_id
    if not rid:
        out.append(FieldViolation("request_id", "is required"))
    elif len(rid) > MAX_REQUEST_ID or not PRINTABLE_RE.fullmatch(rid):
        out.append(
            FieldViolation(
                "request_id",
                f"must be 1 to {MAX_REQUEST_ID} printable ASCII characters, got {_shorten(rid)!r}",
            )
        )
    subject = usage.subject
    names = (subject.tenant, subject.slice, subject.key, usage.metric)
    if names not in _VALID_NAMES:
        bad = [
            v
            for v in (
                check_tenant(subject.tenant),
                check_subject_part(subject.slice, "subject.slice"),
                check_subject_part(subject.key, "subject.key"),
                check_metric_name(usage.metric),
            )
            if v is not None
        ]
        if bad:
            out.extend(bad)
        else:
            _remember(_VALID_NAMES, names)
    if not 1 <= usage.amount <= MAX_AMOUNT:
        out.append(
            FieldViolation("amount", f"must be between 1 and {MAX_AMOUNT}, got {usage.amount}")
        )
    if usage.mode not in (Mode.ADMIT, Mode.REPORT):
        out.append(FieldViolation("mode", "must be MODE_ADMIT or MODE_REPORT"))
    if usage.labels:
        _check_labels(usage.labels, out)
    if usage.occurred_at_ms < 0:
        out.append(FieldViolation("occurred_at", "must not be before 1970-01-01"))
    session = usage.session_id
    if session:
        if not on_stream:
            out.append(FieldViolation("session_id", "is only for StreamUsage"))
        elif session not in _VALID_SESSIONS:
            if len(session) > MAX_SESSION_ID or not PRINTABLE_RE.fullmatch(session):
                out.append(
                    FieldViolation(
                        "session_id", f"must be 1 to {MAX_SESSION_ID} printable ASCII characters"
                    )
                )
            else:
                _remember(_VALID_SESSIONS, session)
        if usage.sequence > MAX_SEQUENCE:
            out.append(FieldViolation("sequence", f"must be at most {MAX_SEQUENCE}"))
    elif usage.sequence:
        out.append(FieldViolation("sequence", "needs a session_id"))
    return out


def _check_labels(labels: tuple[tuple[str, str], ...], out: list[FieldViolation]) -> None:
    if len(labels) > MAX_LABELS:
        out.append(FieldViolation("labels", f"at most {MAX_LABELS} labels, got {len(labels)}"))
        return
    for k, v in labels:
        if not k or len(k) > MAX_LABEL_KEY:
            out.append(FieldViolation("labels", f"keys must be 1 to {MAX_LABEL_KEY} characters"))
            return
        if len(v) > MAX_LABEL_VALUE:
            out.append(
                FieldViolation(
                    f"labels[{_shorten(k)}]", f"values must be at most {MAX_LABEL_VALUE} chars"
                )
            )
            return
