"""The Redis implementation of :class:`~chargepath.store.base.LeaseStore`.

Keys (every one in the tenant's hash tag, so one script's keys share a slot, on a cluster too):

==================================  ======================================================
``cp:{T}:lease:<lease_id>``         hash: an open lease (``store/scripts/lib/lease.lua``
                                    lists its fields); deleted when it is closed
``cp:{T}:leases``                   sorted set: open lease ids scored by expiry (ms); the
                                    sweeper's work list
``cp:{T}:ld:<request_id>``          string: the first answer to a lease ask, for the dedup
                                    window
``cp:{T}:ltrail``                   stream, capped: recent lease decisions (explain)
==================================  ======================================================

A lease's hash outlives its expiry by the dedup window (a safety net: the sweeper closes it at
expiry and gives its units back; a hash that expired on its own would keep its units away
from its limits, which is why the sweeper runs on every gateway).
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from redis.exceptions import RedisError

from chargepath.core.leases import LeaseAnswer, LeaseHold, LeaseRecord, LeaseView
from chargepath.core.model import Decision, Reason, Subject
from chargepath.store.base import LeaseItem, StoreUnavailableError
from chargepath.store.protocol import (
    REPLY_DECIDED,
    REPLY_LATE,
    decode_lease_reply,
    encode_lease_batch,
    lease_index_key,
    lease_key,
    lease_trail_key,
    read_script,
)
from chargepath.store.redis_store import RedisStore


def new_lease_id() -> str:
    """A fresh lease id: 32 hex digits (128 random bits)."""
    return secrets.token_hex(16)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unavailable(exc: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError(f"{type(exc).__name__}: {exc}")


class RedisLeaseStore:
    """Leases on the same Redis (client, clock, dedup window, clock offset) as ``store``. The
    most leases a tenant may hold open is its ``caps.leases`` in the policy (each item's
    resolution carries it); a new one past it is refused DENY CAP_REACHED."""

    def __init__(self, store: RedisStore, *, trail_length: int | None = None) -> None:
        self.store = store
        self.client = store.client
        self.dedup_window_ms = store.dedup_window_ms
        self.clock_offset_ms = store.clock_offset_ms
        self.recent_length = store.recent_length if trail_length is None else trail_length
        self._ask = self.client.register_script(read_script("lease.lua"))
        self._sweep = self.client.register_script(read_script("lease_sweep.lua"))
        self._read = self.client.register_script(read_script("lease_read.lua"))

    async def ask(
        self,
        tenant: str,
        policy_version: int,
        items: list[LeaseItem],
        *,
        deadline: float | None = None,
    ) -> list[LeaseAnswer]:
        loop = asyncio.get_running_loop()
        clock = self.store.clock
        deadline_ms = 0 if deadline is None else clock.deadline_ms(deadline)
        ids = [item.ask.lease_id or new_lease_id() for item in items]
        keys, args = encode_lease_batch(
            tenant, policy_version, items, ids, self, deadline_ms=deadline_ms
        )
        sent = loop.time()
        try:
            reply = await self._ask(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        if reply[0] == REPLY_DECIDED:
            clock.observe(sent, loop.time(), int(reply[1]) - self.clock_offset_ms)
        elif reply[0] == REPLY_LATE:
            clock.observe(sent, loop.time(), int(reply[1]))
        return decode_lease_reply(reply, items, policy_version)

    async def sweep(self, tenant: str, *, limit: int = 1000) -> int:
        try:
            _, closed, _ = await self._sweep(
                keys=[lease_index_key(tenant)],
                args=[self.clock_offset_ms, limit, lease_key(tenant, ""), tenant],
            )
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return int(closed)

    async def leases(
        self, subject: Subject, *, metric: str = "", limit: int = 1000
    ) -> tuple[int, list[LeaseView]]:
        tenant = subject.tenant
        try:
            reply = await self._read(
                keys=[lease_index_key(tenant)],
                args=[
                    self.clock_offset_ms,
                    subject.slice,
                    subject.key,
                    metric,
                    limit,
                    lease_key(tenant, ""),
                ],
            )
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        now = int(reply[0])
        out = []
        o = 1
        while o < len(reply):
            lid, m, holder, g, u, a, x, v, _overage, n = reply[o : o + 10]
            o += 10
            holds = tuple(
                LeaseHold(_limit_name(reply[p]), int(reply[p + 1]), int(reply[p + 2]))
                for p in range(o, o + 3 * int(n), 3)
            )
            o += 3 * int(n)
            expires = int(x)
            out.append(
                LeaseView(
                    lease_id=_text(lid),
                    subject=subject,
                    metric=_text(m),
                    holder=_text(holder),
                    granted=int(g),
                    used=int(u),
                    available=max(0, int(a)),
                    expires_at_ms=expires,
                    expires_in_ms=max(0, expires - now),
                    policy_version=int(v),
                    holds=holds,
                )
            )
        return now, out

    async def find_decision(self, tenant: str, decision_id: str) -> LeaseRecord | None:
        try:
            entries = await self.client.xrevrange(
                lease_trail_key(tenant), count=max(self.recent_length * 2, 100)
            )
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        for _, fields in entries or ():
            f = {_text(k): _text(v) for k, v in (fields or {}).items()}
            if f.get("did") == decision_id:
                return LeaseRecord(
                    decision_id=decision_id,
                    request_id=f.get("rid", ""),
                    subject=Subject(tenant, f.get("sl", ""), f.get("k", "")),
                    metric=f.get("m", ""),
                    lease_id=f.get("ls", ""),
                    holder=f.get("h", ""),
                    decision=Decision(int(f.get("d", "3"))),
                    reason=Reason(int(f.get("r", "7"))),
                    requested=int(f.get("q", "0")),
                    used=int(f.get("us", "0")),
                    granted=int(f.get("g", "0")),
                    recorded=int(f.get("rc", "0")),
                    overage=int(f.get("ov", "0")),
                    refunded=int(f.get("rf", "0")),
                    policy_version=int(f.get("pv", "0")),
                    decided_at_ms=int(f.get("ts", "0")),
                    trace_id=f.get("tr", ""),
                )
        return None


def _limit_name(key: Any) -> str:
    """The limit of a counter's key, ``cp:{T}:r:<limit>:<slice>:<key>``."""
    text = _text(key)
    return text.split("}:", 1)[-1].split(":")[1] if "}:" in text else text
