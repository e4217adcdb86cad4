"""What the status page shows, read fresh for each refresh: never a copy kept between reads.

A :class:`StatusBoard` reads one :class:`Snapshot` per refresh period (``status_refresh_ms``,
1 s by default), and only while someone is looking: every open page and every ``/status.json``
request is served from the same snapshot, so the load on Redis does not grow with the number of
viewers. Each snapshot is read with the same store reads as ``GetState``:

* the policy (version, plans, suspensions, failure policies) is the live one: the store's
  version is read, and the engine reloads the policy when the store's is newer;
* every tenant- and slice-scope limit's use, capacity and reset come from ``read_limits.lua``
  (:meth:`~chargepath.store.base.StateStore.read_limits`), on Redis' clock;
* health is what the gRPC health service answers, the store's status a ping timed now, the
  breaker the engine's own;
* decision rates (throttled, denied, degraded) are the differences of this process's decision
  counters (the counts behind ``chargepath.decisions``) between two reads, per second.

Bounds: at most ``max_tenants`` tenants (first by name, plus any tenant a page asks for by
name) and ``max_slices`` slices per tenant are read per refresh, within ``read_budget_s``; a
tenant not read in time, or while the store is unreachable, is shown as not read, never with old
figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from chargepath.core.auth import Principal, Role
from chargepath.core.model import Decision, LimitKind, Scope, Subject
from chargepath.core.policy import Policy
from chargepath.engine import Engine
from chargepath.store.base import MeteringStore, StateStore, StoreUnavailableError
from chargepath.transport.admin import tenant_limits

log = logging.getLogger("chargepath.status")

#: (tenant, decision, degraded) -> decisions counted since start (Telemetry.decision_totals).
Totals = Mapping[tuple[str, Decision, bool], int]

MAX_TENANTS: Final = 100
MAX_SLICES: Final = 20
MAX_SUSPENSIONS: Final = 50


@dataclass(frozen=True, slots=True)
class LimitFigure:
    """One limit of one subject as read_limits.lua read it: whole units, seconds."""

    slice: str
    name: str
    kind: LimitKind
    scope: Scope
    soft: bool
    used: int
    capacity: int
    remaining: int
    reset_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "slice": self.slice,
            "name": self.name,
            "kind": self.kind.name.lower(),
            "scope": self.scope.name.lower(),
            "soft": self.soft,
            "used": self.used,
            "capacity": self.capacity,
            "remaining": self.remaining,
            "reset_s": round(self.reset_s, 3),
        }


@dataclass(frozen=True, slots=True)
class Rates:
    """Decisions per second over the window between two reads of the counters."""

    decisions: float = 0.0
    throttled: float = 0.0
    denied: float = 0.0
    degraded: float = 0.0

    def __add__(self, other: Rates) -> Rates:
        return Rates(
            self.decisions + other.decisions,
            self.throttled + other.throttled,
            self.denied + other.denied,
            self.degraded + other.degraded,
        )

    def to_json(self) -> dict[str, float]:
        def share(n: float) -> float:
            return round(n / self.decisions, 4) if self.decisions else 0.0

        return {
            "decisions_per_s": round(self.decisions, 2),
            "throttled_per_s": round(self.throttled, 2),
            "denied_per_s": round(self.denied, 2),
            "degraded_per_s": round(self.degraded, 2),
            "throttle_share": share(self.throttled),
            "degraded_share": share(self.degraded),
        }


@dataclass(frozen=True, slots=True)
class TenantFigures:
    tenant: str
    plan: str
    failure_mode: str
    #: False: the store could not be read for this tenant in this refresh (no figures).
    read: bool
    limits: tuple[LimitFigure, ...]
    #: (slice, key, reason) of each active suspension of the tenant, at any scope.
    suspensions: tuple[tuple[str, str, str], ...]
    suspensions_total: int

    def to_json(self, rates: Rates | None) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "plan": self.plan,
            "failure_mode": self.failure_mode,
            "read": self.read,
            "limits": [lim.to_json() for lim in self.limits],
            "suspensions": [{"slice": s, "key": k, "reason": r} for s, k, r in self.suspensions],
            "suspensions_total": self.suspensions_total,
            "rates": rates.to_json() if rates is not None else None,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One read of everything the page shows. ``seq`` grows by one per read."""

    seq: int
    read_at_ms: int
    health: str
    policy_version: int
    store_reachable: bool
    store_ping_ms: float | None
    breaker: str
    spool_depth: int | None
    #: every tenant of the policy (for the count, and to know which ones were not read)
    tenant_names: frozenset[str]
    tenants: Mapping[str, TenantFigures]
    #: tenant -> rates since the previous read; None on the first read (no window yet)
    rates: Mapping[str, Rates] | None
    window_s: float
    worker: int
    workers: int
    refresh_s: float

    def covers(self, tenant: str) -> bool:
        """True if the snapshot has ``tenant``'s figures, or the policy has no such tenant."""
        return tenant in self.tenants or tenant not in self.tenant_names

    def view(self, principal: Principal, tenant: str | None = None) -> dict[str, Any]:
        """What ``principal`` may see, as JSON: an operator every tenant (or only ``tenant``),
        a viewer its own tenant only (the caller checked that ``tenant`` is its own). The
        decision rates in ``decisions`` are summed over the tenants shown; for an operator
        seeing all, they include the decisions counted under no tenant."""
        if principal.role is not Role.OPERATOR:
            tenant = principal.tenant
        names = [tenant] if tenant is not None else sorted(self.tenants)
        shown = [self.tenants[t] for t in names if t in self.tenants]
        rates = self.rates
        total: Rates | None = None
        if rates is not None:
            counted = names if tenant is not None else list(rates)
            total = sum((rates.get(t, Rates()) for t in counted), Rates())
        return {
            "seq": self.seq,
            "read_at_ms": self.read_at_ms,
            "refresh_s": self.refresh_s,
            "window_s": round(self.window_s, 3),
            "worker": self.worker,
            "workers": self.workers,
            "viewer": {
                "identity": principal.identity,
                "role": principal.role.value,
                "tenant": principal.tenant,
            },
            "health": self.health,
            "policy_version": self.policy_version,
            "store": {
                "reachable": self.store_reachable,
                "ping_ms": self.store_ping_ms,
                "breaker": self.breaker,
                "spool_depth": self.spool_depth,
            },
            "decisions": total.to_json() if total is not None else None,
            "tenants_total": len(self.tenant_names) if tenant is None else len(shown),
            "tenants": [
                f.to_json(rates.get(f.tenant, Rates()) if rates is not None else None)
                for f in shown
            ],
        }


class RateWindow:
    """Per-tenant decision rates from successive totals of this process's counters."""

    def __init__(self) -> None:
        self._last: tuple[float, dict[str, Rates]] | None = None

    def advance(self, now_s: float, totals: Totals) -> tuple[Mapping[str, Rates] | None, float]:
        """(tenant -> rates since the previous call, the window in seconds); (None, 0) on the
        first call."""
        counts: dict[str, Rates] = {}
        for (tenant, decision, degraded), n in totals.items():
            counts[tenant] = counts.get(tenant, Rates()) + Rates(
                decisions=n,
                throttled=n if decision is Decision.THROTTLE else 0,
                denied=n if decision is Decision.DENY else 0,
                degraded=n if degraded else 0,
            )
        last, self._last = self._last, (now_s, counts)
        if last is None or now_s <= last[0]:
            return None, 0.0
        window = now_s - last[0]
        rates: dict[str, Rates] = {}
        for tenant, c in counts.items():
            p = last[1].get(tenant, Rates())
            rates[tenant] = Rates(
                (c.decisions - p.decisions) / window,
                (c.throttled - p.throttled) / window,
                (c.denied - p.denied) / window,
                (c.degraded - p.degraded) / window,
            )
        return rates, window


@dataclass
class BoardSources:
    """Where the board reads what is not in the store: the gRPC health status ("SERVING",
    "NOT_SERVING", "DRAINING"), this process's decision counters, the spool's depth (None: no
    spool)."""

    health: Callable[[], str]
    totals: Callable[[], Totals]
    spool_depth: Callable[[], int] | None = None
    worker: int = 0
    workers: int = 1


@dataclass
class BoardLimits:
    refresh_s: float = 1.0
    max_tenants: int = MAX_TENANTS
    max_slices: int = MAX_SLICES
    #: the bound on one store call (ping, version, one subject's limits)
    call_timeout_s: float = 1.0
    #: the bound on reading every tenant of one refresh
    read_budget_s: float = 2.0
    wall_ms: Callable[[], int] = field(default=lambda: time.time_ns() // 1_000_000)
    clock: Callable[[], float] = time.monotonic


class StatusBoard:
    """Reads snapshots for the status page, one per ``refresh_s`` at most, while wanted.

    :meth:`run` is the reader (one task, owned by the status server); pages wait for
    snapshots with :meth:`fresh` and :meth:`after`. Safe for concurrent use from one loop."""

    def __init__(
        self,
        engine: Engine,
        store: MeteringStore,
        state: StateStore,
        sources: BoardSources,
        limits: BoardLimits | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.state = state
        self.sources = sources
        self.limits = limits or BoardLimits()
        self._rates = RateWindow()
        self._latest: Snapshot | None = None
        self._latest_at = 0.0
        self._demand = asyncio.Event()
        self._changed = asyncio.Condition()
        self._wanted: Counter[str] = Counter()

    @property
    def refresh_s(self) -> float:
        return self.limits.refresh_s

    @contextlib.contextmanager
    def wanting(self, tenant: str | None) -> Iterator[None]:
        """While open, ``tenant`` is read at each refresh even past ``max_tenants``."""
        if tenant is None:
            yield
            return
        self._wanted[tenant] += 1
        try:
            yield
        finally:
            self._wanted[tenant] -= 1
            if self._wanted[tenant] <= 0:
                del self._wanted[tenant]

    async def run(self) -> None:
        """Read a snapshot each time one is wanted, at most one per refresh period."""
        while True:
            await self._demand.wait()
            self._demand.clear()
            try:
                snapshot = await self.read()
            except Exception:  # a bug must not end the page for everyone: logged, retried
                log.exception("status page: reading a snapshot failed")
                await asyncio.sleep(self.refresh_s)
                continue
            async with self._changed:
                self._latest = snapshot
                self._latest_at = self.limits.clock()
                self._changed.notify_all()
            await asyncio.sleep(self.refresh_s)

    async def after(self, seq: int, tenant: str | None = None) -> Snapshot:
        """The first snapshot newer than ``seq`` (that covers ``tenant``, if given)."""
        async with self._changed:
            while (
                self._latest is None
                or self._latest.seq <= seq
                or (tenant is not None and not self._latest.covers(tenant))
            ):
                self._demand.set()
                await self._changed.wait()
            return self._latest

    async def fresh(self, tenant: str | None = None) -> Snapshot:
        """A snapshot read less than one refresh period ago (covering ``tenant``, if given)."""
        latest = self._latest
        if (
            latest is not None
            and self.limits.clock() - self._latest_at < self.refresh_s
            and (tenant is None or latest.covers(tenant))
        ):
            return latest
        return await self.after(latest.seq if latest is not None else 0, tenant)

    # -- reading ------------------------------------------------------------------------

    async def read(self) -> Snapshot:
        lim = self.limits
        started = lim.clock()
        ping_ms: float | None = None
        try:
            await asyncio.wait_for(self.store.ping(), lim.call_timeout_s)
            ping_ms = round((lim.clock() - started) * 1000, 2)
        except (StoreUnavailableError, TimeoutError):
            pass
        policy = self.engine.policy
        if ping_ms is not None:
            with contextlib.suppress(StoreUnavailableError, TimeoutError):
                version = await asyncio.wait_for(self.store.policy_version(), lim.call_timeout_s)
                policy = await asyncio.wait_for(
                    self.engine.reload_policy(version), lim.call_timeout_s
                )
        names = sorted(policy.entitlements)
        chosen = sorted(set(names[: lim.max_tenants]) | (set(self._wanted) & set(names)))
        tenants: dict[str, TenantFigures] = {}
        deadline = lim.clock() + lim.read_budget_s
        for tenant in chosen:
            readable = ping_ms is not None and lim.clock() < deadline
            tenants[tenant] = await self._tenant(policy, tenant, readable)
        rates, window = self._rates.advance(lim.clock(), self.sources.totals())
        spool = self.sources.spool_depth
        return Snapshot(
            seq=(self._latest.seq if self._latest is not None else 0) + 1,
            read_at_ms=lim.wall_ms(),
            health=self.sources.health(),
            policy_version=policy.version,
            store_reachable=ping_ms is not None,
            store_ping_ms=ping_ms,
            breaker=self.engine.breaker.state.name.lower().replace("_", "-"),
            spool_depth=spool() if spool is not None else None,
            tenant_names=frozenset(names),
            tenants=tenants,
            rates=rates,
            window_s=window,
            worker=self.sources.worker,
            workers=self.sources.workers,
            refresh_s=self.refresh_s,
        )

    async def _tenant(self, policy: Policy, tenant: str, readable: bool) -> TenantFigures:
        ent = policy.entitlements[tenant]
        suspended = sorted(
            (s, k, reason) for (t, s, k), reason in policy.suspensions.items() if t == tenant
        )
        figures: list[LimitFigure] = []
        read = readable
        # the tenant's own limits, then each named slice's slice-scope ones (key-scope limits
        # have one counter per key: `chargepath state TENANT --key K` shows those)
        subjects = [Subject(tenant)] + [
            Subject(tenant, s) for s in sorted(ent.slice_plans)[: self.limits.max_slices]
        ]
        for subject in subjects:
            if not read:
                break
            wanted = Scope.SLICE if subject.slice else Scope.TENANT
            limits = tuple(lim for _, lim in tenant_limits(policy, subject) if lim.scope is wanted)
            if not limits:
                continue
            try:
                _, readings, _ = await asyncio.wait_for(
                    self.state.read_limits(subject, limits), self.limits.call_timeout_s
                )
            except (StoreUnavailableError, TimeoutError):
                read = False
                break
            figures += (
                LimitFigure(
                    subject.slice,
                    r.limit.name,
                    r.limit.kind,
                    r.limit.scope,
                    r.limit.soft,
                    r.used,
                    r.capacity,
                    r.remaining,
                    r.reset_after_ms / 1000,
                )
                for r in readings
            )
        return TenantFigures(
            tenant=tenant,
            plan=ent.plan or "",
            failure_mode=ent.failure_mode,
            read=read,
            limits=tuple(figures) if read else (),
            suspensions=tuple(suspended[:MAX_SUSPENSIONS]),
            suspensions_total=len(suspended),
        )
