"""The admin side of the Redis store: grants, live state, and the recent-decisions trail.

The trail is a capped Redis Stream per tenant (``cp:{T}:recent``, written by decide.lua in the
same step as the decisions): an entry ``e=b`` holds the decisions of one batch with every
limit's remaining units before and after (``e=d``, one decision, is what earlier versions
wrote), entries ``e=th`` are quota threshold crossings (80% and 100%). It serves
``GetState`` (the last decisions), ``ExplainDecision`` (a scan for the decision id) and
``WatchDecisions`` (a blocking read of new entries).
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisError

from chargepath.core.model import (
    Decision,
    DecisionRecord,
    LimitChange,
    LimitKind,
    Mode,
    Reason,
    Subject,
    ThresholdEvent,
)
from chargepath.core.periods import period_bounds
from chargepath.core.policy import Limit
from chargepath.store.base import GrantReading, LimitReading, StoreUnavailableError
from chargepath.store.redis_store import (
    RedisStore,
    grants_key,
    limit_key,
    read_script,
    tenant_prefix,
)


def recent_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}recent"


class AdminStore:
    """Reads and writes for the admin API, on the client of a :class:`RedisStore`."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.client = store.client
        self._grant = self.client.register_script(read_script("grant.lua"))

    @property
    def recent_length(self) -> int:
        """How many recent decisions the trail keeps per tenant (what explain can find)."""
        return self.store.recent_length

    async def grant(
        self, subject: Subject, limit: Limit, amount: int, expires_at_ms: int, note: str
    ) -> tuple[str, int, int] | None:
        """Add a grant; (grant id, capacity, remaining) after it, or None if the expiry is
        already past on the store's clock."""
        grant_id = os.urandom(8).hex()
        t = subject.tenant
        try:
            reply = await self._grant(
                keys=[
                    grants_key(t, limit, subject.slice, subject.key),
                    limit_key(t, limit, subject.slice, subject.key),
                ],
                args=[
                    grant_id,
                    amount,
                    expires_at_ms,
                    int(limit.period),
                    self.store.clock_offset_ms,
                    limit.amount,
                ],
            )
            if reply[0] == -1:
                return None
            if note:
                notes = f"{tenant_prefix(t)}gnotes"
                await self.client.hset(notes, grant_id, note)
                await self.client.pexpire(notes, 40 * 86_400_000)
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        return grant_id, int(reply[0]), int(reply[1])

    async def read_limits(
        self, subject: Subject, limits: tuple[Limit, ...]
    ) -> tuple[int, list[LimitReading], list[GrantReading]]:
        """Every limit's live counter for ``subject``, read in one transaction with the
        store's clock: (now_ms, readings, live grants)."""
        t = subject.tenant
        notes_key = f"{tenant_prefix(t)}gnotes"
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                # TIME through a script keyed on the tenant: the same reply, and on Redis
                # Cluster it routes to the tenant's node (a cluster pipeline refuses TIME).
                pipe.eval("return redis.call('TIME')", 1, notes_key)
                for lim in limits:
                    pipe.hmget(
                        limit_key(t, lim, subject.slice, subject.key), ["l", "t", "p", "u", "s"]
                    )
                    pipe.hgetall(grants_key(t, lim, subject.slice, subject.key))
                pipe.hgetall(notes_key)
                raw = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        sec, usec = raw[0]
        now = int(sec) * 1000 + int(usec) // 1000 + self.store.clock_offset_ms
        notes: dict[str, str] = raw[-1]
        readings: list[LimitReading] = []
        grants: list[GrantReading] = []
        for i, lim in enumerate(limits):
            (level, at, period, used, scale), grant_map = raw[1 + 2 * i], raw[2 + 2 * i]
            if lim.kind is LimitKind.RATE:
                cap = lim.capacity * lim.scale
                lvl = cap
                if level is not None:
                    lvl = int(level)
                    if scale is not None and int(scale) != lim.scale:  # as decide.lua converts
                        lvl = math.floor(lvl / int(scale) * lim.scale)
                    lvl = min(cap, lvl + max(0, now - int(at)) * lim.refill_per_ms)
                reset = 0 if lvl >= cap else -(-(cap - lvl) // lim.refill_per_ms)
                readings.append(LimitReading(lim, lvl // lim.scale, lim.capacity, 0, 0, reset))
                continue
            start, end = period_bounds(now, lim.period)
            used_now = int(used) if period is not None and int(period) == start else 0
            granted = 0
            for gid, value in grant_map.items():
                amount, g_start, g_exp = (int(x) for x in value.split("|"))
                if g_start == start and (g_exp == 0 or g_exp > now):
                    granted += amount
                    grants.append(GrantReading(gid, lim.name, amount, g_exp, notes.get(gid, "")))
            capacity = lim.amount + granted
            readings.append(
                LimitReading(lim, capacity - used_now, capacity, used_now, granted, end - now)
            )
        return now, readings, grants

    async def recent(
        self,
        tenant: str,
        *,
        subject: Subject | None = None,
        count: int = 10,
        scan: int = 1000,
        page: int = 20,
    ) -> list[DecisionRecord]:
        """The newest decisions of the tenant (narrowed to a slice/key if given), newest
        first; at most ``scan`` decisions are looked at (read ``page`` trail entries at a
        time: an entry holds a whole batch of decisions)."""
        out: list[DecisionRecord] = []
        key = recent_key(tenant)
        top = "+"
        seen = 0
        while seen < scan:
            try:
                entries: Any = await self.client.xrevrange(key, max=top, count=page)
            except (RedisError, OSError) as exc:
                raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
            for _, fields in entries:
                for rec in reversed(parse_entry(tenant, fields)):
                    seen += 1
                    if seen > scan:
                        return out
                    if subject is not None and (
                        (subject.slice and rec.subject.slice != subject.slice)
                        or (subject.key and rec.subject.key != subject.key)
                    ):
                        continue
                    out.append(rec)
                    if len(out) >= count:
                        return out
            if len(entries) < page:
                break
            top = "(" + entries[-1][0]
        return out

    async def find_decision(self, tenant: str, decision_id: str) -> DecisionRecord | None:
        """The decision with this id, if it is still in the tenant's trail."""
        try:
            entries: Any = await self.client.xrevrange(recent_key(tenant))
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        for _, fields in entries:
            e = fields.get("e")
            if e == "d" and fields["x"].startswith(decision_id):
                return parse_decision(tenant, fields)
            if e == "b" and decision_id in fields["x"]:
                for rec in parse_batch(tenant, fields["x"]):
                    if rec.decision_id == decision_id:
                        return rec
        return None

    async def watch(
        self, tenant: str, block_ms: int = 1000
    ) -> AsyncIterator[DecisionRecord | ThresholdEvent | None]:
        """New trail entries as they are written; yields None every ``block_ms`` without one
        (so a caller can notice a closed stream)."""
        key = recent_key(tenant)
        last = "$"
        while True:
            try:
                reply: Any = await self.client.xread({key: last}, block=block_ms, count=500)
            except (RedisError, OSError) as exc:
                raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
            if not reply:
                yield None
                continue
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    if fields.get("e") == "th":
                        yield parse_threshold(tenant, fields)
                    else:
                        for rec in parse_entry(tenant, fields):
                            yield rec


def parse_entry(tenant: str, f: dict[str, str]) -> list[DecisionRecord]:
    """The decisions of a trail entry, oldest first: a batch (``e=b``), one decision
    (``e=d``, written by earlier versions), or none (a threshold event)."""
    e = f.get("e")
    if e == "b":
        return parse_batch(tenant, f["x"])
    if e == "d":
        return [parse_decision(tenant, f)]
    return []


def _limit_changes(packed_limits: str) -> tuple[LimitChange, ...]:
    """``name,kind,before,after,capacity,exceeded`` joined by ``;``."""
    limits = []
    for packed in filter(None, packed_limits.split(";")):
        name, kind, before, after, cap, exceeded = packed.rsplit(",", 5)
        limits.append(
            LimitChange(
                name, LimitKind(int(kind)), int(before), int(after), int(cap), exceeded == "1"
            )
        )
    return tuple(limits)


def parse_batch(tenant: str, x: str) -> list[DecisionRecord]:
    """A trail entry ``e=b`` (decide.lua writes one per batch): field ``x`` holds
    ``policy_version US decided_at_ms``, then per decision RS (0x1E) and, 0x1F-separated,
    request id, decision id, slice, key, metric, amount, mode, trace id, decision, reason,
    retry_after and the limits."""
    header, *records = x.split("\x1e")
    version, ts = header.split("\x1f")
    out = []
    for record in records:
        (
            rid,
            did,
            slice_,
            key,
            metric,
            amount,
            mode,
            trace_id,
            decision,
            reason,
            retry,
            packed_limits,
        ) = record.split("\x1f")
        fields = (did, rid, slice_, key, metric, amount, mode, decision, reason, version, ts)
        out.append(_record(tenant, *fields, trace_id, retry, packed_limits))
    return out


def parse_decision(tenant: str, f: dict[str, str]) -> DecisionRecord:
    """A trail entry ``e=d`` (one decision per entry, as earlier versions wrote them): field
    ``x`` packs, 0x1F-separated, the decision id, request id, slice, key, metric, amount, mode,
    decision, reason, policy version, time, trace id, retry_after and the limits
    (``name,kind,before,after,capacity,exceeded`` joined by ``;``)."""
    (
        did,
        rid,
        slice_,
        key,
        metric,
        amount,
        mode,
        decision,
        reason,
        version,
        ts,
        trace_id,
        retry,
        packed_limits,
    ) = f["x"].split("\x1f")
    fields = (did, rid, slice_, key, metric, amount, mode, decision, reason, version, ts)
    return _record(tenant, *fields, trace_id, retry, packed_limits)


def _record(
    tenant: str, did: str, rid: str, slice_: str, key: str, metric: str, amount: str,
    mode: str, decision: str, reason: str, version: str, ts: str, trace_id: str, retry: str,
    packed_limits: str,
) -> DecisionRecord:  # fmt: skip
    """A decision record from the text fields of a trail entry, whichever its layout."""
    return DecisionRecord(
        decision_id=did,
        request_id=rid,
        subject=Subject(tenant, slice_, key),
        metric=metric,
        amount=int(amount),
        mode=Mode.REPORT if mode == "report" else Mode.ADMIT,
        decision=Decision(int(decision)),
        reason=Reason(int(reason)),
        policy_version=int(version),
        decided_at_ms=int(ts),
        trace_id=trace_id,
        retry_after_ms=int(retry),
        limits=_limit_changes(packed_limits),
    )


def parse_threshold(tenant: str, f: dict[str, str]) -> ThresholdEvent:
    return ThresholdEvent(
        subject=Subject(tenant, f.get("sl", ""), f.get("k", "")),
        limit=f["l"],
        percent=int(f["pc"]),
        used=int(f["u"]),
        capacity=int(f["c"]),
        at_ms=int(f["ts"]),
    )
