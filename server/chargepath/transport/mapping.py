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
from chargepath.v1 import metering_pb2 as pb

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
        request_id=m.request_id,
        subject=Subject(s.tenant, s.slice, s.key),
        metric=m.metric,
        amount=m.amount,
        mode=MODES.get(m.mode, Mode.UNSPECIFIED),
        labels=tuple(m.labels.items()) if m.labels else (),
        occurred_at_ms=occurred,
        session_id=m.session_id,
        sequence=m.sequence,
    )


def duration(ms: int) -> dict[str, int]:
    """A ``google.protobuf.Duration`` of ``ms`` (at least 0) as a dict: message constructors
    build it in C, with no Python message object to copy."""
    ms = max(0, ms)
    return {"seconds": ms // 1000, "nanos": (ms % 1000) * 1_000_000}


def timestamp(ms: int) -> dict[str, int]:
    """A ``google.protobuf.Timestamp`` of ``ms`` since the Unix epoch, as a dict."""
    return {"seconds": ms // 1000, "nanos": (ms % 1000) * 1_000_000}


def _limit_to_pb(lim: LimitState) -> pb.LimitStatus:
    ms = lim.reset_after_ms
    return pb.LimitStatus(
        name=lim.name,
        kind=KINDS[lim.kind],
        scope=SCOPES[lim.scope],
        remaining=lim.remaining,
        capacity=lim.capacity,
        reset_after=duration(ms) if ms > 0 else None,
        soft=lim.soft,
        exceeded=lim.exceeded,
    )


def verdict_to_pb(v: Verdict) -> pb.Verdict:
    retry, at = v.retry_after_ms, v.decided_at_ms
    return pb.Verdict(
        request_id=v.request_id,
        decision=DECISIONS[v.decision],
        reason=REASONS[v.reason],
        retry_after=duration(retry) if retry else None,
        limits=[_limit_to_pb(lim) for lim in v.limits],
        policy_version=v.policy_version,
        decision_id=v.decision_id,
        recorded=v.recorded,
        degraded=v.degraded,
        replayed=v.replayed,
        trace_id=v.trace_id,
        message=v.message,
        decided_at=timestamp(at) if at else None,
    )
