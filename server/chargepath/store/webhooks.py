"""The webhook side of the Redis store: the outboxes, their relays, and the delivery log.

Keys:

=================================  ========================================================
``cp:{T}:hooks``                   stream: tenant T's quota threshold events not delivered
                                   yet, copied from its trail ``cp:{T}:recent`` by
                                   ``hooks_thresholds.lua``; consumer group ``webhooks``
``cp:{T}:hooks:cursor``            string: the last trail entry that relay looked at
``cp:{cp:policy}:hooks``           stream: suspension events not delivered yet, written by
                                   ``hooks_suspensions.lua``; consumer group ``webhooks``
``cp:{cp:policy}:hooks:susp``      hash: the suspensions last announced, and
``cp:{cp:policy}:hooks:susp_v``    string: the policy version they are of
``cp:{cp:hooks}:log``              stream: one entry per delivery attempt (capped)
=================================  ========================================================

An outbox is the durable queue of its events: a gateway process reads an entry through the
consumer group (so one process has it), delivers it to every endpoint that wants it, then
acknowledges and deletes it. An entry whose process died stays pending in the group and is
claimed by another process once it has been idle for the lease (:meth:`WebhookStore.claim`);
a live process renews the lease of what it holds (:meth:`WebhookStore.renew`). So delivery is
at least once: a process that dies after a POST and before the acknowledgement leaves the event
to be sent again, with the same id.

Every method raises :class:`~chargepath.store.base.StoreUnavailableError` when Redis does not
answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError, ResponseError

from chargepath.store.admin import recent_key
from chargepath.store.base import StoreUnavailableError
from chargepath.store.connect import RedisClient
from chargepath.store.redis_store import RedisStore, read_script, tenant_prefix

GROUP = "webhooks"
SUSPENSION_OUTBOX = "cp:{cp:policy}:hooks"
SUSPENSION_RECORD = "cp:{cp:policy}:hooks:susp"
SUSPENSION_VERSION = "cp:{cp:policy}:hooks:susp_v"
LOG_KEY = "cp:{cp:hooks}:log"
#: The outboxes' length cap: past it the oldest undelivered events are dropped (an endpoint
#: down for long under a flood of events); at about 200 bytes an event, 2 MB per outbox.
OUTBOX_MAX = 10_000
#: The delivery log's length cap (approximate, Redis trims whole macro nodes): about 3 MB.
LOG_MAX = 10_000
#: Trail entries one relay call looks at, at most.
RELAY_SCAN = 2_000
#: Log entries one read looks at, at most, when filters skip most of them.
LOG_SCAN = 20_000


def outbox_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}hooks"


def cursor_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}hooks:cursor"


def _unavailable(exc: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """An undelivered event as its outbox holds it: the outbox's key, the entry id and its
    fields (see the relays' scripts)."""

    outbox: str
    entry_id: str
    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One delivery attempt in the log. ``outcome``: ``delivered`` (a 2xx answer), ``retry``
    (failed, another attempt follows after ``retry_in_ms``) or ``failed`` (failed, the event is
    given up for this endpoint). ``status``: the HTTP status, 0 when none came (``error`` says
    why: refused connection, timeout...)."""

    at_ms: int
    event_id: str
    type: str
    tenant: str
    endpoint: str
    url: str
    attempt: int
    outcome: str
    status: int
    error: str
    duration_ms: int
    retry_in_ms: int

    def fields(self) -> dict[str, str]:
        return {
            "at": str(self.at_ms),
            "id": self.event_id,
            "type": self.type,
            "tenant": self.tenant,
            "endpoint": self.endpoint,
            "url": self.url,
            "attempt": str(self.attempt),
            "outcome": self.outcome,
            "status": str(self.status),
            "error": self.error,
            "ms": str(self.duration_ms),
            "retry_in_ms": str(self.retry_in_ms),
        }

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> DeliveryRecord:
        return cls(
            at_ms=int(f.get("at") or 0),
            event_id=f.get("id", ""),
            type=f.get("type", ""),
            tenant=f.get("tenant", ""),
            endpoint=f.get("endpoint", ""),
            url=f.get("url", ""),
            attempt=int(f.get("attempt") or 0),
            outcome=f.get("outcome", ""),
            status=int(f.get("status") or 0),
            error=f.get("error", ""),
            duration_ms=int(f.get("ms") or 0),
            retry_in_ms=int(f.get("retry_in_ms") or 0),
        )


class WebhookStore:
    """The outboxes and the delivery log on a Redis client (decoded responses)."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._thresholds = client.register_script(read_script("hooks_thresholds.lua"))
        self._suspensions = client.register_script(read_script("hooks_suspensions.lua"))

    @classmethod
    def of_store(cls, store: RedisStore) -> WebhookStore:
        """On ``store``'s connections; closing the store closes them."""
        return cls(store.client)

    async def relay_thresholds(self, tenant: str) -> tuple[int, bool]:
        """Copy the tenant's new threshold entries from its trail into its outbox (atomic:
        each once). Returns (events copied, whether trail entries may have been trimmed
        before any process looked at them)."""
        try:
            reply: Any = await self._thresholds(
                keys=[recent_key(tenant), outbox_key(tenant), cursor_key(tenant)],
                args=[RELAY_SCAN, OUTBOX_MAX, GROUP],
            )
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return int(reply[0]), bool(int(reply[1]))

    async def relay_suspensions(
        self, version: int, suspensions: dict[tuple[str, str, str], str]
    ) -> int:
        """Record the suspensions of policy ``version`` and write an event for each subject
        suspended or resumed since the version recorded before (none on the first call, and
        none if the record is already of ``version`` or newer). Returns the events written."""
        args: list[Any] = [version, OUTBOX_MAX, GROUP]
        for (tenant, slice_, key), reason in sorted(suspensions.items()):
            args += [f"{tenant}\x1f{slice_}\x1f{key}", reason]
        try:
            reply: Any = await self._suspensions(
                keys=[SUSPENSION_OUTBOX, SUSPENSION_RECORD, SUSPENSION_VERSION], args=args
            )
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return int(reply[0])

    async def read_new(self, outbox: str, consumer: str, count: int) -> list[OutboxEntry]:
        """Up to ``count`` entries of ``outbox`` no process has read yet, now pending on
        ``consumer``. An outbox that does not exist yet has none."""
        try:
            reply: Any = await self.client.xreadgroup(GROUP, consumer, {outbox: ">"}, count=count)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return []
            raise _unavailable(exc) from exc
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return [
            OutboxEntry(outbox, entry_id, fields)
            for _, entries in reply or ()
            for entry_id, fields in entries
            if fields is not None
        ]

    async def claim(
        self, outbox: str, consumer: str, idle_ms: int, count: int
    ) -> list[OutboxEntry]:
        """Up to ``count`` entries pending on other consumers (a process that died, or lost
        its lease) for at least ``idle_ms``, now pending on ``consumer``."""
        try:
            reply: Any = await self.client.xautoclaim(
                outbox, GROUP, consumer, idle_ms, start_id="0-0", count=count
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return []
            raise _unavailable(exc) from exc
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        # reply: [next start, [[id, fields]...], (Redis 7: deleted ids)]; an entry trimmed
        # away while pending comes back with no fields (Redis 6.2) and is dropped.
        claimed = reply[1] if len(reply) > 1 else []
        return [OutboxEntry(outbox, entry_id, fields) for entry_id, fields in claimed if fields]

    async def renew(self, outbox: str, consumer: str, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of entries ``consumer`` holds: the lease of a live process."""
        if not entry_ids:
            return
        try:
            await self.client.xclaim(outbox, GROUP, consumer, 0, list(entry_ids), justid=True)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def done(self, outbox: str, entry_ids: Sequence[str]) -> None:
        """Acknowledge and delete delivered (or given-up) entries."""
        if not entry_ids:
            return
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xack(outbox, GROUP, *entry_ids)
                pipe.xdel(outbox, *entry_ids)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def log(self, records: Sequence[DeliveryRecord]) -> None:
        """Append delivery attempts to the log."""
        if not records:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for r in records:
                    pipe.xadd(LOG_KEY, r.fields(), maxlen=LOG_MAX, approximate=True)  # type: ignore[arg-type]
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def read_log(
        self, *, tenant: str = "", failed: bool = False, limit: int = 50
    ) -> list[DeliveryRecord]:
        """The newest ``limit`` attempts, oldest first; only the tenant's if given; only the
        attempts that did not deliver (``retry``, ``failed``) with ``failed``. At most
        :data:`LOG_SCAN` entries are looked at."""
        out: list[DeliveryRecord] = []
        top = "+"
        scanned = 0
        while len(out) < limit and scanned < LOG_SCAN:
            try:
                entries: Any = await self.client.xrevrange(LOG_KEY, max=top, count=500)
            except (RedisError, OSError) as exc:
                raise _unavailable(exc) from exc
            for _, fields in entries:
                scanned += 1
                rec = DeliveryRecord.from_fields(fields)
                if tenant and rec.tenant != tenant:
                    continue
                if failed and rec.outcome == "delivered":
                    continue
                out.append(rec)
                if len(out) >= limit:
                    break
            if len(entries) < 500:
                break
            top = "(" + entries[-1][0]
        out.reverse()
        return out
