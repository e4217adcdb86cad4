"""The client's own view of a decision: plain enums and frozen dataclasses, no protobuf.

Durations are float seconds (ready for `asyncio.sleep`), timestamps are aware UTC datetimes.
The protobuf message a Verdict was made from stays reachable as `Verdict.raw`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf import duration_pb2

from chargepath_protos.v1 import metering_pb2 as pb


class Mode(enum.StrEnum):
    """Admit (ask before the work, `check`) or report (tell after the work, `report`)."""

    ADMIT = "admit"
    REPORT = "report"


class _Word(enum.StrEnum):
    """An enum shown as the contract and the CLI spell it, in capitals without the type's
    prefix: ``str(Decision.ALLOW) == "ALLOW"``, ``repr`` ``Decision.ALLOW``. The values stay
    lower case (``Decision.ALLOW == "allow"``, as in 0.1), and a lookup takes any of the three
    spellings: ``Decision("allow")``, ``Decision("ALLOW")``, ``Decision("DECISION_ALLOW")``."""

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"

    @classmethod
    def _missing_(cls, value: object) -> _Word | None:
        if not isinstance(value, str):
            return None
        key = value.strip().lower().removeprefix(f"{cls.__name__.lower()}_")
        for member in cls:
            if member.value == key:
                return member
        return None


class Decision(_Word):
    """ALLOW, THROTTLE or DENY. UNSPECIFIED only for a value this client does not know."""

    UNSPECIFIED = "unspecified"
    ALLOW = "allow"
    THROTTLE = "throttle"
    DENY = "deny"


class Reason(_Word):
    """The machine-readable cause of a decision (see `chargepath.v1.Reason`); shown as
    ``RATE_LIMITED``."""

    UNSPECIFIED = "unspecified"
    OK = "ok"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXHAUSTED = "quota_exhausted"
    NO_ENTITLEMENT = "no_entitlement"
    AMOUNT_EXCEEDS_CAPACITY = "amount_exceeds_capacity"
    STORE_UNAVAILABLE = "store_unavailable"
    INVALID_USAGE = "invalid_usage"
    SUSPENDED = "suspended"
    SOFT_LIMIT_EXCEEDED = "soft_limit_exceeded"
    PERMISSION_DENIED = "permission_denied"
    CAP_REACHED = "cap_reached"
    LEASE_EXPIRED = "lease_expired"


class LimitKind(enum.StrEnum):
    """A token bucket (RATE) or a period budget (QUOTA)."""

    UNSPECIFIED = "unspecified"
    RATE = "rate"
    QUOTA = "quota"


class Scope(enum.StrEnum):
    """The level of the subject a limit counts at."""

    UNSPECIFIED = "unspecified"
    TENANT = "tenant"
    SLICE = "slice"
    KEY = "key"


_E = TypeVar("_E", bound=enum.StrEnum)


def _by_number(enum_cls: type[_E], values: Mapping[str, int], prefix: str) -> dict[int, _E]:
    """Map a protobuf enum's numbers to the client enum member of the same name."""
    return {number: enum_cls(name.removeprefix(prefix).lower()) for name, number in values.items()}


_DECISIONS = _by_number(Decision, dict(pb.Decision.items()), "DECISION_")
_REASONS = _by_number(Reason, dict(pb.Reason.items()), "REASON_")
_KINDS = _by_number(LimitKind, dict(pb.LimitKind.items()), "LIMIT_KIND_")
_SCOPES = _by_number(Scope, dict(pb.Scope.items()), "SCOPE_")
MODES: dict[Mode, pb.Mode] = {Mode.ADMIT: pb.MODE_ADMIT, Mode.REPORT: pb.MODE_REPORT}


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """The state of one limit a decision touched, after the decision.

    `remaining` is negative when a report put the limit into debt; `reset_after` is the
    time, in seconds, until a bucket is full again or a quota period resets.
    """

    name: str
    kind: LimitKind
    scope: Scope
    remaining: int
    capacity: int
    reset_after: float
    soft: bool
    exceeded: bool

    @classmethod
    def from_pb(cls, limit: pb.LimitStatus) -> LimitStatus:
        return cls(
            name=limit.name,
            kind=_KINDS.get(limit.kind, LimitKind.UNSPECIFIED),
            scope=_SCOPES.get(limit.scope, Scope.UNSPECIFIED),
            remaining=limit.remaining,
            capacity=limit.capacity,
            reset_after=_seconds(limit.reset_after),
            soft=limit.soft,
            exceeded=limit.exceeded,
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one usage.

    `retry_after` is in seconds (0.0 when the decision has none). `replayed` is True when
    this is the stored answer to an earlier attempt with the same request id (or stream
    session and sequence): nothing was counted again. `recorded` is True once the usage is
    in the ledger. `spooled` (with `degraded`, never with `recorded`) is True when the store
    was unavailable and the gateway wrote the usage to its local disk: it reaches the ledger,
    once, when the store is back, and needs no resend. `raw` is the `chargepath.v1.Verdict`
    protobuf message it was made from.
    """

    request_id: str
    decision: Decision
    reason: Reason
    retry_after: float
    limits: tuple[LimitStatus, ...]
    policy_version: int
    decision_id: str
    recorded: bool
    degraded: bool
    replayed: bool
    spooled: bool
    trace_id: str
    message: str
    decided_at: datetime | None
    raw: pb.Verdict = field(repr=False, compare=False, hash=False)
    #: counted against a lease the gateway holds; in the ledger within its report interval
    leased: bool = False

    @property
    def allowed(self) -> bool:
        """True for ALLOW (including a soft-limit overage)."""
        return self.decision is Decision.ALLOW

    @classmethod
    def from_pb(cls, verdict: pb.Verdict) -> Verdict:
        decided_at = (
            verdict.decided_at.ToDatetime(tzinfo=UTC) if verdict.HasField("decided_at") else None
        )
        return cls(
            request_id=verdict.request_id,
            decision=_DECISIONS.get(verdict.decision, Decision.UNSPECIFIED),
            reason=_REASONS.get(verdict.reason, Reason.UNSPECIFIED),
            retry_after=_seconds(verdict.retry_after),
            limits=tuple(LimitStatus.from_pb(limit) for limit in verdict.limits),
            policy_version=verdict.policy_version,
            decision_id=verdict.decision_id,
            recorded=verdict.recorded,
            degraded=verdict.degraded,
            replayed=verdict.replayed,
            spooled=verdict.spooled,
            leased=verdict.leased,
            trace_id=verdict.trace_id,
            message=verdict.message,
            decided_at=decided_at,
            raw=verdict,
        )
