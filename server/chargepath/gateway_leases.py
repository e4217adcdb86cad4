"""Gateway-held leases: Check admits answered from a lease the gateway process holds on a hot
(tenant, slice, key, metric), without a round trip to the store (issue #16, item 5).

A limit opts in with ``lease: {gateway: true}`` (every limit the usage matches must). The
first admits of a subject and metric go to the store as usual and mark it wanted; the
background job then opens a lease on it (:class:`~chargepath.leasing.Leasing`: the units are
taken from every limit, all or nothing, sized by the lease settings). While the lease lasts,
an admit that fits what is left of it is answered ALLOW here, ``leased = true``,
``recorded = false``, and its usage joins the lease's pending reports. Every ``interval_s``
(100 ms) the job records each lease's pending admits (``store/scripts/gateway_report.lua``:
one ledger entry and dedup record per request id; an id already recorded elsewhere is not
recorded again, its units are credited back to the lease), renews a lease that runs low or
nears its end, opens the wanted ones, and releases the idle ones. Draining reports and
releases every lease.

Bounds:

* **Exact.** A leased admit spends units the lease took from the limits, so the limits never
  admit more than they allow (DESIGN property 1). The lease is not used past ``margin_ms``
  before its expiry (counted from when its ask was sent), so that the last report reaches
  the store while the lease is open; a report that finds it gone records its admits as
  reports through the engine (they debit the limits then, into debt if need be).
* **Crash.** A process that dies loses the admits it answered and had not reported yet: at
  most the units taken from its leases since their last report (one interval, plus a report
  in flight), per lease at most what it had available then: its last grant plus what was
  left below the renewal threshold. The leases' units come back to the limits at their
  expiry (the sweeper), including those unreported ones.
* **Retries.** An admit marked as a retry (``chargepath-retry``) goes to the store: if its
  first answer came from a lease here and is not reported yet, the store decides it afresh,
  and the report then finds its record and credits it back: counted once. The same request id
  again, unmarked, on this process, gets its first answer (``replayed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from chargepath.core.leases import LeaseAnswer, LeaseAsk
from chargepath.core.model import Decision, Mode, Reason, Subject, Usage, Verdict
from chargepath.engine import Engine, fingerprint, monotonic_ms, new_decision_id
from chargepath.leasing import Leasing
from chargepath.store.base import StoreUnavailableError
from chargepath.store.gateway_report import GatewayReport, LeasedAdmit, RedisGatewayReports

log = logging.getLogger("chargepath.gateway_leases")

LEASED_MESSAGE = (
    "counted against a lease this gateway holds; recorded in the ledger within the report interval"
)

_Key = tuple[str, str, str, str]  # tenant, slice, key, metric


@dataclass(slots=True)
class _Held:
    key: _Key
    lease_id: str
    version: int
    available: int
    renew_below: int
    until_ms: int  # local clock: nothing is answered from it from then on
    last_used_ms: int
    pending: list[LeasedAdmit] = field(default_factory=list)


@dataclass(slots=True)
class GatewayLeaseStats:
    answered: int = 0
    replayed: int = 0
    reported: int = 0
    credited: int = 0
    as_reports: int = 0
    opened: int = 0
    renewed: int = 0
    released: int = 0
    refused: int = 0
    held: int = 0


class GatewayLeases:
    """The leases of one gateway process and the admits answered from them. ``answer`` is
    called on the engine's hot path (no I/O); :meth:`run` is the background job. Not
    thread-safe: one event loop."""

    name = "gateway-leases"

    def __init__(
        self,
        engine: Engine,
        leasing: Leasing,
        reports: RedisGatewayReports,
        *,
        interval_s: float = 0.1,
        max_held: int = 10_000,
        idle_ms: int = 5_000,
        margin_ms: int = 2_000,
        want: int = 1_000_000,
        clock_ms: Callable[[], int] = monotonic_ms,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        holder: str = "",
    ) -> None:
        self.engine = engine
        self.leasing = leasing
        self.reports = reports
        self.interval_s = interval_s
        self.max_held = max_held
        self.idle_ms = idle_ms
        self.margin_ms = margin_ms
        self.want = want
        self._clock_ms = clock_ms
        self._wall_ms = wall_ms
        self.holder = holder or f"gateway:{os.uname().nodename}:{os.getpid()}"
        self._held: dict[_Key, _Held] = {}
        self._wanted: OrderedDict[_Key, None] = OrderedDict()
        self._eligible: dict[tuple[_Key, int], bool] = {}
        self._answered: OrderedDict[tuple[str, str], tuple[tuple[str, str, str, int], Verdict]]
        self._answered = OrderedDict()
        self._wake = asyncio.Event()
        self._asks = 0
        self.stats = GatewayLeaseStats()

    # -- the hot path -----------------------------------------------------------------------

    def _is_eligible(self, usage: Usage, key: _Key, version: int) -> bool:
        known = self._eligible.get((key, version))
        if known is None:
            policy = self.engine.policy
            res = policy.resolve(usage.subject, usage.metric)
            known = (
                res.entitled
                and bool(res.limits)
                and all(lim.lease is not None and lim.lease.gateway for lim in res.limits)
                and policy.suspension(usage.subject) is None
            )
            if len(self._eligible) >= 4 * self.max_held:
                self._eligible.clear()
            self._eligible[(key, version)] = known
        return known

    def answer(self, usage: Usage, policy_version: int, *, retried: bool = False) -> Verdict | None:
        """ALLOW ``usage`` (a valid admit) from a lease held on its subject and metric, or
        None: decide it in the store."""
        if usage.mode is not Mode.ADMIT:
            return None
        s = usage.subject
        rid = (s.tenant, usage.request_id)
        done = self._answered.get(rid)
        if done is not None and not retried:
            if done[0] == (s.slice, s.key, usage.metric, usage.amount):
                self.stats.replayed += 1
                return done[1]._replace(replayed=True)
            return None
        if retried:
            return None
        key = (s.tenant, s.slice, s.key, usage.metric)
        h = self._held.get(key)
        if h is None:
            if key not in self._wanted and self._is_eligible(usage, key, policy_version):
                self._wanted[key] = None
                if len(self._wanted) > self.max_held:
                    self._wanted.popitem(last=False)
                self._wake.set()
            return None
        now = self._clock_ms()
        if h.version != policy_version or now >= h.until_ms or h.available < usage.amount:
            self._wake.set()
            return None
        did = new_decision_id()
        h.available -= usage.amount
        h.pending.append(LeasedAdmit(usage, fingerprint(usage), did))
        h.last_used_ms = now
        if h.available < h.renew_below:
            self._wake.set()
        verdict = Verdict(
            request_id=usage.request_id,
            decision=Decision.ALLOW,
            reason=Reason.OK,
            decision_id=did,
            policy_version=policy_version,
            recorded=False,
            leased=True,
            message=LEASED_MESSAGE,
            decided_at_ms=self._wall_ms(),
        )
        self._answered[rid] = ((s.slice, s.key, usage.metric, usage.amount), verdict)
        if len(self._answered) > 100_000:
            self._answered.popitem(last=False)
        self.stats.answered += 1
        return verdict

    def snapshot(self) -> GatewayLeaseStats:
        self.stats.held = len(self._held)
        return self.stats

    def unreported(self) -> int:
        """Units answered from leases and not reported yet (what a crash now would lose)."""
        return sum(a.usage.amount for h in self._held.values() for a in h.pending)

    # -- the job ----------------------------------------------------------------------------

    async def run(self, draining: asyncio.Event) -> None:
        try:
            while not draining.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval_s)
                self._wake.clear()
                await self.round()
        finally:
            await asyncio.shield(self.close())

    async def close(self) -> None:
        """Report every pending admit and release every lease (a drain)."""
        for h in list(self._held.values()):
            await self._report(h)
            await self._release(h)

    async def round(self) -> None:
        """One pass: reports, then renewals, releases and openings."""
        for h in list(self._held.values()):
            if h.pending:
                await self._report(h)
        now = self._clock_ms()
        for h in list(self._held.values()):
            if h.key not in self._held:
                continue
            if not h.pending and now - h.last_used_ms > self.idle_ms:
                await self._release(h)
            elif (
                h.available < h.renew_below
                or now >= h.until_ms - self.margin_ms
                or h.version != self.engine.policy.version  # a new policy: renew under it
            ):
                await self._renew(h)
        while self._wanted and len(self._held) < self.max_held:
            key, _ = self._wanted.popitem(last=False)
            if key not in self._held:
                await self._open(key)

    def _next_id(self) -> str:
        self._asks += 1
        return f"gwl-{os.getpid()}-{time.time_ns()}-{self._asks}"

    async def _ask(self, ask: LeaseAsk) -> LeaseAnswer | None:
        try:
            (answer,) = await asyncio.wait_for(
                self.leasing.lease([ask], [self.holder]), max(1.0, 20 * self.interval_s)
            )
        except (StoreUnavailableError, TimeoutError):
            return None
        if answer.reason is Reason.STORE_UNAVAILABLE:
            return None
        return answer

    async def _open(self, key: _Key) -> None:
        tenant, slice_, k, metric = key
        sent = self._clock_ms()
        answer = await self._ask(
            LeaseAsk(self._next_id(), Subject(tenant, slice_, k), metric, requested=self.want)
        )
        if answer is None or answer.decision is not Decision.ALLOW or answer.granted <= 0:
            self.stats.refused += 1
            return
        self.stats.opened += 1
        self._held[key] = _Held(
            key,
            answer.lease_id,
            answer.policy_version,
            answer.available,
            answer.renew_below,
            sent + answer.valid_for_ms - self.margin_ms,
            sent,
        )

    async def _renew(self, h: _Held) -> None:
        tenant, slice_, k, metric = h.key
        sent = self._clock_ms()
        answer = await self._ask(
            LeaseAsk(
                self._next_id(),
                Subject(tenant, slice_, k),
                metric,
                lease_id=h.lease_id,
                requested=self.want,
            )
        )
        if answer is None:
            return
        if answer.closed or answer.reason is Reason.LEASE_EXPIRED:
            self._drop(h)
            return
        if answer.decision is Decision.ALLOW:
            self.stats.renewed += 1
            h.available = answer.available - sum(a.usage.amount for a in h.pending)
            h.renew_below = answer.renew_below
            h.version = answer.policy_version
            h.until_ms = sent + answer.valid_for_ms - self.margin_ms
        elif self._clock_ms() >= h.until_ms and not h.pending:
            await self._release(h)

    async def _release(self, h: _Held) -> None:
        if h.pending:
            return
        tenant, slice_, k, metric = h.key
        answer = await self._ask(
            LeaseAsk(
                self._next_id(),
                Subject(tenant, slice_, k),
                metric,
                lease_id=h.lease_id,
                release=True,
            )
        )
        if answer is not None:
            self.stats.released += 1
            self._drop(h)

    def _drop(self, h: _Held) -> None:
        if self._held.get(h.key) is h:
            del self._held[h.key]

    async def _report(self, h: _Held) -> None:
        batch = list(h.pending)
        if not batch:
            return
        tenant = h.key[0]
        try:
            done: GatewayReport = await asyncio.wait_for(
                self.reports.report(tenant, h.lease_id, h.version, batch),
                max(1.0, 20 * self.interval_s),
            )
        except (StoreUnavailableError, TimeoutError) as exc:
            log.warning("lease %s: %d admits not reported yet (%s)", h.lease_id, len(batch), exc)
            return
        if done.gone:
            # the lease closed under us: record the admits as reports (they debit the limits)
            self._drop(h)
            await self._as_reports(batch)
            del h.pending[: len(batch)]
            return
        del h.pending[: len(batch)]
        h.available += done.credited
        self.stats.reported += done.recorded
        self.stats.credited += done.credited

    async def _as_reports(self, batch: list[LeasedAdmit]) -> None:
        usages = [a.usage._replace(mode=Mode.REPORT) for a in batch]
        try:
            verdicts = await self.engine.decide_batch(usages)
        except Exception:  # keep the job alive; the log says which ids
            log.exception("leased admits not recorded: %s", [u.request_id for u in usages])
            return
        self.stats.as_reports += sum(1 for v in verdicts if v.recorded or v.replayed)
