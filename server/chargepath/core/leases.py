"""Quota leases, pure: the ask and its answer, their validation, and the sizing rule.

A lease takes units ahead of use from every limit that matches a metric, all or nothing, like
an admit of the same amount; its holder spends them without a round trip, reports what it used
(recorded in the ledger under the ask's request id), and gives back what it did not use by
releasing the lease or letting it expire. The store applies these rules atomically in one
script (``store/scripts/lease.lua``); this module is their Python reference, used to check
the script (parity tests) and by the transport to refuse bad input before the store.

Sizing (:func:`grant_size`). A grant is the smallest of the units requested and, for every
hard limit ``i`` the metric matches, ``cap_i = min(max_units_i, max(floor(remaining_i *
max_share_pct_i / 100), min(remaining_i, 1)))`` (0 when ``remaining_i`` < 1). A soft limit caps
the grant by its ``max_units`` only (it is debited the grant and may be exceeded, as a soft
limit is). ``renew_below`` is ``ceil(grant * renew_below_pct / 100)`` with the smallest
``renew_below_pct`` of the limits. The validity is the shortest of the limits'.

Amounts are whole units of the metric; times are milliseconds on the store's clock.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from chargepath.core.model import (
    Decision,
    FieldViolation,
    LimitState,
    Reason,
    Subject,
)
from chargepath.core.validation import (
    MAX_AMOUNT,
    MAX_LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_REQUEST_ID,
    PRINTABLE_RE,
    check_metric_name,
    check_subject_part,
    check_tenant,
)

#: A lease id: what the store generates (32 hex digits), or anything of this shape a caller
#: may send back.
LEASE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
HOLDER_RE = re.compile(r"[A-Za-z0-9._~@+=/:-]{1,128}")
MAX_HOLDER = 128


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    """A limit's lease settings, compiled from its ``lease:`` (:class:`~chargepath.core.plans.
    LeaseSpec`): the largest grant, the largest share (percent) of what the limit has left,
    the validity (ms), the renewal threshold (percent of a grant), and whether the gateway
    itself may hold leases on it."""

    max_units: int
    max_share_pct: int
    validity_ms: int
    renew_below_pct: int = 20
    gateway: bool = False


@dataclass(frozen=True, slots=True)
class LeaseAsk:
    """One lease request (the wire's ``LeaseAsk``): open (no ``lease_id``), or renew, report
    on and/or release an open lease. In that order: record ``used``, then grant
    ``requested`` or release."""

    request_id: str
    subject: Subject
    metric: str
    lease_id: str = ""
    requested: int = 0
    used: int = 0
    release: bool = False
    labels: tuple[tuple[str, str], ...] = ()
    holder: str = ""


@dataclass(frozen=True, slots=True)
class LeaseAnswer:
    """The answer to one :class:`LeaseAsk` (the wire's ``LeaseAnswer``; see lease.proto for
    each field). ``valid_for_ms``: until the lease expires on the store's clock (0 once
    closed). ``decision_id``: what explain finds the ask by."""

    request_id: str
    decision: Decision
    reason: Reason
    lease_id: str = ""
    granted: int = 0
    available: int = 0
    valid_for_ms: int = 0
    renew_below: int = 0
    final_units: bool = False
    retry_after_ms: int = 0
    recorded: int = 0
    overage: int = 0
    refunded: int = 0
    limits: tuple[LimitState, ...] = ()
    policy_version: int = 0
    replayed: bool = False
    message: str = ""
    violations: tuple[FieldViolation, ...] = ()
    decided_at_ms: int = 0
    closed: bool = False
    decision_id: str = ""


@dataclass(frozen=True, slots=True)
class LeaseHold:
    """What an open lease took from one limit: ``units`` (granted, not yet used or given
    back) and, for a quota, the start of the period they came from (ms; 0 for a rate)."""

    limit: str
    units: int
    period_start_ms: int = 0


@dataclass(frozen=True, slots=True)
class LeaseView:
    """An open lease as state shows it. ``available`` = ``granted`` - ``used``, never below
    0; ``expires_in_ms`` on the store's clock at the read."""

    lease_id: str
    subject: Subject
    metric: str
    holder: str
    granted: int
    used: int
    available: int
    expires_at_ms: int
    expires_in_ms: int
    policy_version: int
    holds: tuple[LeaseHold, ...] = ()


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """An answered lease ask as the store keeps it for explain (the most recent ones)."""

    decision_id: str
    request_id: str
    subject: Subject
    metric: str
    lease_id: str
    holder: str
    decision: Decision
    reason: Reason
    requested: int
    used: int
    granted: int
    recorded: int
    overage: int
    refunded: int
    policy_version: int
    decided_at_ms: int
    trace_id: str = ""


def _shorten(value: str) -> str:
    return value if len(value) <= 32 else f"{value[:29]}... ({len(value)} characters)"


def validate_ask(ask: LeaseAsk) -> list[FieldViolation]:
    """Every violation of the contract in ``ask``; empty when it is valid. Field paths are
    those of ``LeaseAsk`` on the wire."""
    out: list[FieldViolation] = []
    rid = ask.request_id
    if not rid:
        out.append(FieldViolation("request_id", "is required"))
    elif len(rid) > MAX_REQUEST_ID or not PRINTABLE_RE.fullmatch(rid):
        out.append(
            FieldViolation(
                "request_id",
                f"must be 1 to {MAX_REQUEST_ID} printable ASCII characters, got {_shorten(rid)!r}",
            )
        )
    for bad in (
        check_tenant(ask.subject.tenant),
        check_subject_part(ask.subject.slice, "subject.slice"),
        check_subject_part(ask.subject.key, "subject.key"),
        check_metric_name(ask.metric),
    ):
        if bad is not None:
            out.append(bad)
    if ask.lease_id and not LEASE_ID_RE.fullmatch(ask.lease_id):
        out.append(
            FieldViolation(
                "lease_id",
                f"must be 1 to 64 characters of [A-Za-z0-9_-], got {_shorten(ask.lease_id)!r}",
            )
        )
    if not 0 <= ask.requested <= MAX_AMOUNT:
        out.append(
            FieldViolation("requested", f"must be between 0 and {MAX_AMOUNT}, got {ask.requested}")
        )
    if not 0 <= ask.used <= MAX_AMOUNT:
        out.append(FieldViolation("used", f"must be between 0 and {MAX_AMOUNT}, got {ask.used}"))
    if not ask.lease_id:
        if ask.requested == 0:
            out.append(FieldViolation("requested", "must be at least 1 to open a lease"))
        if ask.used:
            out.append(FieldViolation("used", "needs a lease_id (nothing was granted yet)"))
        if ask.release:
            out.append(FieldViolation("release", "needs a lease_id"))
    elif ask.release and ask.requested:
        out.append(FieldViolation("requested", "must be 0 when releasing the lease"))
    if ask.labels:
        if len(ask.labels) > MAX_LABELS:
            out.append(
                FieldViolation("labels", f"at most {MAX_LABELS} labels, got {len(ask.labels)}")
            )
        else:
            for k, v in ask.labels:
                if not k or len(k) > MAX_LABEL_KEY:
                    out.append(
                        FieldViolation("labels", f"keys must be 1 to {MAX_LABEL_KEY} characters")
                    )
                    break
                if len(v) > MAX_LABEL_VALUE:
                    out.append(
                        FieldViolation(
                            f"labels[{_shorten(k)}]",
                            f"values must be at most {MAX_LABEL_VALUE} chars",
                        )
                    )
                    break
    if ask.holder and not HOLDER_RE.fullmatch(ask.holder):
        out.append(
            FieldViolation(
                "holder",
                f"must be up to {MAX_HOLDER} characters of [A-Za-z0-9._~@+=/:-], "
                f"got {_shorten(ask.holder)!r}",
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class LimitRoom:
    """One limit as sizing sees it: whole units it has left now (may be negative: a bucket in
    debt, a quota overspent), its lease terms, and whether it is soft."""

    remaining: int
    terms: LeaseTerms
    soft: bool = False


def limit_cap(room: LimitRoom) -> int:
    """The largest grant one limit allows now (see the module docstring)."""
    if room.soft:
        return room.terms.max_units
    if room.remaining < 1:
        return 0
    share = room.remaining * room.terms.max_share_pct // 100
    return min(room.terms.max_units, max(share, 1))


def grant_size(requested: int, rooms: Sequence[LimitRoom]) -> int:
    """Units granted for ``requested`` given every matching limit's room; 0: none now."""
    grant = requested
    for room in rooms:
        grant = min(grant, limit_cap(room))
    return max(grant, 0)


def renew_below(grant: int, renew_below_pct: int) -> int:
    """The renewal threshold of a grant: ``ceil(grant * renew_below_pct / 100)``."""
    return -(-grant * renew_below_pct // 100)


def lease_terms_of(terms: Sequence[LeaseTerms]) -> tuple[int, int]:
    """(validity ms, renew_below_pct) of a lease over limits with these terms: the shortest
    validity and the smallest threshold."""
    return min(t.validity_ms for t in terms), min(t.renew_below_pct for t in terms)


def missing_lease_settings(limit_names: Sequence[tuple[str, LeaseTerms | None]]) -> str | None:
    """The message of a NO_ENTITLEMENT refusal when a matching limit grants no lease (its
    plan gives it no ``lease:`` settings), naming the first such limit; None when all do."""
    for name, terms in limit_names:
        if terms is None:
            return f"limit {name!r} grants no lease (it has no 'lease' settings in its plan)"
    return None
