import datetime

from chargepath_protos.v1 import metering_pb2 as _metering_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FailureMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_MODE_UNSPECIFIED: _ClassVar[FailureMode]
    FAILURE_MODE_DENY: _ClassVar[FailureMode]
    FAILURE_MODE_ALLOW: _ClassVar[FailureMode]
FAILURE_MODE_UNSPECIFIED: FailureMode
FAILURE_MODE_DENY: FailureMode
FAILURE_MODE_ALLOW: FailureMode

class ApplyPolicyRequest(_message.Message):
    __slots__ = ("document", "dry_run", "prune", "expected_version")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    PRUNE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    document: str
    dry_run: bool
    prune: bool
    expected_version: int
    def __init__(self, document: _Optional[str] = ..., dry_run: _Optional[bool] = ..., prune: _Optional[bool] = ..., expected_version: _Optional[int] = ...) -> None: ...

class ApplyPolicyResponse(_message.Message):
    __slots__ = ("policy_version", "changed", "diff", "removed_plans", "removed_tenants")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    REMOVED_PLANS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_TENANTS_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    changed: bool
    diff: _containers.RepeatedScalarFieldContainer[str]
    removed_plans: _containers.RepeatedScalarFieldContainer[str]
    removed_tenants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, policy_version: _Optional[int] = ..., changed: _Optional[bool] = ..., diff: _Optional[_Iterable[str]] = ..., removed_plans: _Optional[_Iterable[str]] = ..., removed_tenants: _Optional[_Iterable[str]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("policy_version", "document")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    document: str
    def __init__(self, policy_version: _Optional[int] = ..., document: _Optional[str] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("name", "description", "limits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    limits: _containers.RepeatedCompositeFieldContainer[Limit]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[Limit, _Mapping]]] = ...) -> None: ...

class Limit(_message.Message):
    __slots__ = ("name", "metric", "scope", "rate", "quota", "soft", "lease")
    NAME_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    SOFT_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    name: str
    metric: str
    scope: _metering_pb2.Scope
    rate: RateLimit
    quota: QuotaLimit
    soft: bool
    lease: LeaseSettings
    def __init__(self, name: _Optional[str] = ..., metric: _Optional[str] = ..., scope: _Optional[_Union[_metering_pb2.Scope, str]] = ..., rate: _Optional[_Union[RateLimit, _Mapping]] = ..., quota: _Optional[_Union[QuotaLimit, _Mapping]] = ..., soft: _Optional[bool] = ..., lease: _Optional[_Union[LeaseSettings, _Mapping]] = ...) -> None: ...

class LeaseSettings(_message.Message):
    __slots__ = ("max_units", "max_share_pct", "validity", "renew_below_pct", "gateway")
    MAX_UNITS_FIELD_NUMBER: _ClassVar[int]
    MAX_SHARE_PCT_FIELD_NUMBER: _ClassVar[int]
    VALIDITY_FIELD_NUMBER: _ClassVar[int]
    RENEW_BELOW_PCT_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    max_units: int
    max_share_pct: int
    validity: _duration_pb2.Duration
    renew_below_pct: int
    gateway: bool
    def __init__(self, max_units: _Optional[int] = ..., max_share_pct: _Optional[int] = ..., validity: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., renew_below_pct: _Optional[int] = ..., gateway: _Optional[bool] = ...) -> None: ...

class RateLimit(_message.Message):
    __slots__ = ("capacity", "refill", "per")
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    REFILL_FIELD_NUMBER: _ClassVar[int]
    PER_FIELD_NUMBER: _ClassVar[int]
    capacity: int
    refill: int
    per: str
    def __init__(self, capacity: _Optional[int] = ..., refill: _Optional[int] = ..., per: _Optional[str] = ...) -> None: ...

class QuotaLimit(_message.Message):
    __slots__ = ("amount", "per")
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    PER_FIELD_NUMBER: _ClassVar[int]
    amount: int
    per: str
    def __init__(self, amount: _Optional[int] = ..., per: _Optional[str] = ...) -> None: ...

class PutPlanRequest(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class PutPlanResponse(_message.Message):
    __slots__ = ("policy_version",)
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    def __init__(self, policy_version: _Optional[int] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetPlanResponse(_message.Message):
    __slots__ = ("plan", "policy_version")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    policy_version: int
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ..., policy_version: _Optional[int] = ...) -> None: ...

class ListPlansRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPlansResponse(_message.Message):
    __slots__ = ("plans", "policy_version")
    PLANS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    plans: _containers.RepeatedCompositeFieldContainer[Plan]
    policy_version: int
    def __init__(self, plans: _Optional[_Iterable[_Union[Plan, _Mapping]]] = ..., policy_version: _Optional[int] = ...) -> None: ...

class DeletePlanRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeletePlanResponse(_message.Message):
    __slots__ = ("policy_version",)
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    def __init__(self, policy_version: _Optional[int] = ...) -> None: ...

class AssignPlanRequest(_message.Message):
    __slots__ = ("tenant", "slice", "plan")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    slice: str
    plan: str
    def __init__(self, tenant: _Optional[str] = ..., slice: _Optional[str] = ..., plan: _Optional[str] = ...) -> None: ...

class AssignPlanResponse(_message.Message):
    __slots__ = ("policy_version",)
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    def __init__(self, policy_version: _Optional[int] = ...) -> None: ...

class GrantRequest(_message.Message):
    __slots__ = ("subject", "limit", "amount", "expires_at", "note")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    subject: _metering_pb2.Subject
    limit: str
    amount: int
    expires_at: _timestamp_pb2.Timestamp
    note: str
    def __init__(self, subject: _Optional[_Union[_metering_pb2.Subject, _Mapping]] = ..., limit: _Optional[str] = ..., amount: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., note: _Optional[str] = ...) -> None: ...

class GrantResponse(_message.Message):
    __slots__ = ("grant_id", "capacity", "remaining")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    capacity: int
    remaining: int
    def __init__(self, grant_id: _Optional[str] = ..., capacity: _Optional[int] = ..., remaining: _Optional[int] = ...) -> None: ...

class SuspendRequest(_message.Message):
    __slots__ = ("subject", "reason")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    subject: _metering_pb2.Subject
    reason: str
    def __init__(self, subject: _Optional[_Union[_metering_pb2.Subject, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class SuspendResponse(_message.Message):
    __slots__ = ("policy_version",)
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    def __init__(self, policy_version: _Optional[int] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("subject",)
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    subject: _metering_pb2.Subject
    def __init__(self, subject: _Optional[_Union[_metering_pb2.Subject, _Mapping]] = ...) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("policy_version",)
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    def __init__(self, policy_version: _Optional[int] = ...) -> None: ...

class SetFailurePolicyRequest(_message.Message):
    __slots__ = ("tenant", "mode")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    mode: FailureMode
    def __init__(self, tenant: _Optional[str] = ..., mode: _Optional[_Union[FailureMode, str]] = ...) -> None: ...

class SetFailurePolicyResponse(_message.Message):
    __slots__ = ("policy_version",)
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    def __init__(self, policy_version: _Optional[int] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("subject", "recent")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    subject: _metering_pb2.Subject
    recent: int
    def __init__(self, subject: _Optional[_Union[_metering_pb2.Subject, _Mapping]] = ..., recent: _Optional[int] = ...) -> None: ...

class LimitState(_message.Message):
    __slots__ = ("name", "kind", "scope", "metric", "plan", "remaining", "capacity", "refill", "per", "used", "granted", "reset_after", "soft")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    REFILL_FIELD_NUMBER: _ClassVar[int]
    PER_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    RESET_AFTER_FIELD_NUMBER: _ClassVar[int]
    SOFT_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: _metering_pb2.LimitKind
    scope: _metering_pb2.Scope
    metric: str
    plan: str
    remaining: int
    capacity: int
    refill: int
    per: str
    used: int
    granted: int
    reset_after: _duration_pb2.Duration
    soft: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[_metering_pb2.LimitKind, str]] = ..., scope: _Optional[_Union[_metering_pb2.Scope, str]] = ..., metric: _Optional[str] = ..., plan: _Optional[str] = ..., remaining: _Optional[int] = ..., capacity: _Optional[int] = ..., refill: _Optional[int] = ..., per: _Optional[str] = ..., used: _Optional[int] = ..., granted: _Optional[int] = ..., reset_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., soft: _Optional[bool] = ...) -> None: ...

class GrantState(_message.Message):
    __slots__ = ("grant_id", "limit", "amount", "expires_at", "note")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    limit: str
    amount: int
    expires_at: _timestamp_pb2.Timestamp
    note: str
    def __init__(self, grant_id: _Optional[str] = ..., limit: _Optional[str] = ..., amount: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., note: _Optional[str] = ...) -> None: ...

class DecisionRecord(_message.Message):
    __slots__ = ("decision_id", "request_id", "subject", "metric", "amount", "mode", "decision", "reason", "policy_version", "decided_at", "trace_id", "retry_after", "limits")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    request_id: str
    subject: _metering_pb2.Subject
    metric: str
    amount: int
    mode: _metering_pb2.Mode
    decision: _metering_pb2.Decision
    reason: _metering_pb2.Reason
    policy_version: int
    decided_at: _timestamp_pb2.Timestamp
    trace_id: str
    retry_after: _duration_pb2.Duration
    limits: _containers.RepeatedCompositeFieldContainer[LimitChange]
    def __init__(self, decision_id: _Optional[str] = ..., request_id: _Optional[str] = ..., subject: _Optional[_Union[_metering_pb2.Subject, _Mapping]] = ..., metric: _Optional[str] = ..., amount: _Optional[int] = ..., mode: _Optional[_Union[_metering_pb2.Mode, str]] = ..., decision: _Optional[_Union[_metering_pb2.Decision, str]] = ..., reason: _Optional[_Union[_metering_pb2.Reason, str]] = ..., policy_version: _Optional[int] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trace_id: _Optional[str] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., limits: _Optional[_Iterable[_Union[LimitChange, _Mapping]]] = ...) -> None: ...

class LimitChange(_message.Message):
    __slots__ = ("name", "kind", "remaining_before", "remaining_after", "capacity", "exceeded")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REMAINING_BEFORE_FIELD_NUMBER: _ClassVar[int]
    REMAINING_AFTER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: _metering_pb2.LimitKind
    remaining_before: int
    remaining_after: int
    capacity: int
    exceeded: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[_metering_pb2.LimitKind, str]] = ..., remaining_before: _Optional[int] = ..., remaining_after: _Optional[int] = ..., capacity: _Optional[int] = ..., exceeded: _Optional[bool] = ...) -> None: ...

class Suspension(_message.Message):
    __slots__ = ("subject", "reason")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    subject: _metering_pb2.Subject
    reason: str
    def __init__(self, subject: _Optional[_Union[_metering_pb2.Subject, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class GetStateResponse(_message.Message):
    __slots__ = ("policy_version", "plan", "slice_plan", "limits", "grants", "suspensions", "failure_mode", "recent", "read_at", "leases")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SLICE_PLAN_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    SUSPENSIONS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_MODE_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    READ_AT_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    plan: str
    slice_plan: str
    limits: _containers.RepeatedCompositeFieldContainer[LimitState]
    grants: _containers.RepeatedCompositeFieldContainer[GrantState]
    suspensions: _containers.RepeatedCompositeFieldContainer[Suspension]
    failure_mode: FailureMode
    recent: _containers.RepeatedCompositeFieldContainer[DecisionRecord]
    read_at: _timestamp_pb2.Timestamp
    leases: _containers.RepeatedCompositeFieldContainer[LeaseState]
    def __init__(self, policy_version: _Optional[int] = ..., plan: _Optional[str] = ..., slice_plan: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[LimitState, _Mapping]]] = ..., grants: _Optional[_Iterable[_Union[GrantState, _Mapping]]] = ..., suspensions: _Optional[_Iterable[_Union[Suspension, _Mapping]]] = ..., failure_mode: _Optional[_Union[FailureMode, str]] = ..., recent: _Optional[_Iterable[_Union[DecisionRecord, _Mapping]]] = ..., read_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., leases: _Optional[_Iterable[_Union[LeaseState, _Mapping]]] = ...) -> None: ...

class LeaseState(_message.Message):
    __slots__ = ("lease_id", "metric", "holder", "granted", "used", "available", "expires_in", "expires_at", "policy_version", "holds")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    metric: str
    holder: str
    granted: int
    used: int
    available: int
    expires_in: _duration_pb2.Duration
    expires_at: _timestamp_pb2.Timestamp
    policy_version: int
    holds: _containers.RepeatedCompositeFieldContainer[LeaseHold]
    def __init__(self, lease_id: _Optional[str] = ..., metric: _Optional[str] = ..., holder: _Optional[str] = ..., granted: _Optional[int] = ..., used: _Optional[int] = ..., available: _Optional[int] = ..., expires_in: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., policy_version: _Optional[int] = ..., holds: _Optional[_Iterable[_Union[LeaseHold, _Mapping]]] = ...) -> None: ...

class LeaseHold(_message.Message):
    __slots__ = ("limit", "units")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    limit: str
    units: int
    def __init__(self, limit: _Optional[str] = ..., units: _Optional[int] = ...) -> None: ...

class LeaseDecision(_message.Message):
    __slots__ = ("decision_id", "request_id", "subject", "metric", "lease_id", "holder", "decision", "reason", "requested", "used", "granted", "recorded", "overage", "refunded", "policy_version", "decided_at", "trace_id")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    request_id: str
    subject: _metering_pb2.Subject
    metric: str
    lease_id: str
    holder: str
    decision: _metering_pb2.Decision
    reason: _metering_pb2.Reason
    requested: int
    used: int
    granted: int
    recorded: int
    overage: int
    refunded: int
    policy_version: int
    decided_at: _timestamp_pb2.Timestamp
    trace_id: str
    def __init__(self, decision_id: _Optional[str] = ..., request_id: _Optional[str] = ..., subject: _Optional[_Union[_metering_pb2.Subject, _Mapping]] = ..., metric: _Optional[str] = ..., lease_id: _Optional[str] = ..., holder: _Optional[str] = ..., decision: _Optional[_Union[_metering_pb2.Decision, str]] = ..., reason: _Optional[_Union[_metering_pb2.Reason, str]] = ..., requested: _Optional[int] = ..., used: _Optional[int] = ..., granted: _Optional[int] = ..., recorded: _Optional[int] = ..., overage: _Optional[int] = ..., refunded: _Optional[int] = ..., policy_version: _Optional[int] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trace_id: _Optional[str] = ...) -> None: ...

class ExplainDecisionRequest(_message.Message):
    __slots__ = ("tenant", "decision_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    decision_id: str
    def __init__(self, tenant: _Optional[str] = ..., decision_id: _Optional[str] = ...) -> None: ...

class ExplainDecisionResponse(_message.Message):
    __slots__ = ("decision", "lease")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    decision: DecisionRecord
    lease: LeaseDecision
    def __init__(self, decision: _Optional[_Union[DecisionRecord, _Mapping]] = ..., lease: _Optional[_Union[LeaseDecision, _Mapping]] = ...) -> None: ...

class WatchDecisionsRequest(_message.Message):
    __slots__ = ("tenant", "decisions", "reasons")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    decisions: _containers.RepeatedScalarFieldContainer[_metering_pb2.Decision]
    reasons: _containers.RepeatedScalarFieldContainer[_metering_pb2.Reason]
    def __init__(self, tenant: _Optional[str] = ..., decisions: _Optional[_Iterable[_Union[_metering_pb2.Decision, str]]] = ..., reasons: _Optional[_Iterable[_Union[_metering_pb2.Reason, str]]] = ...) -> None: ...

class ThresholdEvent(_message.Message):
    __slots__ = ("subject", "limit", "percent", "used", "capacity", "at")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    subject: _metering_pb2.Subject
    limit: str
    percent: int
    used: int
    capacity: int
    at: _timestamp_pb2.Timestamp
    def __init__(self, subject: _Optional[_Union[_metering_pb2.Subject, _Mapping]] = ..., limit: _Optional[str] = ..., percent: _Optional[int] = ..., used: _Optional[int] = ..., capacity: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchDecisionsResponse(_message.Message):
    __slots__ = ("decision", "threshold")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    decision: DecisionRecord
    threshold: ThresholdEvent
    def __init__(self, decision: _Optional[_Union[DecisionRecord, _Mapping]] = ..., threshold: _Optional[_Union[ThresholdEvent, _Mapping]] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("tenant", "since", "after", "limit")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    since: _timestamp_pb2.Timestamp
    after: str
    limit: int
    def __init__(self, tenant: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., after: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events", "next_cursor")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    next_cursor: str
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., next_cursor: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("event_id", "at", "identity", "role", "method", "summary", "tenants", "policy_version_before", "policy_version_after", "outcome", "detail")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_BEFORE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_AFTER_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    at: _timestamp_pb2.Timestamp
    identity: str
    role: str
    method: str
    summary: str
    tenants: _containers.RepeatedScalarFieldContainer[str]
    policy_version_before: int
    policy_version_after: int
    outcome: str
    detail: str
    def __init__(self, event_id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., identity: _Optional[str] = ..., role: _Optional[str] = ..., method: _Optional[str] = ..., summary: _Optional[str] = ..., tenants: _Optional[_Iterable[str]] = ..., policy_version_before: _Optional[int] = ..., policy_version_after: _Optional[int] = ..., outcome: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...
