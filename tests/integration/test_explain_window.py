"""A decision id is explained from the id alone for the dedup window, however many decisions
the tenant made since; beyond the window the trail goes back to its length, so memory stays
bounded. On the session's real Redis."""

from __future__ import annotations

import redis

from chargepath.core.model import Mode, Subject, Usage
from chargepath.engine import decision_time_ms, tenant_tag
from chargepath.store.admin import AdminStore
from chargepath.store.redis_store import RedisStore
from tests.conftest import make_engine
from tests.integration.policies import OPEN

TRAIL = "cp:{acme}:recent"


def bytes_usage(n: int, slice_: str = "s1") -> Usage:
    return Usage(f"r{n}", Subject("acme", slice_, ""), "slice.bytes", 10, Mode.REPORT)


async def test_every_decision_of_the_window_is_found_beyond_the_trail_length(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    store.recent_length = 20  # the trail's length beyond the window: 20 decisions
    e = await make_engine(store, OPEN)
    (first,) = await e.decide_batch([bytes_usage(0)])
    assert first.decision_id[12:16] == tenant_tag("acme")
    assert decision_time_ms(first.decision_id) is not None
    n = 1
    for _ in range(60):  # 600 decisions more, in batches of 10
        await e.decide_batch([bytes_usage(n + i) for i in range(10)])
        n += 10
    assert raw_redis.xlen(TRAIL) == 61  # nothing of the window was trimmed
    admin = AdminStore(store)
    found = await admin.find_decision("acme", first.decision_id)
    assert found is not None
    assert (found.request_id, found.amount, found.subject.slice) == ("r0", 10, "s1")
    assert found.limits[0].name == "bytes"
    assert await admin.find_decision("acme", first.decision_id[:-1] + "f") is None
    # the newest decisions are still the trail's head, for state
    recent = await admin.recent("acme", count=3)
    assert [r.request_id for r in recent] == [f"r{n - 1}", f"r{n - 2}", f"r{n - 3}"]


async def test_beyond_the_window_the_trail_keeps_its_length(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    store.recent_length = 20
    store.dedup_window_ms = 1  # every entry older than 1 ms may go
    e = await make_engine(store, OPEN)
    for n in range(1000):  # one decision per batch: the most entries per decision
        await e.decide_batch([bytes_usage(n)])
    # trimmed by whole stream nodes (100 entries by default): far below the 1000 written
    assert raw_redis.xlen(TRAIL) < 400
    # a decision of the trail's length is still found (by its time, or among the newest)
    newest = (await AdminStore(store).recent("acme", count=1))[0]
    assert await AdminStore(store).find_decision("acme", newest.decision_id) == newest


async def test_a_low_rate_tenant_keeps_its_length_however_old(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    """The window trims only past the trail's length: a quiet tenant keeps its last decisions
    for state, however long ago they were made."""
    store.recent_length = 50
    store.dedup_window_ms = 1
    e = await make_engine(store, OPEN)
    for n in range(30):
        await e.decide_batch([bytes_usage(n)])
    assert raw_redis.xlen(TRAIL) == 30
    assert len(await AdminStore(store).recent("acme", count=100)) == 30
