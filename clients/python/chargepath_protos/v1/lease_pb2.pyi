import datetime

from chargepath_protos.v1 import metering_pb2 as _metering_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LeaseRequest(_message.Message):
    __slots__ = ("ask",)
    ASK_FIELD_NUMBER: _ClassVar[int]
    ask: LeaseAsk
    def __init__(self, ask: _Optional[_Union[LeaseAsk, _Mapping]] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("answer",)
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    answer: LeaseAnswer
    def __init__(self, answer: _Optional[_Union[LeaseAnswer, _Mapping]] = ...) -> None: ...

class LeaseStreamRequest(_message.Message):
    __slots__ = ("asks",)
    ASKS_FIELD_NUMBER: _ClassVar[int]
    asks: _containers.RepeatedCompositeFieldContainer[LeaseAsk]
    def __init__(self, asks: _Optional[_Iterable[_Union[LeaseAsk, _Mapping]]] = ...) -> None: ...

class LeaseStreamResponse(_message.Message):
    __slots__ = ("answers",)
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[LeaseAnswer]
    def __init__(self, answers: _Optional[_Iterable[_Union[LeaseAnswer, _Mapping]]] = ...) -> None: ...

class LeaseAsk(_message.Message):
    __slots__ = ("request_id", "subject", "metric", "lease_id", "requested", "used", "release", "labels", "holder")
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
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    subject: _metering_pb2.Subject
    metric: str
    lease_id: str
    requested: int
    used: int
    release: bool
    labels: _containers.ScalarMap[str, str]
    holder: str
    def __init__(self, request_id: _Optional[str] = ..., subject: _Optional[_Union[_metering_pb2.Subject, _Mapping]] = ..., metric: _Optional[str] = ..., lease_id: _Optional[str] = ..., requested: _Optional[int] = ..., used: _Optional[int] = ..., release: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ..., holder: _Optional[str] = ...) -> None: ...

class LeaseAnswer(_message.Message):
    __slots__ = ("request_id", "lease_id", "decision", "reason", "granted", "available", "valid_for", "renew_below", "final_units", "retry_after", "recorded", "overage", "refunded", "limits", "policy_version", "replayed", "message", "violations", "decided_at", "closed", "decision_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    VALID_FOR_FIELD_NUMBER: _ClassVar[int]
    RENEW_BELOW_FIELD_NUMBER: _ClassVar[int]
    FINAL_UNITS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    lease_id: str
    decision: _metering_pb2.Decision
    reason: _metering_pb2.Reason
    granted: int
    available: int
    valid_for: _duration_pb2.Duration
    renew_below: int
    final_units: bool
    retry_after: _duration_pb2.Duration
    recorded: int
    overage: int
    refunded: int
    limits: _containers.RepeatedCompositeFieldContainer[_metering_pb2.LimitStatus]
    policy_version: int
    replayed: bool
    message: str
    violations: _containers.RepeatedCompositeFieldContainer[_metering_pb2.FieldViolation]
    decided_at: _timestamp_pb2.Timestamp
    closed: bool
    decision_id: str
    def __init__(self, request_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., decision: _Optional[_Union[_metering_pb2.Decision, str]] = ..., reason: _Optional[_Union[_metering_pb2.Reason, str]] = ..., granted: _Optional[int] = ..., available: _Optional[int] = ..., valid_for: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., renew_below: _Optional[int] = ..., final_units: _Optional[bool] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., recorded: _Optional[int] = ..., overage: _Optional[int] = ..., refunded: _Optional[int] = ..., limits: _Optional[_Iterable[_Union[_metering_pb2.LimitStatus, _Mapping]]] = ..., policy_version: _Optional[int] = ..., replayed: _Optional[bool] = ..., message: _Optional[str] = ..., violations: _Optional[_Iterable[_Union[_metering_pb2.FieldViolation, _Mapping]]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., closed: _Optional[bool] = ..., decision_id: _Optional[str] = ...) -> None: ...
