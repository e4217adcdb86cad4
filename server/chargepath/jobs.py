"""The background jobs of a gateway process.

:func:`chargepath.app.build` constructs them and :class:`chargepath.app.Gateway` starts one task
per job once the server serves, then cancels them when it stops. Each job runs until
``draining`` is set. None of them is on the path of a decision: a decision is right without
them (the store refuses a decision on a stale policy version, and every write is atomic in
Redis); they keep the health service, the policy in memory, the ledger feed and the ledger
metrics current, and replay the outage spool. A job survives a store that fails or is slow:
it tries again next period.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from redis.exceptions import RedisError

from chargepath.core.model import LimitKind, Scope, Subject
from chargepath.engine import Engine
from chargepath.settings import store_timeout_ms_for
from chargepath.spool_replay import SpoolReplayer
from chargepath.store.base import (
    LeaseStore,
    LedgerStore,
    MeteringStore,
    StateStore,
    StoreMemory,
    StorePersistence,
    StoreUnavailableError,
)
from chargepath.telemetry import QuotaLevel, Telemetry

log = logging.getLogger("chargepath")


class Job(Protocol):
    """A periodic task of a gateway process."""

    #: Name of the asyncio task (seen in task dumps and stall reports).
    name: str

    async def run(self, draining: asyncio.Event) -> None:
        """Repeat until ``draining`` is set; may also be cancelled at any await."""
        ...


class StoreProbe:
    """Every ``period_s`` (``health_probe_ms``), ping the store within ``timeout_s`` and pass
    the outcome to ``set_serving``: the health service turns NOT_SERVING at most one period
    plus ``timeout_s`` after the store stops answering, and SERVING again at most one period
    after it answers. It probes first, then sleeps. Once the gateway drains, it reports
    nothing more (draining owns the health status then)."""

    name = "probe-store"

    def __init__(
        self,
        store: MeteringStore,
        set_serving: Callable[[bool], Awaitable[None]],
        *,
        period_s: float,
        timeout_s: float,
    ) -> None:
        self.store = store
        self.set_serving = set_serving
        self.period_s = period_s
        self.timeout_s = timeout_s

    async def run(self, draining: asyncio.Event) -> None:
        while not draining.is_set():
            try:
                await asyncio.wait_for(self.store.ping(), self.timeout_s)
                ok = True
            except (StoreUnavailableError, TimeoutError):
                ok = False
            if not draining.is_set():
                await self.set_serving(ok)
            await asyncio.sleep(self.period_s)


class PolicyWatch:
    """Every ``period_s`` (``policy_poll_ms``), read the store's policy version and, when it is
    newer than the engine's, reload the policy: a policy published by any process (another
    gateway, the admin API, the supervisor) is in this process's memory at most one period plus
    3 s (the bounds on the two store calls) later, even if no decision of its own met the new
    version first. A failed or slow read is skipped until the next period."""

    name = "poll-policy"

    def __init__(self, store: MeteringStore, engine: Engine, *, period_s: float) -> None:
        self.store = store
        self.engine = engine
        self.period_s = period_s

    async def run(self, draining: asyncio.Event) -> None:
        while not draining.is_set():
            await asyncio.sleep(self.period_s)
            with contextlib.suppress(StoreUnavailableError, TimeoutError):
                version = await asyncio.wait_for(self.store.policy_version(), 1.0)
                if version > self.engine.policy.version:
                    await asyncio.wait_for(self.engine.reload_policy(version), 2.0)


class AggregateFlush:
    """Every second, move the ledger aggregates whose interval has ended into the ledger, for
    each tenant whose plans aggregate admits (``ledger: {mode: aggregate}``): a closed
    aggregate reaches the ledger about a second after its interval ends. Each flush is one
    atomic script, so every gateway process may run it and an aggregate is still written once.
    A flush that fails or takes over a second ends the round (logged); the next round retries."""

    name = "flush-aggregates"

    def __init__(self, ledger: LedgerStore, engine: Engine, *, clock_offset_ms: int = 0) -> None:
        self.ledger = ledger
        self.engine = engine
        self.clock_offset_ms = clock_offset_ms

    async def run(self, draining: asyncio.Event) -> None:
        while not draining.is_set():
            await asyncio.sleep(1.0)
            tenants = [t for t, ms in self.engine.policy.aggregate_ms.items() if ms]
            for tenant in tenants:
                try:
                    await asyncio.wait_for(
                        self.ledger.flush_aggregates(tenant, clock_offset_ms=self.clock_offset_ms),
                        1.0,
                    )
                except (RedisError, OSError, TimeoutError) as exc:
                    log.warning("ledger aggregates of %s not flushed yet: %s", tenant, exc)
                    break


class LeaseSweep:
    """Every ``period_s``, close the quota leases whose validity has passed, for each tenant
    whose plans grant leases (in any policy version this process has seen: leases opened under
    an older version still expire): each tenant's sweep is one atomic script that gives back
    what its expired leases still hold (``lease_sweep.lua``), so every gateway process may run
    it and a lease is still closed once. An expired lease is also closed when it is next
    touched; the sweep is for the holders that never come back (a process that died). A
    sweep that fails ends the round (logged); the next round retries."""

    name = "lease-sweep"

    def __init__(self, leases: LeaseStore, engine: Engine, *, period_s: float = 1.0) -> None:
        self.leases = leases
        self.engine = engine
        self.period_s = period_s
        self._tenants: set[str] = set()
        self._version = -1

    def tenants(self) -> list[str]:
        """The tenants to sweep: those with a limit that has lease settings, in this or an
        earlier policy version seen here."""
        policy = self.engine.policy
        if policy.version != self._version:
            self._version = policy.version
            for name, ent in policy.entitlements.items():
                limits = [lim for _, lim in ent.limits]
                limits += [lim for group in ent.slice_limits.values() for _, lim in group]
                if any(lim.lease is not None for lim in limits):
                    self._tenants.add(name)
        return sorted(self._tenants)

    async def sweep_once(self) -> int:
        """One round; the number of leases closed."""
        closed = 0
        for tenant in self.tenants():
            try:
                closed += await asyncio.wait_for(self.leases.sweep(tenant), 1.0)
            except (StoreUnavailableError, TimeoutError) as exc:
                log.warning("expired leases of %s not swept yet: %s", tenant, exc)
                break
        return closed

    async def run(self, draining: asyncio.Event) -> None:
        while not draining.is_set():
            await asyncio.sleep(self.period_s)
            await self.sweep_once()


class LedgerLag:
    """Every ``period_s`` (``ledger_lag_interval_ms``), measure per tenant (the first
    ``max_tenants`` by name) and consumer group the ledger entries billing has not acknowledged
    yet, and hand them to the ``chargepath.ledger.lag`` gauge: the figure to alert on, since it
    grows when billing stops reading, and so does Redis memory. It measures first, then sleeps.
    A tenant that cannot be read (no ledger yet, or the store is away) is left out of the
    round; a round that reads nothing keeps the last figures."""

    name = "ledger-lag"

    def __init__(
        self,
        ledger: LedgerStore,
        engine: Engine,
        telemetry: Telemetry,
        *,
        period_s: float,
        max_tenants: int = 1000,
    ) -> None:
        self.ledger = ledger
        self.engine = engine
        self.telemetry = telemetry
        self.period_s = period_s
        self.max_tenants = max_tenants

    async def run(self, draining: asyncio.Event) -> None:
        while not draining.is_set():
            lags: dict[tuple[str, str], int] = {}
            for tenant in sorted(self.engine.policy.entitlements)[: self.max_tenants]:
                try:
                    for name in await self.ledger.groups(tenant):
                        lags[(tenant, name)] = await self.ledger.lag(tenant, name)
                except (RedisError, OSError, LookupError):
                    continue
            if lags:
                self.telemetry.ledger_lag = lags
            await asyncio.sleep(self.period_s)


class RedisMemory:
    """Every ``period_s`` (``redis_memory_interval_ms``), read the store's memory (Redis INFO
    memory: used_memory, maxmemory, maxmemory_policy) and hand it to the
    ``chargepath.redis.memory.*`` gauges, so that an alert fires before Redis refuses writes
    (README: alert on ``chargepath_redis_memory_utilization > 0.8``). It reads first,
    then sleeps; a failed read keeps the last figures. A Redis that may evict (any policy but
    ``noeviction``) is logged once: an evicted dedup record, session or ledger entry is a
    charge lost or counted twice."""

    name = "redis-memory"

    def __init__(
        self,
        read: Callable[[], Awaitable[StoreMemory]],
        telemetry: Telemetry,
        *,
        period_s: float,
    ) -> None:
        self.read = read
        self.telemetry = telemetry
        self.period_s = period_s
        self._warned = False

    async def run(self, draining: asyncio.Event) -> None:
        while not draining.is_set():
            try:
                memory = await asyncio.wait_for(self.read(), 1.0)
            except (StoreUnavailableError, TimeoutError):
                memory = None
            if memory is not None:
                self.telemetry.store_memory = memory
                if memory.policy not in ("noeviction", "") and not self._warned:
                    self._warned = True
                    log.warning(
                        "Redis maxmemory-policy is %s: past maxmemory it evicts keys, and an "
                        "evicted dedup record, session or ledger entry is a charge lost or "
                        "counted twice; set maxmemory-policy noeviction",
                        memory.policy,
                    )
            await asyncio.sleep(self.period_s)


class StoreTimeoutSizing:
    """Without ``--store-timeout-ms`` (``configured_ms`` 0): size the store timeout from how
    Redis persists (``settings.store_timeout_ms_for``), once at start (:meth:`size`, before the
    gateway serves) and every ``period_s`` after: a data set that grows makes Redis' forks
    longer, and an operator may turn ``appendfsync always`` on or off. The breaker's probe
    waits at least as long as the timeout (a PING waits behind the same fork or flush). Each
    change is logged with its reason; a failed read keeps the timeout as it is."""

    name = "store-timeout-sizing"

    def __init__(
        self,
        read: Callable[[], Awaitable[StorePersistence]],
        engine: Engine,
        *,
        configured_ms: int,
        period_s: float = 60.0,
    ) -> None:
        self.read = read
        self.engine = engine
        self.configured_ms = configured_ms
        self.period_s = period_s
        self.timeout_ms = 0  # not sized yet

    async def size(self) -> int:
        """Read Redis (unless configured), apply the timeout if it changed; the timeout."""
        persistence: StorePersistence | None = None
        if not self.configured_ms:
            try:
                persistence = await asyncio.wait_for(self.read(), 2.0)
            except (StoreUnavailableError, TimeoutError):
                if self.timeout_ms:
                    return self.timeout_ms  # keep it: Redis did not answer this time
        timeout_ms, why = store_timeout_ms_for(self.configured_ms, persistence)
        if timeout_ms != self.timeout_ms:
            settings = self.engine.settings
            self.engine.settings = dataclasses.replace(
                settings,
                store_timeout_s=timeout_ms / 1000,
                store_probe_timeout_s=max(settings.store_probe_timeout_s, timeout_ms / 1000),
            )
            log.info(
                "store timeout %d ms (%s)%s",
                timeout_ms,
                why,
                f", was {self.timeout_ms} ms" if self.timeout_ms else "",
            )
            self.timeout_ms = timeout_ms
        return timeout_ms

    async def run(self, draining: asyncio.Event) -> None:
        if self.configured_ms:
            return
        while not draining.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(draining.wait(), self.period_s)
                return
            await self.size()


class SpoolReplay:
    """Replay the outage spool into the store (:class:`chargepath.spool_replay.SpoolReplayer`):
    batch after batch while it holds usages and the store answers, else one look every
    ``idle_s`` (a store still away costs one failed attempt per look). Every process of a
    data folder runs it; the one holding the spool's replay lease replays. Usages left by an
    earlier run, of this process or another, are replayed like the others."""

    name = "replay-spool"

    def __init__(self, replayer: SpoolReplayer, *, idle_s: float = 1.0) -> None:
        self.replayer = replayer
        self.idle_s = idle_s

    async def run(self, draining: asyncio.Event) -> None:
        await self.replayer.run(draining, idle_s=self.idle_s)


class QuotaBurn:
    """Every ``period_s`` (``quota_burn_interval_ms``), read the tenant-scope period quotas
    (used, limit with the period's grants, time to reset) of the tenants that keep their own
    label on the per-tenant metrics (:meth:`Telemetry.labelled_tenants`: the busiest
    ``metrics_top_tenants``, ranked among the policy's first ``max_tenants`` tenants by name
    and those that decided), and hand them to the ``chargepath.quota.*`` gauges. It reads
    first, then sleeps: with the store up, the gauges are there from the first scrape. A
    tenant that cannot be read within a second keeps its last figures."""

    name = "quota-burn"

    def __init__(
        self,
        state: StateStore,
        engine: Engine,
        telemetry: Telemetry,
        *,
        period_s: float,
        max_tenants: int = 1000,
    ) -> None:
        self.state = state
        self.engine = engine
        self.telemetry = telemetry
        self.period_s = period_s
        self.max_tenants = max_tenants

    async def run(self, draining: asyncio.Event) -> None:
        while not draining.is_set():
            policy = self.engine.policy
            labelled = self.telemetry.labelled_tenants(
                sorted(policy.entitlements)[: self.max_tenants]
            )
            last = self.telemetry.quota
            levels: dict[tuple[str, str], QuotaLevel] = {}
            for tenant in sorted(labelled):
                entitlement = policy.entitlements.get(tenant)
                if entitlement is None:
                    continue
                quotas = tuple(
                    {
                        limit.name: limit
                        for _, limit in entitlement.limits
                        if limit.kind is LimitKind.QUOTA and limit.scope is Scope.TENANT
                    }.values()
                )
                if not quotas:
                    continue
                try:
                    _, readings, _ = await asyncio.wait_for(
                        self.state.read_limits(Subject(tenant), quotas), 1.0
                    )
                except (StoreUnavailableError, TimeoutError):
                    levels.update({k: v for k, v in last.items() if k[0] == tenant})
                    continue
                for r in readings:
                    levels[(tenant, r.limit.name)] = QuotaLevel(
                        r.used, r.capacity, r.reset_after_ms / 1000
                    )
            self.telemetry.quota = levels
            await asyncio.sleep(self.period_s)
