import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_ADMIT: _ClassVar[Mode]
    MODE_REPORT: _ClassVar[Mode]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ALLOW: _ClassVar[Decision]
    DECISION_THROTTLE: _ClassVar[Decision]
    DECISION_DENY: _ClassVar[Decision]

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    REASON_OK: _ClassVar[Reason]
    REASON_RATE_LIMITED: _ClassVar[Reason]
    REASON_QUOTA_EXHAUSTED: _ClassVar[Reason]
    REASON_NO_ENTITLEMENT: _ClassVar[Reason]
    REASON_AMOUNT_EXCEEDS_CAPACITY: _ClassVar[Reason]
    REASON_STORE_UNAVAILABLE: _ClassVar[Reason]
    REASON_INVALID_USAGE: _ClassVar[Reason]
    REASON_SUSPENDED: _ClassVar[Reason]
    REASON_SOFT_LIMIT_EXCEEDED: _ClassVar[Reason]
    REASON_PERMISSION_DENIED: _ClassVar[Reason]
    REASON_CAP_REACHED: _ClassVar[Reason]
    REASON_LEASE_EXPIRED: _ClassVar[Reason]

class LimitKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIMIT_KIND_UNSPECIFIED: _ClassVar[LimitKind]
    LIMIT_KIND_RATE: _ClassVar[LimitKind]
    LIMIT_KIND_QUOTA: _ClassVar[LimitKind]

class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_UNSPECIFIED: _ClassVar[Scope]
    SCOPE_TENANT: _ClassVar[Scope]
    SCOPE_SLICE: _ClassVar[Scope]
    SCOPE_KEY: _ClassVar[Scope]

class VerdictView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_VIEW_UNSPECIFIED: _ClassVar[VerdictView]
    VERDICT_VIEW_FULL: _ClassVar[VerdictView]
    VERDICT_VIEW_BASIC: _ClassVar[VerdictView]
MODE_UNSPECIFIED: Mode
MODE_ADMIT: Mode
MODE_REPORT: Mode
DECISION_UNSPECIFIED: Decision
DECISION_ALLOW: Decision
DECISION_THROTTLE: Decision
DECISION_DENY: Decision
REASON_UNSPECIFIED: Reason
REASON_OK: Reason
REASON_RATE_LIMITED: Reason
REASON_QUOTA_EXHAUSTED: Reason
REASON_NO_ENTITLEMENT: Reason
REASON_AMOUNT_EXCEEDS_CAPACITY: Reason
REASON_STORE_UNAVAILABLE: Reason
REASON_INVALID_USAGE: Reason
REASON_SUSPENDED: Reason
REASON_SOFT_LIMIT_EXCEEDED: Reason
REASON_PERMISSION_DENIED: Reason
REASON_CAP_REACHED: Reason
REASON_LEASE_EXPIRED: Reason
LIMIT_KIND_UNSPECIFIED: LimitKind
LIMIT_KIND_RATE: LimitKind
LIMIT_KIND_QUOTA: LimitKind
SCOPE_UNSPECIFIED: Scope
SCOPE_TENANT: Scope
SCOPE_SLICE: Scope
SCOPE_KEY: Scope
VERDICT_VIEW_UNSPECIFIED: VerdictView
VERDICT_VIEW_FULL: VerdictView
VERDICT_VIEW_BASIC: VerdictView

class Subject(_message.Message):
    __slots__ = ("tenant", "slice", "key")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    slice: str
    key: str
    def __init__(self, tenant: _Optional[str] = ..., slice: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("request_id", "subject", "metric", "amount", "mode", "labels", "occurred_at", "session_id", "sequence")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    subject: Subject
    metric: str
    amount: int
    mode: Mode
    labels: _containers.ScalarMap[str, str]
    occurred_at: _timestamp_pb2.Timestamp
    session_id: str
    sequence: int
    def __init__(self, request_id: _Optional[str] = ..., subject: _Optional[_Union[Subject, _Mapping]] = ..., metric: _Optional[str] = ..., amount: _Optional[int] = ..., mode: _Optional[_Union[Mode, str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., session_id: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class LimitStatus(_message.Message):
    __slots__ = ("name", "kind", "scope", "remaining", "capacity", "reset_after", "soft", "exceeded")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    RESET_AFTER_FIELD_NUMBER: _ClassVar[int]
    SOFT_FIELD_NUMBER: _ClassVar[int]
    EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: LimitKind
    scope: Scope
    remaining: int
    capacity: int
    reset_after: _duration_pb2.Duration
    soft: bool
    exceeded: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[LimitKind, str]] = ..., scope: _Optional[_Union[Scope, str]] = ..., remaining: _Optional[int] = ..., capacity: _Optional[int] = ..., reset_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., soft: _Optional[bool] = ..., exceeded: _Optional[bool] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("request_id", "decision", "reason", "retry_after", "limits", "policy_version", "decision_id", "recorded", "degraded", "replayed", "trace_id", "message", "decided_at", "violations", "spooled", "leased")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    SPOOLED_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    decision: Decision
    reason: Reason
    retry_after: _duration_pb2.Duration
    limits: _containers.RepeatedCompositeFieldContainer[LimitStatus]
    policy_version: int
    decision_id: str
    recorded: bool
    degraded: bool
    replayed: bool
    trace_id: str
    message: str
    decided_at: _timestamp_pb2.Timestamp
    violations: _containers.RepeatedCompositeFieldContainer[FieldViolation]
    spooled: bool
    leased: bool
    def __init__(self, request_id: _Optional[str] = ..., decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[Reason, str]] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., limits: _Optional[_Iterable[_Union[LimitStatus, _Mapping]]] = ..., policy_version: _Optional[int] = ..., decision_id: _Optional[str] = ..., recorded: _Optional[bool] = ..., degraded: _Optional[bool] = ..., replayed: _Optional[bool] = ..., trace_id: _Optional[str] = ..., message: _Optional[str] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., violations: _Optional[_Iterable[_Union[FieldViolation, _Mapping]]] = ..., spooled: _Optional[bool] = ..., leased: _Optional[bool] = ...) -> None: ...

class FieldViolation(_message.Message):
    __slots__ = ("field", "description")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    field: str
    description: str
    def __init__(self, field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("usage", "view")
    USAGE_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    usage: Usage
    view: VerdictView
    def __init__(self, usage: _Optional[_Union[Usage, _Mapping]] = ..., view: _Optional[_Union[VerdictView, str]] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("verdict",)
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    def __init__(self, verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class StreamUsageRequest(_message.Message):
    __slots__ = ("usages", "view")
    USAGES_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    usages: _containers.RepeatedCompositeFieldContainer[Usage]
    view: VerdictView
    def __init__(self, usages: _Optional[_Iterable[_Union[Usage, _Mapping]]] = ..., view: _Optional[_Union[VerdictView, str]] = ...) -> None: ...

class StreamUsageResponse(_message.Message):
    __slots__ = ("verdicts",)
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    verdicts: _containers.RepeatedCompositeFieldContainer[Verdict]
    def __init__(self, verdicts: _Optional[_Iterable[_Union[Verdict, _Mapping]]] = ...) -> None: ...
