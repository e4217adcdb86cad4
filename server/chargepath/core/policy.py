"""A policy document compiled for deciding: which limits apply to a subject and a metric.

A :class:`Policy` is immutable and carries the version the store gave it; every decision uses
exactly one Policy, so no decision mixes two versions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import NamedTuple

from chargepath.core.leases import LeaseTerms
from chargepath.core.model import LimitKind, Scope, Subject
from chargepath.core.periods import Period
from chargepath.core.plans import (
    SCOPES,
    CapsSpec,
    DescriptorSpec,
    EnvoyDomainSpec,
    LimitSpec,
    PolicyDocument,
    compile_rate,
)

PERIODS = {
    "hour": Period.HOUR,
    "day": Period.DAY,
    "week": Period.WEEK,
    "month": Period.MONTH,
}


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit ready for the store, in exact integers.

    Rate: the bucket holds ``capacity`` units; its level is kept in ``scale`` sub-units per unit
    and refills ``refill_per_ms`` sub-units per millisecond. Quota: ``amount`` units per
    ``period``. ``lease``: its lease settings, None when it grants no lease.
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
    lease: LeaseTerms | None = None

    @property
    def capacity_sub(self) -> int:
        """A rate's capacity in sub-units: what a full bucket holds."""
        return self.capacity * self.scale

    @classmethod
    def from_spec(cls, spec: LimitSpec, *, min_scope: Scope = Scope.TENANT) -> Limit:
        scope = max(SCOPES[spec.scope], min_scope)
        lease = (
            None
            if spec.lease is None
            else LeaseTerms(
                spec.lease.max_units,
                spec.lease.max_share_pct,
                spec.lease.validity_ms,
                spec.lease.renew_below_pct,
                spec.lease.gateway,
            )
        )
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
                lease=lease,
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
            lease=lease,
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
class Caps:
    """A tenant's caps on the records its usages keep in the store (:class:`~chargepath.core.
    plans.CapsSpec`), as counts of live records; 0: no cap."""

    request_ids: int = 0
    sessions: int = 0
    slices: int = 0
    keys: int = 0

    @classmethod
    def from_spec(cls, spec: CapsSpec) -> Caps:
        return cls(spec.request_ids or 0, spec.sessions or 0, spec.slices or 0, spec.keys or 0)


NO_CAPS = Caps()


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

    ``aggregate_ms`` > 0: allowed admits reach the ledger as per-interval aggregates.
    ``caps``: the tenant's caps. ``tenant_known`` False: the policy names no such tenant, and
    deciding its usage writes nothing to the store (not even the trail of recent decisions):
    a caller who names made-up tenants must not grow the store."""

    entitled: bool
    limits: tuple[Limit, ...]
    failure_mode: str
    aggregate_ms: int = 0
    caps: Caps = NO_CAPS
    tenant_known: bool = True


class DescriptorRoute(NamedTuple):
    """What an Envoy descriptor (or RLQS bucket) is, by the policy's ``envoy`` mapping.

    ``matched`` False: no node of its domain matches it (or the domain is not mapped); then
    ``strict`` says whether it is refused (OVER_LIMIT) or let through uncounted. Otherwise it is
    one usage of ``metric`` by ``subject``; ``shadow``: answered OK whatever the decision."""

    matched: bool
    subject: Subject = Subject("")
    metric: str = ""
    shadow: bool = False
    strict: bool = False


@dataclass(frozen=True, slots=True)
class _DescriptorNode:
    subject: str | None
    metric: str | None
    shadow: bool
    #: (entry key, entry value or None for any value) -> node, in the file's order
    children: dict[tuple[str, str | None], _DescriptorNode] = field(default_factory=dict)

    @classmethod
    def tree(cls, specs: list[DescriptorSpec]) -> dict[tuple[str, str | None], _DescriptorNode]:
        return {
            (d.key, d.value): cls(d.subject, d.metric, d.shadow_mode, cls.tree(d.descriptors))
            for d in specs
        }


@dataclass(frozen=True, slots=True)
class _EnvoyDomain:
    tenant: str
    strict: bool
    shadow: bool
    children: dict[tuple[str, str | None], _DescriptorNode]

    @classmethod
    def of(cls, spec: EnvoyDomainSpec) -> _EnvoyDomain:
        return cls(
            spec.tenant or "", spec.strict, spec.shadow_mode, _DescriptorNode.tree(spec.descriptors)
        )


_UNKNOWN = DescriptorRoute(False)
_UNKNOWN_TENANT = Resolution(False, (), "deny", tenant_known=False)
_UNKNOWN_STRICT = DescriptorRoute(False, strict=True)


class Policy:
    """An immutable, versioned, compiled policy document."""

    def __init__(self, document: PolicyDocument, version: int) -> None:
        self.document = document
        self.version = version
        self.metrics = frozenset(m.name for m in document.metrics)
        plans = {p.name: p for p in document.plans}
        self.entitlements: dict[str, Entitlement] = {}
        self.aggregate_ms: dict[str, int] = {}
        self.caps: dict[str, Caps] = {}
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
            self.caps[t.name] = Caps.from_spec(t.caps)
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
        self.envoy_domains = {d.domain: _EnvoyDomain.of(d) for d in document.envoy}

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
            res = _UNKNOWN_TENANT
        else:
            candidates = list(ent.limits)
            if subject.slice:
                candidates.extend(ent.slice_limits.get(subject.slice, ()))
            matching = [lim for pattern, lim in candidates if fnmatchcase(metric, pattern)]
            limits = tuple(lim for lim in matching if lim.applies_to(subject))
            res = Resolution(
                bool(matching),
                limits,
                ent.failure_mode,
                self.aggregate_ms.get(subject.tenant, 0),
                self.caps[subject.tenant],
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

    def route_descriptor(self, domain: str, entries: Sequence[tuple[str, str]]) -> DescriptorRoute:
        """Map one Envoy rate limit descriptor (its entries in order) of ``domain``, as
        envoyproxy/ratelimit matches its config: entry by entry down the tree, an exact
        ``value`` before a node without one; the last entry must land on a node with a
        metric. The values are not checked here: a bad tenant or key is the usage's
        validation's to refuse."""
        d = self.envoy_domains.get(domain)
        if d is None:
            return _UNKNOWN
        children = d.children
        node: _DescriptorNode | None = None
        parts = {"tenant": d.tenant, "slice": "", "key": ""}
        shadow = d.shadow
        for key, value in entries:
            node = children.get((key, value)) or children.get((key, None))
            if node is None:
                break
            if node.subject is not None:
                parts[node.subject] = value
            shadow = shadow or node.shadow
            children = node.children
        if node is None or node.metric is None:
            return _UNKNOWN_STRICT if d.strict else _UNKNOWN
        return DescriptorRoute(
            True,
            Subject(parts["tenant"], parts["slice"], parts["key"]),
            node.metric,
            shadow,
            d.strict,
        )

    def route_bucket(self, domain: str, bucket: Mapping[str, str]) -> DescriptorRoute:
        """Map an RLQS bucket id (an unordered map) like a descriptor whose entries are in the
        order of the first path down the tree (in the file's order, an exact value before a
        node without one) that uses every entry of the bucket and ends on a metric."""
        d = self.envoy_domains.get(domain)
        if d is None:
            return _UNKNOWN
        path = _bucket_path(d.children, dict(bucket))
        if path is None:
            return _UNKNOWN_STRICT if d.strict else _UNKNOWN
        return self.route_descriptor(domain, path)


def _bucket_path(
    children: dict[tuple[str, str | None], _DescriptorNode], left: dict[str, str]
) -> list[tuple[str, str]] | None:
    """The entries of ``left`` in the order of a path down ``children`` that uses them all and
    ends on a node with a metric; None if there is none. Depth-first: trees are small."""
    for (key, value), node in children.items():
        if key not in left or value not in (None, left[key]):
            continue
        if value is None and (key, left[key]) in children:
            continue  # the exact node is tried instead, as route_descriptor would pick it
        rest = {k: v for k, v in left.items() if k != key}
        if not rest:
            if node.metric is not None:
                return [(key, left[key])]
            continue
        tail = _bucket_path(node.children, rest)
        if tail is not None:
            return [(key, left[key]), *tail]
    return None
