"""The admin side of the Redis store: grants, live state, and the recent-decisions trail.

The trail is a Redis Stream per tenant (``cp:{T}:recent``, written by decide.lua in the same
step as the decisions, see ``scripts/lib/trail.lua``; it keeps every decision of the explain
window, by default the dedup window, and about ``recent_length`` beyond it): an entry
``e=b`` holds the decisions of one batch with every limit's remaining units before and after,
entries ``e=th`` are quota threshold crossings (80% and 100%). It serves ``GetState`` (the
last decisions), ``ExplainDecision`` (a read of the entries around the time in the decision
id) and ``WatchDecisions`` (a blocking read of new entries). Live counters are read by
``read_limits.lua`` with decide.lua's own rules.
"""

from __future__ import annotations

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
from chargepath.core.policy import Limit
from chargepath.store.base import GrantReading, LimitReading, StoreUnavailableError
from chargepath.store.protocol import (
    REPLY_REFUSED,
    RS,
    US,
    decode_read,
    encode_read,
    grant_notes_key,
    grants_key,
    limit_key,
    read_script,
)
from chargepath.store.protocol import recent_key as recent_key
from chargepath.store.redis_store import RedisStore


class AdminStore:
    """Reads and writes for the admin API, on the client of a :class:`RedisStore`."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.client = store.client
        self._grant = self.client.register_script(read_script("grant.lua"))
        self._read_limits = self.client.register_script(read_script("read_limits.lua"))

    @property
    def recent_length(self) -> int:
        """How many decisions the trail keeps per tenant beyond the explain window."""
        return self.store.recent_length

    @property
    def explain_window_ms(self) -> int:
        """How long the trail keeps every decision, ms."""
        return self.store.explain_window_ms

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
                    t,
                ],
            )
            if reply[0] == REPLY_REFUSED:
                return None
            if note:
                notes = grant_notes_key(t)
                await self.client.hset(notes, grant_id, note)
                await self.client.pexpire(notes, 40 * 86_400_000)
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        return grant_id, int(reply[0]), int(reply[1])

    async def read_limits(
        self, subject: Subject, limits: tuple[Limit, ...]
    ) -> tuple[int, list[LimitReading], list[GrantReading]]:
        """Every limit's live counter for ``subject``, read in one script (read_limits.lua:
        decide.lua's rules, on the store's clock): (now_ms, readings, live grants)."""
        keys, args = encode_read(
            subject.tenant, limits, subject.slice, subject.key, self.store.clock_offset_ms
        )
        try:
            reply = await self._read_limits(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        now, counters = decode_read(reply, len(limits))
        readings: list[LimitReading] = []
        grants: list[GrantReading] = []
        for lim, c in zip(limits, counters, strict=True):
            readings.append(
                LimitReading(lim, c.remaining, c.capacity, c.used, c.granted, c.reset_after_ms)
            )
            grants += (GrantReading(gid, lim.name, a, exp, note) for gid, a, exp, note in c.grants)
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
        """The decision with this id, if the tenant's trail still has it: every decision of the
        explain window does (the dedup window unless set lower). A decision id begins with the
        milliseconds it was made at, and its batch's trail entry is written (on Redis' clock)
        within the store deadline after, so the search reads the entries of
        :data:`FIND_SKEW_MS` around that time, page by page (clocks of gateway hosts and Redis
        may differ by that much); then, if it is not there, the tenant's
        :attr:`recent_length` newest decisions."""
        key = recent_key(tenant)
        try:
            made_ms = int(decision_id[:12], 16)
        except ValueError:
            made_ms = -1
        try:
            if made_ms >= 0:
                start, end = str(max(made_ms - FIND_SKEW_MS, 0)), str(made_ms + FIND_SKEW_MS)
                while True:
                    page: Any = await self.client.xrange(key, start, end, count=FIND_PAGE)
                    found = _find_in(tenant, page, decision_id)
                    if found is not None:
                        return found
                    if len(page) < FIND_PAGE:
                        break
                    start = "(" + page[-1][0]
            newest: Any = await self.client.xrevrange(key, count=self.recent_length)
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        return _find_in(tenant, newest, decision_id)

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


#: How far (ms) from the time in a decision id ``find_decision`` looks for its trail entry.
FIND_SKEW_MS = 60_000
#: Trail entries read per call while looking.
FIND_PAGE = 1000


def _find_in(tenant: str, entries: Any, decision_id: str) -> DecisionRecord | None:
    for _, fields in entries:
        if fields.get("e") == "b" and decision_id in fields["x"]:
            for rec in parse_batch(tenant, fields["x"]):
                if rec.decision_id == decision_id:
                    return rec
    return None


def parse_entry(tenant: str, f: dict[str, str]) -> list[DecisionRecord]:
    """The decisions of a trail entry, oldest first: a batch (``e=b``), or none (a threshold
    event)."""
    if f.get("e") == "b":
        return parse_batch(tenant, f["x"])
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
    """A trail entry ``e=b`` (decide.lua writes one per batch, see ``scripts/lib/trail.lua``):
    field ``x`` holds ``policy_version US decided_at_ms``, then per decision RS and, separated
    by US, request id, decision id, slice, key, metric, amount, mode (the usage's text), trace
    id, decision, reason, retry_after and the limits."""
    header, *records = x.split(RS)
    version, ts = header.split(US)
    out = []
    for record in records:
        rid, did, slice_, key, metric, amount, mode, trace_id, decision, reason, retry, limits = (
            record.split(US)
        )
        out.append(
            DecisionRecord(
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
                limits=_limit_changes(limits),
            )
        )
    return out


def parse_threshold(tenant: str, f: dict[str, str]) -> ThresholdEvent:
    return ThresholdEvent(
        subject=Subject(tenant, f.get("sl", ""), f.get("k", "")),
        limit=f["l"],
        percent=int(f["pc"]),
        used=int(f["u"]),
        capacity=int(f["c"]),
        at_ms=int(f["ts"]),
    )
