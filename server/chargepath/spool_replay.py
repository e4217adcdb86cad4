"""Replays the spool (:mod:`chargepath.store.spool`) into the store once it answers again.

It lives beside the engine, not in ``store/spool.py``: like the engine it turns usages into
store calls with the live policy (resolving limits, retrying a stale version) and reads
verdicts, while the spool itself is only durable storage and knows nothing of policies or of
Redis. Keeping them apart keeps ``store/spool.py`` free of the store contract and lets the
lead start the replayer where the engine is built.

Replay semantics:

* Usages are replayed in append order, a batch at a time, one atomic store call per tenant
  of the batch (the order of one tenant's usages is kept; tenants are independent). A batch is
  settled (removed from the spool) only after the store answered for it. If the store fails
  again mid-replay, the tenants already answered are settled and the rest stays, in order, for
  the next round.
* Every usage is replayed as a REPORT under its request id's dedup record, with the spooled
  fingerprint (that of the usage as first sent) and the degraded verdict's decision id:
  - a report is replayed as the same report;
  - an admit allowed under fail-open already let the work happen, so it is replayed as a report
    of the same usage: debited and recorded even past a limit (an admit replayed as an admit
    could be refused now, and the work would never be billed). Its ledger entry says
    ``report``. Its dedup record keeps the admit's fingerprint, so a late resend of the admit
    is answered from it (recorded) rather than decided again;
  - a stream usage is replayed under its request id too (with its session fingerprint), not
    under its session and sequence:
    by the time the store is back the session has usually moved on (past the replay window a
    sequence is refused, and a session reused by a restarted controller could hold another
    usage at that sequence). Before that, its session slot is read: a slot that holds the
    sequence as recorded (a late commit, or a resend decided after the outage) means the usage
    is already in the ledger.
* Exactly once: a usage whose first attempt committed late (after its degraded verdict) finds
  that attempt's dedup record (same request id and fingerprint) and is not recorded again; a
  usage replayed and not yet settled when the gateway died finds its replay's record the same
  way.
* A refusal nobody was told: an admit answered ALLOW by a fail-open policy and spooled whose
  first attempt still reached Redis, before its deadline on Redis' clock, and was refused
  there (the bucket was empty) left a request-id record holding that refusal, not recorded,
  with the degraded verdict's own decision id. The caller acted on the ALLOW, so the replay
  records the usage (``decide.lua``, in the same script: as a report, past limits if need
  be) and rewrites the record to say recorded: a later resend of the admit, and a second
  replay, are answered from it. A refusal a caller was told is never overridden: one under
  another decision id (the request id was decided again, by a resend), or one a resend was
  answered from (``decide.lua`` marks such a record told): the usage is dropped and logged,
  since the last answer its caller had was that refusal.
* Both hold while the dedup record lives: within the store's dedup window of the late
  commit or the replay. A usage spooled longer ago than that is still replayed (losing it is
  surely wrong, doubling it only possibly), and counted in :attr:`ReplayRound.past_window`.
* Time: the replay's ledger entry keeps the usage's ``occurred_at_ms``; a usage that had none
  gets the time it was spooled, so billing sees when it happened, not when it was replayed.
  Its limits and version are those of the policy live at replay time (the store refuses any
  other).
* Holds: a usage spooled while its first store call was still in flight is held (see
  :mod:`chargepath.store.spool`): the replay stops at it, for its tenant, until the engine
  has read that call's late reply and settled it (recorded late: it leaves the spool as
  already recorded, never replayed) or released it, or until the hold lapses (the process
  died): then the store's records answer, as below.
* Stream usages and the session window: a stream usage whose first attempt committed late
  is found by its request id's dedup record whatever the session window says, because
  ``decide.lua`` writes that record too for a session usage of a batch that ran past its
  doubt time (``ARG_DOUBT``: half the store timeout; always with a replica wait), and the
  spool keeps that attempt's fingerprint. A replay that ran first is found the same way by a
  late first attempt, which then records nothing. docs/design.md, "Late commits and the
  spool", goes through every order.
* Caps: a replay is never refused by a tenant cap (``CAP_REACHED``): its usages were
  acknowledged already, and caps bound the memory taken by new keys of usages not yet
  acknowledged. A replay may take a tenant past a cap; the next new usages are refused.
* One process replays at a time: the one holding the spool's replay lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from chargepath.core.model import Mode, Reason, Usage, Verdict
from chargepath.core.policy import Policy
from chargepath.engine import session_fingerprint
from chargepath.store import protocol
from chargepath.store.base import (
    DecideItem,
    MeteringStore,
    StalePolicyError,
    StoreUnavailableError,
)
from chargepath.store.connect import RedisClient
from chargepath.store.redis_store import tenant_prefix
from chargepath.store.spool import (
    Outcome,
    Spool,
    SpooledUsage,
    SpoolRecord,
    wall_ms,
    worker_holder,
)

log = logging.getLogger("chargepath.spool")

STALE_RETRIES = 3


class SessionSlots(Protocol):
    async def recorded(self, tenant: str, probes: Sequence[tuple[str, int, str]]) -> list[bool]:
        """Per ``(session_id, sequence, fingerprint)`` of ``tenant``: whether the session's
        slot holds that sequence as recorded, for that usage (its
        :func:`~chargepath.engine.session_fingerprint`; another usage at that sequence is
        not this one). Raises :class:`StoreUnavailableError` if the store is away."""
        ...


class RedisSessionSlots:
    """:class:`SessionSlots` read from the session keys that ``decide.lua`` writes (one
    pipelined GETRANGE per probe; the layout is ``lib/dedup.lua``'s, its widths in
    :mod:`chargepath.store.protocol`). ``window`` must be the store's ``session_window``."""

    def __init__(self, client: RedisClient, window: int) -> None:
        self.client = client
        self.window = window

    async def recorded(self, tenant: str, probes: Sequence[tuple[str, int, str]]) -> list[bool]:
        if not probes:
            return []
        prefix = tenant_prefix(tenant)
        header, size = protocol.SESSION_SEQ_DIGITS, protocol.SESSION_SLOT
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for session_id, sequence, _ in probes:
                    start = header + (sequence % self.window) * size
                    pipe.getrange(f"{prefix}s:{session_id}", start, start + size - 1)
                slots = await pipe.execute()
        except Exception as exc:  # redis-py raises RedisError or OSError subclasses
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        out = []
        recorded = str(protocol.VERDICT_RECORDED)
        for (_, sequence, fp), slot in zip(probes, slots, strict=True):
            text = slot.decode() if isinstance(slot, bytes) else str(slot)
            out.append(
                len(text) == size
                and text[:header].isdigit()
                and int(text[:header]) == sequence
                and text[protocol.SESSION_SLOT_RECORDED] == recorded
                and text[size - protocol.SESSION_FP_CHARS :] == fp
            )
        return out


def outcome_of(entry: SpooledUsage, verdict: Verdict) -> tuple[Outcome, str]:
    """How a replayed usage leaves the spool, from the store's verdict, and why if dropped."""
    if verdict.recorded:
        return (Outcome.ALREADY_RECORDED if verdict.replayed else Outcome.REPLAYED), ""
    if verdict.reason is Reason.INVALID_USAGE:
        return Outcome.DROPPED, f"refused as invalid: {verdict.message}"
    if verdict.replayed and verdict.decision_id == entry.decision_id:
        # its first attempt, decided late as a refusal: decide.lua records the replay over
        # it unless a resend was answered that refusal (the record is marked told)
        return Outcome.DROPPED, (
            f"its first attempt was decided late by the store as {verdict.reason.name}, not "
            "recorded, and a resend of it was answered that refusal"
        )
    if verdict.replayed:
        return Outcome.DROPPED, (
            f"the request id was decided again (decision {verdict.decision_id}) as "
            f"{verdict.reason.name}, not recorded"
        )
    return Outcome.DROPPED, f"the store refused to record it ({verdict.reason.name})"


def replay_usage(entry: SpooledUsage) -> Usage:
    """The usage as it is replayed: a report under its request id (no session), with the
    time it happened."""
    u = entry.usage
    return u._replace(
        mode=Mode.REPORT,
        session_id="",
        sequence=0,
        occurred_at_ms=u.occurred_at_ms or entry.spooled_at_ms,
    )


@dataclass(frozen=True, slots=True)
class ReplayRound:
    """What one round did. ``claimed``: this process held the replay lease; ``store_error``:
    the store failed mid-round (the usages not answered are still spooled)."""

    claimed: bool
    replayed: int = 0
    already_recorded: int = 0
    dropped: int = 0
    past_window: int = 0
    left: int = 0
    store_error: str = ""

    @property
    def settled(self) -> int:
        return self.replayed + self.already_recorded + self.dropped


class SpoolReplayer:
    """Replays ``spool`` into ``store`` with the live policy.

    ``policy`` returns the policy in use (the engine's); ``reload_policy(version)`` loads one at
    least that new (the engine's ``reload_policy``). ``session_slots`` reads stream sessions
    (None: stream usages are checked by their request id only). ``store_timeout_s`` bounds a
    store call. ``dedup_window_ms`` is the store's dedup window (see the module's
    exactly-once note).
    """

    def __init__(
        self,
        spool: Spool,
        store: MeteringStore,
        policy: Callable[[], Policy],
        reload_policy: Callable[[int], Awaitable[Policy]],
        *,
        session_slots: SessionSlots | None = None,
        holder: str | None = None,
        batch_size: int = 256,
        store_timeout_s: float = 2.0,
        lease_ms: int = 30_000,
        dedup_window_ms: int = 600_000,
        clock_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self.spool = spool
        self.store = store
        self.policy = policy
        self.reload_policy = reload_policy
        self.session_slots = session_slots
        self.holder = holder or worker_holder()
        self.batch_size = batch_size
        self.store_timeout_s = store_timeout_s
        self.lease_ms = lease_ms
        self.dedup_window_ms = dedup_window_ms
        self.clock_ms = clock_ms

    async def replay_once(self) -> ReplayRound:
        """Replay the oldest batch of the spool, if this process holds the replay lease."""
        if not await self.spool.claim_replay(self.holder, self.lease_ms):
            return ReplayRound(claimed=False)
        records = await self.spool.head(self.batch_size)
        by_tenant: dict[str, list[SpoolRecord]] = {}
        for r in records:
            by_tenant.setdefault(r.entry.usage.subject.tenant, []).append(r)
        outcomes: list[tuple[int, Outcome]] = []
        error = ""
        for tenant, recs in by_tenant.items():
            try:
                outcomes += await self._replay_tenant(tenant, recs)
            except (StoreUnavailableError, TimeoutError) as exc:
                error = str(exc) or "store timeout"
                log.warning(
                    "spool replay stopped, %d usage(s) kept for later: %s",
                    len(records) - len(outcomes),
                    error,
                )
                break
        await self.spool.settle(outcomes)
        now = self.clock_ms()
        settled = {seq for seq, _ in outcomes}
        counts = {o: sum(1 for _, x in outcomes if x is o) for o in Outcome}
        past_window = sum(
            1
            for r in records
            if r.seq in settled and now - r.entry.spooled_at_ms > self.dedup_window_ms
        )
        if past_window:
            log.warning(
                "%d spooled usage(s) replayed later than the dedup window after they were "
                "spooled: had their first attempt committed late, they are now doubled",
                past_window,
            )
        return ReplayRound(
            claimed=True,
            replayed=counts[Outcome.REPLAYED],
            already_recorded=counts[Outcome.ALREADY_RECORDED],
            dropped=counts[Outcome.DROPPED],
            past_window=past_window,
            left=(await self.spool.stats()).depth,
            store_error=error,
        )

    async def run(self, stop: asyncio.Event, *, idle_s: float = 1.0) -> None:
        """Replay until ``stop`` is set: batch after batch while the spool holds usages and the
        store answers; otherwise look again every ``idle_s``. The lease is released when the
        spool is empty or on stop."""
        try:
            while not stop.is_set():
                try:
                    # an empty spool is only read: claiming the lease is a write (an fsync)
                    empty = not (await self.spool.stats()).depth
                    round_ = ReplayRound(claimed=False) if empty else await self.replay_once()
                except Exception:  # a bug or a disk error: log, keep the gateway serving
                    log.exception("spool replay round failed")
                    round_ = ReplayRound(claimed=False)
                if round_.claimed and round_.settled and not round_.store_error:
                    if round_.left:
                        continue
                    log.info("spool replayed: empty again")
                if round_.claimed and not round_.left:
                    await self.spool.release_replay(self.holder)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), idle_s)
        finally:
            try:
                await self.spool.release_replay(self.holder)
            except Exception as exc:  # the spool is closing: the lease lapses by itself
                log.debug("replay lease not released: %s", exc)

    async def _replay_tenant(
        self, tenant: str, records: list[SpoolRecord]
    ) -> list[tuple[int, Outcome]]:
        outcomes: list[tuple[int, Outcome]] = []
        now = self.clock_ms()
        held = next((n for n, r in enumerate(records) if r.held_until_ms > now), None)
        if held is not None:
            # its first store call is still in flight: the engine settles it when the late
            # reply comes in; the tenant's later usages wait behind it (order is kept)
            records = records[:held]
        todo = records
        sessions = [r for r in records if r.entry.usage.session_id]
        if sessions and self.session_slots is not None:
            found = await asyncio.wait_for(
                self.session_slots.recorded(
                    tenant,
                    [
                        (
                            r.entry.usage.session_id,
                            r.entry.usage.sequence,
                            session_fingerprint(r.entry.usage),
                        )
                        for r in sessions
                    ],
                ),
                self.store_timeout_s,
            )
            seen = {r.seq for r, hit in zip(sessions, found, strict=True) if hit}
            outcomes += [(seq, Outcome.ALREADY_RECORDED) for seq in sorted(seen)]
            todo = [r for r in records if r.seq not in seen]
        if not todo:
            return outcomes
        policy = self.policy()
        for _ in range(STALE_RETRIES):
            items = [
                DecideItem(
                    replay_usage(r.entry),
                    policy.resolve(r.entry.usage.subject, r.entry.usage.metric),
                    r.entry.decision_id,
                    r.entry.fingerprint,
                    r.entry.trace_id,
                    policy.suspension(r.entry.usage.subject) is not None,
                )
                for r in todo
            ]
            try:
                verdicts = await asyncio.wait_for(
                    self.store.decide(tenant, policy.version, items, replay=True),
                    self.store_timeout_s,
                )
            except StalePolicyError as exc:
                policy = await asyncio.wait_for(
                    self.reload_policy(exc.stamped_version), self.store_timeout_s
                )
                continue
            for r, v in zip(todo, verdicts, strict=True):
                outcome, why = outcome_of(r.entry, v)
                if outcome is Outcome.DROPPED:
                    log.warning(
                        "spooled usage dropped, nothing recorded: tenant %s request_id %s "
                        "decision_id %s amount %d of %s: %s",
                        tenant,
                        r.entry.usage.request_id,
                        r.entry.decision_id,
                        r.entry.usage.amount,
                        r.entry.usage.metric,
                        why,
                    )
                outcomes.append((r.seq, outcome))
            return outcomes
        raise StoreUnavailableError(f"policy still stale after {STALE_RETRIES} reloads")
