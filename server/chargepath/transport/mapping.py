"""The one place where protobuf messages become core types and back."""

from __future__ import annotations

from chargepath.core.model import (
    Decision,
    LimitKind,
    LimitState,
    Mode,
    Reason,
    Scope,
    Subject,
    Usage,
    Verdict,
)
from chargepath_protos.v1 import metering_pb2 as pb

MODES = {pb.MODE_ADMIT: Mode.ADMIT, pb.MODE_REPORT: Mode.REPORT}
DECISIONS = {
    Decision.ALLOW: pb.DECISION_ALLOW,
    Decision.THROTTLE: pb.DECISION_THROTTLE,
    Decision.DENY: pb.DECISION_DENY,
}
REASONS = {
    Reason.OK: pb.REASON_OK,
    Reason.RATE_LIMITED: pb.REASON_RATE_LIMITED,
    Reason.QUOTA_EXHAUSTED: pb.REASON_QUOTA_EXHAUSTED,
    Reason.NO_ENTITLEMENT: pb.REASON_NO_ENTITLEMENT,
    Reason.AMOUNT_EXCEEDS_CAPACITY: pb.REASON_AMOUNT_EXCEEDS_CAPACITY,
    Reason.STORE_UNAVAILABLE: pb.REASON_STORE_UNAVAILABLE,
    Reason.INVALID_USAGE: pb.REASON_INVALID_USAGE,
    Reason.SUSPENDED: pb.REASON_SUSPENDED,
    Reason.SOFT_LIMIT_EXCEEDED: pb.REASON_SOFT_LIMIT_EXCEEDED,
}
KINDS = {LimitKind.RATE: pb.LIMIT_KIND_RATE, LimitKind.QUOTA: pb.LIMIT_KIND_QUOTA}
SCOPES = {Scope.TENANT: pb.SCOPE_TENANT, Scope.SLICE: pb.SCOPE_SLICE, Scope.KEY: pb.SCOPE_KEY}


def usage_from_pb(m: pb.Usage) -> Usage:
    """Map a wire usage; range and syntax checks are the core's (validate_usage)."""
    s = m.subject
    occurred = 0
    if m.HasField("occurred_at"):
        occurred = m.occurred_at.seconds * 1000 + m.occurred_at.nanos // 1_000_000
    return Usage(
        m.request_id,
        Subject(s.tenant, s.slice, s.key),
        m.metric,
        m.amount,
        MODES.get(m.mode, Mode.UNSPECIFIED),
        tuple(m.labels.items()) if m.labels else (),
        occurred,
        m.session_id,
        m.sequence,
    )


def duration(ms: int) -> dict[str, int]:
    """A ``google.protobuf.Duration`` of ``ms`` (at least 0) as a dict: message constructors
    build it in C, with no Python message object to copy."""
    ms = max(0, ms)
    return {"seconds": ms // 1000, "nanos": (ms % 1000) * 1_000_000}


def timestamp(ms: int) -> dict[str, int]:
    """A ``google.protobuf.Timestamp`` of ``ms`` since the Unix epoch, as a dict."""
    return {"seconds": ms // 1000, "nanos": (ms % 1000) * 1_000_000}


Fields = dict[str, object]


# The enums of the core have the numbers of the protobuf enums (tests/unit/test_mapping.py
# checks it), so the verdict's hot path passes them as they are; DECISIONS, REASONS, KINDS and
# SCOPES name the correspondence for everything else.


def _limit_fields(lim: LimitState) -> Fields:
    out: Fields = {
        "name": lim.name,
        "kind": lim.kind,
        "scope": lim.scope,
        "remaining": lim.remaining,
        "capacity": lim.capacity,
    }
    ms = lim.reset_after_ms
    if ms > 0:
        out["reset_after"] = duration(ms)
    if lim.soft:
        out["soft"] = True
    if lim.exceeded:
        out["exceeded"] = True
    return out


def verdict_fields(v: Verdict, view: int = pb.VERDICT_VIEW_FULL) -> Fields:
    """A ``chargepath.v1.Verdict`` as the dict its constructor takes. Response messages are
    built from these in one C call: building each verdict and limit as a Python message
    first, to be copied into the response, cost twice as much.

    ``view`` is the caller's ``VerdictView``: BASIC leaves out the limits of an ALLOW with
    reason OK; any other value (FULL, unspecified, or one this gateway does not know) gives
    the full verdict."""
    out: Fields = {
        "request_id": v.request_id,
        "decision": v.decision,
        "reason": v.reason,
        "policy_version": v.policy_version,
        "decision_id": v.decision_id,
    }
    if v.retry_after_ms:
        out["retry_after"] = duration(v.retry_after_ms)
    if v.limits and (view != pb.VERDICT_VIEW_BASIC or v.reason is not Reason.OK):
        out["limits"] = [_limit_fields(lim) for lim in v.limits]
    if v.recorded:
        out["recorded"] = True
    if v.degraded:
        out["degraded"] = True
    if v.replayed:
        out["replayed"] = True
    if v.trace_id:
        out["trace_id"] = v.trace_id
    if v.message:
        out["message"] = v.message
    if v.violations:
        out["violations"] = [{"field": fv.field, "description": fv.reason} for fv in v.violations]
    at = v.decided_at_ms
    if at:
        out["decided_at"] = timestamp(at)
    return out
