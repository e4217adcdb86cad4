"""A policy document compiled for deciding: which limits apply to a subject and a metric.

A :class:`Policy` is immutable and carries the version the store gave it; every decision uses
exactly one Policy, so no decision mixes two versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from chargepath.core.model import LimitKind, Scope, Subject
from chargepath.core.periods import Period
from chargepath.core.plans import SCOPES, LimitSpec, PolicyDocument, compile_rate

PERIODS = {"hour": Period.HOUR, "day": Period.DAY, "month": Period.MONTH}


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit ready for the store, in exact integers.

    Rate: the bucket holds ``capacity`` units; its level is kept in ``scale`` sub-units per unit
    and refills ``refill_per_ms`` sub-units per millisecond. Quota: ``amount`` units per
    ``period``.
    """

    name: str
    kind: LimitKind
    scope: Scope
    soft: bool
    capacity: int = 0
    scale: int = 1
    refill_per_ms: int = 0
    amount: int = 0
    period: Period = Period.MONTH
    refill: int = 0
    per: str = ""

    @property
    def capacity_sub(self) -> int:
        """A rate's capacity in sub-units: what a full bucket holds."""
        return self.capacity * self.scale

    @classmethod
    def from_spec(cls, spec: LimitSpec, *, min_scope: Scope = Scope.TENANT) -> Limit:
        scope = max(SCOPES[spec.scope], min_scope)
        if spec.rate is not None:
            c = compile_rate(spec.rate)
            return cls(
                name=spec.name,
                kind=LimitKind.RATE,
                scope=scope,
                soft=spec.soft,
                capacity=spec.rate.capacity,
                scale=c.scale,
                refill_per_ms=c.refill_per_ms,
                refill=spec.rate.refill,
                per=spec.rate.per,
            )
        assert spec.quota is not None
        return cls(
            name=spec.name,
            kind=LimitKind.QUOTA,
            scope=scope,
            soft=spec.soft,
            amount=spec.quota.amount,
            period=PERIODS[spec.quota.per],
            per=spec.quota.per,
        )

    def applies_to(self, subject: Subject) -> bool:
        """A slice-scoped limit counts only usages that name a slice; a key-scoped one only
        usages that name a key."""
        if self.scope is Scope.SLICE:
            return bool(subject.slice)
        if self.scope is Scope.KEY:
            return bool(subject.key)
        return True


@dataclass(frozen=True, slots=True)
class Entitlement:
    """What a tenant may do: its plan's limits (patterns kept for matching), the extra limits
    of each slice with a plan of its own, and its failure policy."""

    tenant: str
    plan: str | None
    failure_mode: str
    limits: tuple[tuple[str, Limit], ...]
    slice_plans: dict[str, str | None]
    slice_limits: dict[str, tuple[tuple[str, Limit], ...]]


@dataclass(frozen=True, slots=True)
class Resolution:
    """The limits a usage touches, and whether its tenant is entitled to the metric at all.

    ``aggregate_ms`` > 0: allowed admits reach the ledger as per-interval aggregates."""

    entitled: bool
    limits: tuple[Limit, ...]
    failure_mode: str
    aggregate_ms: int = 0


class Policy:
    """An immutable, versioned, compiled policy document."""

    def __init__(self, document: PolicyDocument, version: int) -> None:
        self.document = document
        self.version = version
        self.metrics = frozenset(m.name for m in document.metrics)
        plans = {p.name: p for p in document.plans}
        self.entitlements: dict[str, Entitlement] = {}
        self.aggregate_ms: dict[str, int] = {}
        #: (tenant, slice, key) -> reason; "" for "any" slice or no key.
        self.suspensions: dict[tuple[str, str, str], str] = {}
        for t in document.tenants:
            base = (
                tuple((lim.metric, Limit.from_spec(lim)) for lim in plans[t.plan].limits)
                if t.plan
                else ()
            )
            slice_limits = {
                s.name: tuple(
                    (lim.metric, Limit.from_spec(lim, min_scope=Scope.SLICE))
                    for lim in plans[s.plan].limits
                )
                for s in t.slices
                if s.plan
            }
            involved = [plans[t.plan]] if t.plan else []
            involved += [plans[s.plan] for s in t.slices if s.plan]
            self.aggregate_ms[t.name] = min(
                (p.ledger.interval_s * 1000 for p in involved if p.ledger.mode == "aggregate"),
                default=0,
            )
            if t.suspended is not None:
                self.suspensions[(t.name, "", "")] = t.suspended
            for s in t.slices:
                if s.suspended is not None:
                    self.suspensions[(t.name, s.name, "")] = s.suspended
            for k in t.keys:
                if k.suspended is not None:
                    self.suspensions[(t.name, k.slice, k.name)] = k.suspended
            self.entitlements[t.name] = Entitlement(
                tenant=t.name,
                plan=t.plan,
                failure_mode=t.failure_policy.mode,
                limits=base,
                slice_plans={s.name: s.plan for s in t.slices},
                slice_limits=slice_limits,
            )
        self._cache: dict[tuple[str, str, bool, bool, str], Resolution] = {}

    @classmethod
    def empty(cls) -> Policy:
        return cls(PolicyDocument(), 0)

    def resolve(self, subject: Subject, metric: str) -> Resolution:
        """The limits matching ``metric`` at the scopes ``subject`` names (memoised)."""
        ck = (subject.tenant, subject.slice, bool(subject.slice), bool(subject.key), metric)
        hit = self._cache.get(ck)
        if hit is not None:
            return hit
        ent = self.entitlements.get(subject.tenant)
        if ent is None:
            res = Resolution(False, (), "deny")
        else:
            candidates = list(ent.limits)
            if subject.slice:
                candidates.extend(ent.slice_limits.get(subject.slice, ()))
            matching = [lim for pattern, lim in candidates if fnmatchcase(metric, pattern)]
            limits = tuple(lim for lim in matching if lim.applies_to(subject))
            res = Resolution(
                bool(matching), limits, ent.failure_mode, self.aggregate_ms.get(subject.tenant, 0)
            )
        if len(self._cache) < 100_000:
            self._cache[ck] = res
        return res

    def suspension(self, subject: Subject) -> str | None:
        """Why ``subject`` is suspended (tenant, slice, or key in that slice or any slice), or
        None."""
        if not self.suspensions:
            return None
        t = subject.tenant
        for probe in (
            (t, "", ""),
            (t, subject.slice, "") if subject.slice else None,
            (t, subject.slice, subject.key) if subject.key else None,
            (t, "", subject.key) if subject.key and subject.slice else None,
        ):
            if probe is not None and probe in self.suspensions:
                return self.suspensions[probe]
        return None
