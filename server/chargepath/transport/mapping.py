"""The one place where protobuf messages become core types and back, for the metering and
the admin services alike; the servicers keep only their logic."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from chargepath.core.audit import AuditEvent
from chargepath.core.leases import LeaseAnswer, LeaseAsk, LeaseRecord, LeaseView
from chargepath.core.model import (
    Decision,
    DecisionRecord,
    FieldViolation,
    LimitKind,
    LimitState,
    Mode,
    Reason,
    Scope,
    Subject,
    ThresholdEvent,
    Usage,
    Verdict,
)
from chargepath.core.plans import PlanSpec, PolicyError, format_validity_ms
from chargepath.core.policy import Limit
from chargepath.store.base import GrantReading, LimitReading
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import lease_pb2 as lpb
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
    Reason.PERMISSION_DENIED: pb.REASON_PERMISSION_DENIED,
    Reason.CAP_REACHED: pb.REASON_CAP_REACHED,
    Reason.LEASE_EXPIRED: pb.REASON_LEASE_EXPIRED,
}
KINDS = {LimitKind.RATE: pb.LIMIT_KIND_RATE, LimitKind.QUOTA: pb.LIMIT_KIND_QUOTA}
SCOPES = {Scope.TENANT: pb.SCOPE_TENANT, Scope.SLICE: pb.SCOPE_SLICE, Scope.KEY: pb.SCOPE_KEY}
#: wire scopes and failure modes <-> their names in a policy document
SCOPE_NAMES = {pb.SCOPE_TENANT: "tenant", pb.SCOPE_SLICE: "slice", pb.SCOPE_KEY: "key"}
SCOPE_VALUES = {v: k for k, v in SCOPE_NAMES.items()}
FAILURE_MODES = {apb.FAILURE_MODE_DENY: "deny", apb.FAILURE_MODE_ALLOW: "allow"}
FAILURE_MODE_VALUES = {v: k for k, v in FAILURE_MODES.items()}


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
    if v.spooled:
        out["spooled"] = True
    if v.leased:
        out["leased"] = True
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


# -- leases -----------------------------------------------------------------------------


def lease_ask_from_pb(m: lpb.LeaseAsk) -> LeaseAsk:
    """Map a wire lease ask; its checks are the core's (leases.validate_ask)."""
    s = m.subject
    return LeaseAsk(
        request_id=m.request_id,
        subject=Subject(s.tenant, s.slice, s.key),
        metric=m.metric,
        lease_id=m.lease_id,
        requested=m.requested,
        used=m.used,
        release=m.release,
        labels=tuple(m.labels.items()) if m.labels else (),
        holder=m.holder,
    )


def lease_answer_fields(a: LeaseAnswer) -> Fields:
    """A ``chargepath.v1.LeaseAnswer`` as the dict its constructor takes."""
    out: Fields = {
        "request_id": a.request_id,
        "lease_id": a.lease_id,
        "decision": a.decision,
        "reason": a.reason,
        "granted": a.granted,
        "available": a.available,
        "renew_below": a.renew_below,
        "final_units": a.final_units,
        "recorded": a.recorded,
        "overage": a.overage,
        "refunded": a.refunded,
        "policy_version": a.policy_version,
        "replayed": a.replayed,
        "closed": a.closed,
        "decision_id": a.decision_id,
    }
    if a.valid_for_ms:
        out["valid_for"] = duration(a.valid_for_ms)
    if a.retry_after_ms:
        out["retry_after"] = duration(a.retry_after_ms)
    if a.limits:
        out["limits"] = [_limit_fields(lim) for lim in a.limits]
    if a.message:
        out["message"] = a.message
    if a.violations:
        out["violations"] = [{"field": fv.field, "description": fv.reason} for fv in a.violations]
    if a.decided_at_ms:
        out["decided_at"] = timestamp(a.decided_at_ms)
    return out


def lease_state_to_pb(v: LeaseView) -> apb.LeaseState:
    return apb.LeaseState(
        lease_id=v.lease_id,
        metric=v.metric,
        holder=v.holder,
        granted=v.granted,
        used=v.used,
        available=v.available,
        expires_in=duration(v.expires_in_ms),
        expires_at=timestamp(v.expires_at_ms),
        policy_version=v.policy_version,
        holds=[apb.LeaseHold(limit=h.limit, units=h.units) for h in v.holds],
    )


def lease_record_to_pb(r: LeaseRecord) -> apb.LeaseDecision:
    return apb.LeaseDecision(
        decision_id=r.decision_id,
        request_id=r.request_id,
        subject=subject_to_pb(r.subject),
        metric=r.metric,
        lease_id=r.lease_id,
        holder=r.holder,
        decision=DECISIONS[r.decision],
        reason=REASONS[r.reason],
        requested=r.requested,
        used=r.used,
        granted=r.granted,
        recorded=r.recorded,
        overage=r.overage,
        refunded=r.refunded,
        policy_version=r.policy_version,
        decided_at=timestamp(r.decided_at_ms),
        trace_id=r.trace_id,
    )


# -- admin ------------------------------------------------------------------------------


def subject_from_pb(m: pb.Subject) -> Subject:
    """Map a wire subject; its checks are the core's (validation.check_tenant, ...)."""
    return Subject(m.tenant, m.slice, m.key)


def subject_to_pb(s: Subject) -> pb.Subject:
    return pb.Subject(tenant=s.tenant, slice=s.slice, key=s.key)


def timestamp_ms(m: Timestamp) -> int:
    """Milliseconds since the Unix epoch of a ``google.protobuf.Timestamp``."""
    return int(m.ToMilliseconds())


def plan_from_pb(plan: apb.Plan) -> dict[str, Any]:
    """A wire plan as the mapping of a policy document's plan, to be validated by
    :func:`chargepath.core.policy_edit.put_plan` (unknown enum values become defaults that
    validation judges)."""
    limits = []
    for lim in plan.limits:
        d: dict[str, Any] = {
            "name": lim.name,
            "metric": lim.metric,
            "scope": SCOPE_NAMES.get(lim.scope, "tenant"),
            "soft": lim.soft,
        }
        if lim.HasField("rate"):
            d["rate"] = {
                "capacity": lim.rate.capacity,
                "refill": lim.rate.refill,
                "per": lim.rate.per or "second",
            }
        if lim.HasField("quota"):
            d["quota"] = {"amount": lim.quota.amount, "per": lim.quota.per}
        if lim.HasField("lease"):
            ls = lim.lease
            d["lease"] = {
                "max_units": ls.max_units,
                "max_share_pct": ls.max_share_pct,
                "validity": format_validity_ms(
                    ls.validity.seconds * 1000 + ls.validity.nanos // 1_000_000
                ),
                "renew_below_pct": ls.renew_below_pct,
                "gateway": ls.gateway,
            }
        limits.append(d)
    return {"name": plan.name, "description": plan.description, "limits": limits}


def plan_to_pb(plan: PlanSpec) -> apb.Plan:
    out = apb.Plan(name=plan.name, description=plan.description)
    for lim in plan.limits:
        m = out.limits.add(
            name=lim.name, metric=lim.metric, scope=SCOPE_VALUES[lim.scope], soft=lim.soft
        )
        if lim.rate is not None:
            m.rate.CopyFrom(
                apb.RateLimit(capacity=lim.rate.capacity, refill=lim.rate.refill, per=lim.rate.per)
            )
        if lim.quota is not None:
            m.quota.CopyFrom(apb.QuotaLimit(amount=lim.quota.amount, per=lim.quota.per))
        if lim.lease is not None:
            m.lease.CopyFrom(
                apb.LeaseSettings(
                    max_units=lim.lease.max_units,
                    max_share_pct=lim.lease.max_share_pct,
                    validity=duration(lim.lease.validity_ms),
                    renew_below_pct=lim.lease.renew_below_pct,
                    gateway=lim.lease.gateway,
                )
            )
    return out


def record_to_pb(r: DecisionRecord) -> apb.DecisionRecord:
    out = apb.DecisionRecord(
        decision_id=r.decision_id,
        request_id=r.request_id,
        subject=subject_to_pb(r.subject),
        metric=r.metric,
        amount=r.amount,
        mode=pb.MODE_REPORT if r.mode == Mode.REPORT else pb.MODE_ADMIT,
        decision=DECISIONS[r.decision],
        reason=REASONS[r.reason],
        policy_version=r.policy_version,
        decided_at=timestamp(r.decided_at_ms),
        trace_id=r.trace_id,
        retry_after=duration(r.retry_after_ms),
    )
    for c in r.limits:
        out.limits.add(
            name=c.name,
            kind=KINDS[c.kind],
            remaining_before=c.remaining_before,
            remaining_after=c.remaining_after,
            capacity=c.capacity,
            exceeded=c.exceeded,
        )
    return out


def threshold_to_pb(e: ThresholdEvent) -> apb.ThresholdEvent:
    return apb.ThresholdEvent(
        subject=subject_to_pb(e.subject),
        limit=e.limit,
        percent=e.percent,
        used=e.used,
        capacity=e.capacity,
        at=timestamp(e.at_ms),
    )


def limit_state_to_pb(plan: str, metric: str, lim: Limit, r: LimitReading) -> apb.LimitState:
    """The live state of ``lim`` (from ``plan``, counting ``metric``) read as ``r``."""
    return apb.LimitState(
        name=lim.name,
        kind=KINDS[lim.kind],
        scope=SCOPES[lim.scope],
        metric=metric,
        plan=plan,
        remaining=r.remaining,
        capacity=r.capacity,
        refill=lim.refill,
        per=lim.per,
        used=r.used,
        granted=r.granted,
        reset_after=duration(r.reset_after_ms),
        soft=lim.soft,
    )


def grant_to_pb(g: GrantReading) -> apb.GrantState:
    out = apb.GrantState(grant_id=g.grant_id, limit=g.limit, amount=g.amount, note=g.note)
    if g.expires_at_ms:
        out.expires_at.FromMilliseconds(g.expires_at_ms)
    return out


def suspension_to_pb(subject: Subject, reason: str) -> apb.Suspension:
    return apb.Suspension(subject=subject_to_pb(subject), reason=reason)


def policy_violations(err: PolicyError, field: str = "document") -> list[FieldViolation]:
    """The issues of a refused policy document as field violations of the request's
    ``field``: ``document.<path>`` (``document`` for the document as a whole, or text that
    is not a document), described as ``line N: message`` when the line is known."""
    out = []
    for issue in err.issues:
        where = f"line {issue.line}: " if issue.line else ""
        name = f"{field}.{issue.path}" if issue.path else field
        out.append(FieldViolation(name, where + issue.message))
    return out


def audit_event_to_pb(e: AuditEvent) -> apb.AuditEvent:
    return apb.AuditEvent(
        event_id=e.event_id,
        at=timestamp(e.at_ms),
        identity=e.identity,
        role=e.role,
        method=e.method,
        summary=e.summary,
        tenants=list(e.tenants),
        policy_version_before=e.policy_version_before,
        policy_version_after=e.policy_version_after,
        outcome=e.outcome,
        detail=e.detail,
    )
