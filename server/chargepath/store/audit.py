"""The audit stream in Redis: one entry per admin call, appended, never edited.

Key: ``cp:{cp:policy}:audit``, a Redis Stream. Its hash tag is the name of the policy key
(``cp:policy``, which has none), so the stream lives in the policy's slot: ``publish.lua``
appends the entry of a policy change in the same script that makes the new version live, also
on Redis Cluster. Other changes (grants, API keys) live in other slots; their entry is appended
right after the change (see :class:`AuditStream`).

Fields of an entry (all text): ``who`` (key id, certificate identity or "anonymous"),
``role``, ``rpc``, ``what`` (the summary), ``tenants`` (comma-separated; tenant names hold no
comma), ``vb`` and ``va`` (policy version before and after), ``outcome`` ("OK" or a gRPC status
code name) and ``detail``. The entry id is the Redis time of the append (ms), which is the
event's time.

Retention: append-only in the sense that no command of Chargepath edits or deletes an entry.
The one thing that removes entries is the length cap every append applies (``XADD MAXLEN ~``,
:data:`MAX_ENTRIES`, the oldest first), so that memory is bounded even under a flood of
refused calls; at about 300 bytes an entry the cap is about 30 MB. Archive older entries with
``chargepath audit --json --since ...`` before they reach the cap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from chargepath.core.audit import AuditEvent
from chargepath.store.base import StoreUnavailableError

AUDIT_KEY = "cp:{cp:policy}:audit"
#: The length cap of the stream (approximate: Redis trims whole macro nodes, so it may hold a
#: few hundred more).
MAX_ENTRIES = 100_000
#: How many entries one read looks at, at most, when a tenant filter skips most of them.
MAX_SCAN = 10_000


def event_fields(event: AuditEvent, *, versions: bool = True) -> list[str]:
    """The entry's fields as a flat [name, value, ...] list. ``versions=False`` leaves out
    ``vb`` and ``va``, which ``publish.lua`` writes itself from the versions it saw."""
    out = [
        "who", event.identity,
        "role", event.role,
        "rpc", event.method,
        "what", event.summary,
        "tenants", ",".join(event.tenants),
        "outcome", event.outcome,
        "detail", event.detail,
    ]  # fmt: skip
    if versions:
        out += ["vb", str(event.policy_version_before), "va", str(event.policy_version_after)]
    return out


def parse_entry(entry_id: str, f: dict[str, str]) -> AuditEvent:
    """An event from a stream entry (its id is ``<ms>-<seq>``)."""
    return AuditEvent(
        identity=f.get("who", ""),
        role=f.get("role", ""),
        method=f.get("rpc", ""),
        summary=f.get("what", ""),
        tenants=tuple(filter(None, f.get("tenants", "").split(","))),
        policy_version_before=int(f.get("vb") or 0),
        policy_version_after=int(f.get("va") or 0),
        outcome=f.get("outcome", ""),
        detail=f.get("detail", ""),
        at_ms=int(entry_id.split("-", 1)[0]),
        event_id=entry_id,
    )


def _unavailable(exc: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError(f"{type(exc).__name__}: {exc}")


if TYPE_CHECKING:
    from chargepath.store.redis_store import RedisStore


class AuditStream:
    """The :class:`~chargepath.store.base.AuditLog` on a Redis client (decoded responses).

    :meth:`append` is for changes made outside ``publish.lua``: it runs right after the change
    has been written. If Redis fails in between, the change stands without its entry; the
    caller then logs the event at ERROR level (the log is the trail of last resort) and does
    not fail the call, whose effect a retry would repeat.
    """

    def __init__(self, client: aioredis.Redis | RedisCluster) -> None:
        self.client = client

    @classmethod
    def of_store(cls, store: RedisStore) -> AuditStream:
        """The trail on ``store``'s connections; closing the store closes them."""
        return cls(store.client)

    async def append(self, event: AuditEvent) -> str:
        try:
            entry_id: Any = await self.client.xadd(
                AUDIT_KEY,
                dict(zip(*[iter(event_fields(event))] * 2, strict=True)),
                maxlen=MAX_ENTRIES,
                approximate=True,
            )
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return str(entry_id)

    async def read(
        self, *, after: str = "", since_ms: int = 0, tenant: str = "", limit: int = 100
    ) -> tuple[list[AuditEvent], str]:
        """Events oldest first, after the cursor ``after`` (an event id), else from
        ``since_ms``; only those affecting ``tenant`` if given. At most ``limit`` events, and at
        most :data:`MAX_SCAN` entries looked at. Returns (events, cursor): the id of the last
        entry looked at (``after`` if none), to pass as ``after`` to read on."""
        start = f"({after}" if after else (f"{since_ms}-0" if since_ms > 0 else "-")
        cursor = after
        events: list[AuditEvent] = []
        scanned = 0
        page = min(max(limit, 100), 1000)
        while len(events) < limit and scanned < MAX_SCAN:
            try:
                entries: Any = await self.client.xrange(AUDIT_KEY, min=start, count=page)
            except (RedisError, OSError) as exc:
                raise _unavailable(exc) from exc
            for entry_id, fields in entries:
                scanned += 1
                cursor = entry_id
                event = parse_entry(entry_id, fields)
                if not tenant or event.affects(tenant):
                    events.append(event)
                    if len(events) >= limit:
                        break
            if len(entries) < page:
                break
            start = f"({cursor}"
        return events, cursor
