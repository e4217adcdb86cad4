"""What the decision trail costs in Redis per decision it keeps (README "Sizing").

The trail keeps every decision of the dedup window (so that ``chargepath explain ID`` finds any
of them by id alone). This decides ``--decisions`` reports of one tenant in batches of each
``--batch`` size through the gateway's own store and decision script, on a fresh redis-server,
and prints ``MEMORY USAGE`` of the trail divided by the decisions it holds::

    .venv/bin/python -m loadtest.trail_memory --decisions 100000 --batch 1 --batch 10 --batch 100
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import uuid
from pathlib import Path
from typing import Any

import redis

from chargepath.core.model import Mode, Subject, Usage
from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine, EngineSettings
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.protocol import RS, recent_key
from chargepath.store.redis_store import RedisStore
from chargepath.telemetry import Telemetry

POLICY = """
metrics: [{name: slice.bytes, unit: byte}]
plans:
  - name: slice
    limits:
      - {name: bytes-rate, metric: slice.bytes, scope: slice,
         rate: {capacity: 1000000000000, refill: 1000000000, per: second}}
      - {name: bytes-monthly, metric: slice.bytes, scope: slice,
         quota: {amount: 1000000000000000, per: month}}
tenants:
  - {name: mvno, plan: slice}
"""


async def measure(url: str, decisions: int, batch: int) -> tuple[int, int]:
    """(bytes of the trail, decisions in it) after ``decisions`` reports in ``batch``es."""
    store = RedisStore.from_url(url, connect_timeout=2.0)
    try:
        await store.publish_policy(load_policy_text(POLICY))
        engine = Engine(store, EngineSettings(store_timeout_s=5.0), Telemetry())
        await engine.reload_policy()
        for start in range(0, decisions, batch):
            usages = [
                Usage(
                    str(uuid.uuid4()),  # a request id as clients make them: 36 characters
                    Subject("mvno", f"1-{(start + i) % 64:06d}"),
                    "slice.bytes",
                    1500 + (start + i) % 50_000,
                    Mode.REPORT,
                )
                for i in range(min(batch, decisions - start))
            ]
            await engine.decide_batch(usages)
    finally:
        await store.close()
    raw = redis.Redis.from_url(url, decode_responses=True)
    try:
        used = raw.memory_usage(recent_key("mvno"), samples=0) or 0
        entries: Any = raw.xrange(recent_key("mvno"))
        kept = sum(len(f["x"].split(RS)) - 1 for _, f in entries if f.get("e") == "b")
        raw.flushall()
    finally:
        raw.close()
    return int(used), kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decisions", type=int, default=100_000)
    p.add_argument("--batch", type=int, action="append", default=[])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = EmbeddedRedis(Path(folder))
        server.start()
        try:
            for batch in args.batch or [1, 10, 100]:
                used, kept = asyncio.run(measure(server.url, args.decisions, batch))
                print(
                    f"batch {batch:>4}: {kept:,} decisions kept, trail {used:,} bytes, "
                    f"{used / max(kept, 1):.0f} bytes per decision"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
