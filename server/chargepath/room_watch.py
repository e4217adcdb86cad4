"""The job that keeps a gateway process's over-limit cache honest: it turns the cache on only
while subscribed to the store's room events, and drops a tenant's entries on each event.

Until the first subscription is made, and from the moment one breaks (an error, a silent
connection) until the next is made, the cache is off and empty (every Check goes to the
store): an event published meanwhile cannot be heard, so nothing learned before it is kept.
"""

from __future__ import annotations

import asyncio
import logging

from chargepath.core.overlimit import OverLimitCache
from chargepath.store.base import RoomEvents, StoreUnavailableError

log = logging.getLogger("chargepath.overlimit")


class RoomWatch:
    """Subscribe to ``events`` and drive ``cache``; after a failure, try again every
    ``retry_s``."""

    name = "overlimit-room-events"

    def __init__(self, events: RoomEvents, cache: OverLimitCache, *, retry_s: float = 0.5):
        self.events = events
        self.cache = cache
        self.retry_s = retry_s

    async def run(self, draining: asyncio.Event) -> None:
        broken, first = False, True
        try:
            while not draining.is_set():
                try:
                    async with self.events.events() as tenants:
                        self.cache.open()
                        if broken or first:
                            log.info("over-limit cache on: subscribed to room events")
                            broken = first = False
                        async for tenant in tenants:
                            self.cache.invalidate(tenant)
                except StoreUnavailableError as exc:
                    if not broken:
                        log.warning("over-limit cache off until resubscribed: %s", exc)
                        broken = True
                finally:
                    self.cache.close()
                await asyncio.sleep(self.retry_s)
        finally:
            self.cache.close()
