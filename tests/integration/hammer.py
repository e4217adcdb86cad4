"""A client process for the exactness test: admits 1 unit at a time as fast as it can."""

from __future__ import annotations

import asyncio
import time

from chargepath.core.model import Decision, Mode, Subject, Usage
from chargepath.engine import Engine, EngineSettings
from chargepath.store.redis_store import RedisStore
from chargepath.telemetry import Telemetry


async def _hammer(
    url: str, worker: int, seconds: float, concurrency: int
) -> tuple[int, int, int, int]:
    store = RedisStore.from_url(url, connect_timeout=2.0)
    engine = Engine(store, EngineSettings(store_timeout_s=5.0), Telemetry())
    await engine.reload_policy()
    allowed = decided = 0
    first, last = 2**62, 0
    deadline = time.monotonic() + seconds
    n = 0

    async def loop(task: int) -> None:
        nonlocal allowed, decided, first, last, n
        while time.monotonic() < deadline:
            n += 1
            u = Usage(f"w{worker}-{task}-{n}", Subject("hot"), "api.sms.send", 1, Mode.ADMIT)
            v = await engine.check(u)
            assert not v.degraded, v.message
            decided += 1
            first, last = min(first, v.decided_at_ms), max(last, v.decided_at_ms)
            if v.decision is Decision.ALLOW:
                allowed += 1

    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    await store.close()
    return allowed, decided, first, last


def hammer(url: str, worker: int, seconds: float, concurrency: int) -> tuple[int, int, int, int]:
    """(allowed units, decisions, first and last decision time on Redis' clock in ms)."""
    return asyncio.run(_hammer(url, worker, seconds, concurrency))
