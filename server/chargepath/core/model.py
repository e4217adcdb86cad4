"""Domain types shared by the engine, the store and the transport.

Enum values equal the numbers of the matching ``chargepath.v1`` protobuf enums so that the
mapping module can convert by value, but nothing here depends on the generated code.

The four types made for every usage on the hot path (:class:`Subject`, :class:`Usage`,
:class:`LimitState`, :class:`Verdict`) are named tuples: as immutable as frozen dataclasses,
and built in a fraction of the time (a frozen dataclass sets each field through
``object.__setattr__``; at tens of thousands of usages a second that was measurable).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class Mode(enum.IntEnum):
    UNSPECIFIED = 0
    ADMIT = 1
    REPORT = 2


class Decision(enum.IntEnum):
    ALLOW = 1
    THROTTLE = 2
    DENY = 3


class Reason(enum.IntEnum):
    OK = 1
    RATE_LIMITED = 2
    QUOTA_EXHAUSTED = 3
    NO_ENTITLEMENT = 4
    AMOUNT_EXCEEDS_CAPACITY = 5
    STORE_UNAVAILABLE = 6
    INVALID_USAGE = 7
    SUSPENDED = 8
    SOFT_LIMIT_EXCEEDED = 9
    #: The caller may not act for the usage's tenant (a stream item; Check answers with a
    #: PERMISSION_DENIED status instead). Set by the transport: nothing reached the store.
    PERMISSION_DENIED = 10
    #: A tenant cap on what the store keeps (live request ids, sessions, slices, keys) was
    #: reached: nothing written; the verdict's message names the cap.
    CAP_REACHED = 11
    #: A lease ask named a lease that had expired or was released: its ``used`` was recorded
    #: as overage, and a new lease must be opened.
    LEASE_EXPIRED = 12


class LimitKind(enum.IntEnum):
    RATE = 1
    QUOTA = 2


class Scope(enum.IntEnum):
    TENANT = 1
    SLICE = 2
    KEY = 3


class Subject(NamedTuple):
    """What a usage is about. Scopes nest: tenant ⊃ slice ⊃ key; empty means "not given"."""

    tenant: str
    slice: str = ""
    key: str = ""


class Usage(NamedTuple):
    """One request to meter ``amount`` whole units of ``metric`` for ``subject``.

    ``session_id``/``sequence`` are set only for stream usages that use session dedup;
    ``occurred_at_ms`` is milliseconds since the Unix epoch, 0 when the caller gave none.
    """

    request_id: str
    subject: Subject
    metric: str
    amount: int
    mode: Mode
    labels: tuple[tuple[str, str], ...] = ()
    occurred_at_ms: int = 0
    session_id: str = ""
    sequence: int = 0


class LimitState(NamedTuple):
    """The state of one limit after a decision, in whole units and milliseconds."""

    name: str
    kind: LimitKind
    scope: Scope
    remaining: int
    capacity: int
    reset_after_ms: int
    soft: bool
    exceeded: bool


class Verdict(NamedTuple):
    """The decision for one usage. ``retry_after_ms`` is 0 when there is nothing to wait for."""

    request_id: str
    decision: Decision
    reason: Reason
    decision_id: str
    policy_version: int
    retry_after_ms: int = 0
    limits: tuple[LimitState, ...] = ()
    recorded: bool = False
    degraded: bool = False
    replayed: bool = False
    trace_id: str = ""
    message: str = ""
    decided_at_ms: int = 0
    #: for REASON_INVALID_USAGE: what was wrong, as structures (``message`` is their text)
    violations: tuple[FieldViolation, ...] = ()
    #: degraded, and the usage is on the gateway's local disk (the spool): it reaches the
    #: ledger, once, when the store is back. Never together with ``recorded``.
    spooled: bool = False
    #: counted against a lease this gateway holds (chargepath.gateway_leases): recorded in
    #: the ledger within the report interval, not yet (``recorded`` is False)
    leased: bool = False


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """Why a usage is invalid: the offending field (dotted path) and a reason for a human."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class InvalidUsageError(ValueError):
    """Raised for a usage that breaks the contract; carries every violation found."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(str(v) for v in violations))


@dataclass(frozen=True, slots=True)
class LimitChange:
    """One limit's remaining units before and after a decision (for explain)."""

    name: str
    kind: LimitKind
    remaining_before: int
    remaining_after: int
    capacity: int
    exceeded: bool


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """A recent decision as the store keeps it for state, explain and watch."""

    decision_id: str
    request_id: str
    subject: Subject
    metric: str
    amount: int
    mode: Mode
    decision: Decision
    reason: Reason
    policy_version: int
    decided_at_ms: int
    trace_id: str
    retry_after_ms: int
    limits: tuple[LimitChange, ...]


@dataclass(frozen=True, slots=True)
class ThresholdEvent:
    """A quota counter crossed ``percent`` (80 or 100) of its capacity."""

    subject: Subject
    limit: str
    percent: int
    used: int
    capacity: int
    at_ms: int
