"""The one place where protobuf messages become core types and back."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

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

_MODES = {pb.MODE_ADMIT: Mode.ADMIT, pb.MODE_REPORT: Mode.REPORT}
_DECISIONS = {
    Decision.ALLOW: pb.DECISION_ALLOW,
    Decision.THROTTLE: pb.DECISION_THROTTLE,
    Decision.DENY: pb.DECISION_DENY,
}
_REASONS = {
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
_KINDS = {LimitKind.RATE: pb.LIMIT_KIND_RATE, LimitKind.QUOTA: pb.LIMIT_KIND_QUOTA}
_SCOPES = {Scope.TENANT: pb.SCOPE_TENANT, Scope.SLICE: pb.SCOPE_SLICE, Scope.KEY: pb.SCOPE_KEY}


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
        mode=_MODES.get(m.mode, Mode.UNSPECIFIED),
        labels=tuple(m.labels.items()) if m.labels else (),
        occurred_at_ms=occurred,
        session_id=m.session_id,
        sequence=m.sequence,
    )


def _duration(ms: int) -> Duration:
    return Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _limit_to_pb(lim: LimitState) -> pb.LimitStatus:
    return pb.LimitStatus(
        name=lim.name,
        kind=_KINDS[lim.kind],
        scope=_SCOPES[lim.scope],
        remaining=lim.remaining,
        capacity=lim.capacity,
        reset_after=_duration(max(0, lim.reset_after_ms)),
        soft=lim.soft,
        exceeded=lim.exceeded,
    )


def verdict_to_pb(v: Verdict) -> pb.Verdict:
    out = pb.Verdict(
        request_id=v.request_id,
        decision=_DECISIONS[v.decision],
        reason=_REASONS[v.reason],
        limits=[_limit_to_pb(lim) for lim in v.limits],
        policy_version=v.policy_version,
        decision_id=v.decision_id,
        recorded=v.recorded,
        degraded=v.degraded,
        replayed=v.replayed,
        trace_id=v.trace_id,
        message=v.message,
    )
    if v.retry_after_ms:
        out.retry_after.CopyFrom(_duration(v.retry_after_ms))
    if v.decided_at_ms:
        out.decided_at.CopyFrom(
            Timestamp(seconds=v.decided_at_ms // 1000, nanos=(v.decided_at_ms % 1000) * 1_000_000)
        )
    return out
