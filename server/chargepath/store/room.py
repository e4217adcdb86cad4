"""Room events: the tenants to which something may have added room, heard over pub/sub.

A script that may add room to a tenant's limits PUBLISHes the tenant's name on
:data:`~chargepath.store.protocol.ROOM_CHANNEL` in the same atomic step as the change:
``grant.lua`` (a grant tops up a quota) and ``stamp.lua`` (a new policy version reaches the
tenant: a resume, a larger capacity, a plan change). Redis delivers a message to the
subscribers after the script has run, so whoever hears it and then asks the store sees the
change. Every gateway process with the over-limit cache subscribes (``chargepath.room_watch``).

A subscriber hears nothing published while it was not subscribed, and a connection that
died quietly delivers nothing: :meth:`RedisRoomEvents.events` PINGs the subscription every
``ping_s`` and raises :class:`~chargepath.store.base.StoreUnavailableError` when no reply came
within ``ping_s * 2``, so that its owner turns the cache off until it is subscribed again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from chargepath.store.base import StoreUnavailableError
from chargepath.store.connect import RedisClient
from chargepath.store.protocol import ROOM_CHANNEL


def _unavailable(exc: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError(f"room events: {type(exc).__name__}: {exc}")


class RedisRoomEvents:
    """The room events of a Redis store (one node, a cluster, or Sentinel's master)."""

    def __init__(self, client: RedisClient, *, ping_s: float = 0.5) -> None:
        self.client = client
        self.ping_s = ping_s

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[str]]:
        """Subscribe on a pub/sub connection of its own; once subscribed, yields an iterator
        of tenant names (each a tenant that may have more room than before). Raises
        :class:`StoreUnavailableError` when the subscription cannot be made, breaks, or stops
        answering its pings."""
        if isinstance(self.client, RedisCluster):
            try:
                await self.client.initialize()
            except (RedisError, OSError) as exc:
                raise _unavailable(exc) from exc
        pubsub = self.client.pubsub()
        try:
            try:
                await asyncio.wait_for(pubsub.subscribe(ROOM_CHANNEL), self.ping_s * 4)
            except (RedisError, OSError, TimeoutError) as exc:
                raise _unavailable(exc) from exc
            yield self._tenants(pubsub)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _tenants(self, pubsub: PubSub) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged = heard
        while True:
            now = loop.time()
            if now - heard > self.ping_s * 2:
                raise StoreUnavailableError("room events: the subscription stopped answering")
            try:
                if now - pinged >= self.ping_s:
                    pinged = now
                    await pubsub.ping()
                message: Any = await pubsub.get_message(timeout=self.ping_s / 2)
            except (RedisError, OSError) as exc:
                raise _unavailable(exc) from exc
            if message is None:
                continue
            heard = loop.time()
            if message.get("type") == "message":
                data = message["data"]
                yield data.decode() if isinstance(data, bytes) else str(data)
