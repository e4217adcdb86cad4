"""Input bounds of the public contract, checked before anything touches the store.

Every rule names the field it guards so that a caller gets ``INVALID_ARGUMENT`` with the field
and the reason. The bounds also keep Redis keys short and amounts exact in Lua, whose numbers
are doubles (integers are exact up to 2**53).
"""

from __future__ import annotations

import re

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


def validate_usage(usage: Usage, *, on_stream: bool) -> list[FieldViolation]:
    """Every violation of the contract in ``usage``; empty when it is valid.

    The metric is checked for syntax only; whether the catalog knows it is the policy's call.
    """
    out: list[FieldViolation] = []

    def add(v: FieldViolation | None) -> None:
        if v is not None:
            out.append(v)

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
    add(check_tenant(usage.subject.tenant))
    add(check_subject_part(usage.subject.slice, "subject.slice"))
    add(check_subject_part(usage.subject.key, "subject.key"))
    add(check_metric_name(usage.metric))
    if not 1 <= usage.amount <= MAX_AMOUNT:
        out.append(
            FieldViolation("amount", f"must be between 1 and {MAX_AMOUNT}, got {usage.amount}")
        )
    if usage.mode not in (Mode.ADMIT, Mode.REPORT):
        out.append(FieldViolation("mode", "must be MODE_ADMIT or MODE_REPORT"))
    if len(usage.labels) > MAX_LABELS:
        out.append(
            FieldViolation("labels", f"at most {MAX_LABELS} labels, got {len(usage.labels)}")
        )
    else:
        for k, v in usage.labels:
            if not k or len(k) > MAX_LABEL_KEY:
                out.append(
                    FieldViolation("labels", f"keys must be 1 to {MAX_LABEL_KEY} characters")
                )
                break
            if len(v) > MAX_LABEL_VALUE:
                out.append(
                    FieldViolation(
                        f"labels[{_shorten(k)}]", f"values must be at most {MAX_LABEL_VALUE} chars"
                    )
                )
                break
    if usage.occurred_at_ms < 0:
        out.append(FieldViolation("occurred_at", "must not be before 1970-01-01"))
    if usage.session_id:
        if not on_stream:
            out.append(FieldViolation("session_id", "is only for StreamUsage"))
        elif len(usage.session_id) > MAX_SESSION_ID or not PRINTABLE_RE.fullmatch(usage.session_id):
            out.append(
                FieldViolation(
                    "session_id", f"must be 1 to {MAX_SESSION_ID} printable ASCII characters"
                )
            )
        if usage.sequence > MAX_SEQUENCE:
            out.append(FieldViolation("sequence", f"must be at most {MAX_SEQUENCE}"))
    elif usage.sequence:
        out.append(FieldViolation("sequence", "needs a session_id"))
    return out
