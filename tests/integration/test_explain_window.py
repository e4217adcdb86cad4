"""A decision id is explained from the id alone for the explain window (by default the dedup
window; ``--explain-window-s`` sets it lower), however many decisions the tenant made since;
beyond the window the trail goes back to its length, so memory stays bounded. On the session's
real Redis, and on a Redis of the test's own that is stopped and killed."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis

from chargepath.core.model import Mode, Reason, Subject, Usage, Verdict
from chargepath.engine import Engine, EngineSettings, decision_time_ms, tenant_tag
from chargepath.store.admin import AdminStore
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.redis_store import RedisStore
from chargepath.telemetry import Telemetry
from tests.conftest import ledger_entries, make_engine
from tests.integration.policies import OPEN

pytestmark = pytest.mark.integration

TRAIL = "cp:{acme}:recent"


def bytes_usage(n: int, slice_: str = "s1", tenant: str = "acme") -> Usage:
    return Usage(f"r{n}", Subject(tenant, slice_, ""), "slice.bytes", 10, Mode.REPORT)


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


async def test_an_explain_window_of_0_keeps_only_the_length_within_the_dedup_window(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    """``--explain-window-s 0``: every decision is still inside the 10-minute dedup window,
    but the trail keeps only about its length; a retry is still answered from its record."""
    store.recent_length = 20
    store.explain_window_ms = 0
    assert store.dedup_window_ms == 600_000
    e = await make_engine(store, OPEN)
    (first,) = await e.decide_batch([bytes_usage(0)])
    for n in range(1, 1000):
        await e.decide_batch([bytes_usage(n)])
    assert raw_redis.xlen(TRAIL) < 400
    admin = AdminStore(store)
    assert await admin.find_decision("acme", first.decision_id) is None
    newest = (await admin.recent("acme", count=1))[0]
    assert newest.request_id == "r999"
    assert await admin.find_decision("acme", newest.decision_id) == newest
    # the dedup window is untouched: the first usage resent is its first verdict, not counted
    (again,) = await e.decide_batch([bytes_usage(0)])
    assert again.replayed and again.decision_id == first.decision_id
    assert len(ledger_entries(raw_redis, "acme")) == 1000


TWO_TENANTS = OPEN + "  - {name: beta, plan: big}\n"


async def _until_redis_time_passes(client: redis.Redis, ms: int) -> None:
    """Wait (on Redis' own clock, which the trail's entry ids use) until ``ms`` is past."""
    for _ in range(600):
        seconds, micros = client.time()
        if seconds * 1000 + micros // 1000 > ms:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"Redis' clock never passed {ms}")


async def test_an_entry_older_than_the_explain_window_goes_one_inside_it_stays(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    """Two gateways on one Redis, one with a 400 ms explain window (acme), one with the
    default, the dedup window (beta). Both make the same decisions; once the first ones are
    older than 400 ms, acme's are trimmed (their request ids are still in the dedup window)
    and beta's are found."""
    window_ms = 400
    store.recent_length = 20
    store.explain_window_ms = window_ms
    short = await make_engine(store, TWO_TENANTS)
    other = RedisStore(store.client, recent_length=20)  # explain window: the dedup window
    assert other.explain_window_ms == other.dedup_window_ms == 600_000
    default = Engine(other, EngineSettings(store_timeout_s=2.0), Telemetry())
    await default.reload_policy()

    async def decide(n: int) -> tuple[Verdict, Verdict]:
        (a,) = await short.decide_batch([bytes_usage(n, tenant="acme")])
        (b,) = await default.decide_batch([bytes_usage(n, tenant="beta")])
        return a, b

    old_a, old_b = await decide(0)
    last = old_a
    for n in range(1, 200):  # one decision per entry: whole stream nodes fill up
        last, _ = await decide(n)
    assert last.decided_at_ms is not None
    await _until_redis_time_passes(raw_redis, last.decided_at_ms + window_ms)
    for n in range(200, 230):  # trims: each trail holds more than its length
        await decide(n)

    admin_a, admin_b = AdminStore(store), AdminStore(other)
    assert await admin_a.find_decision("acme", old_a.decision_id) is None
    assert raw_redis.exists("cp:{acme}:d:r0")  # inside the dedup window all the same
    found = await admin_b.find_decision("beta", old_b.decision_id)
    assert found is not None and found.request_id == "r0"
    assert raw_redis.xlen("cp:{beta}:recent") == 230  # nothing of beta's window trimmed
    assert raw_redis.xlen(TRAIL) < 200
    # acme's decisions made inside its window are found
    newest = (await admin_a.recent("acme", count=1))[0]
    assert newest.request_id == "r229"
    assert await admin_a.find_decision("acme", newest.decision_id) == newest


@pytest_asyncio.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    """A redis-server of this test's own, fsync always: what it acknowledged survives a kill."""
    server = EmbeddedRedis(tmp_path / "redis", fsync="always")
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


async def test_a_short_explain_window_through_a_stopped_and_a_killed_redis(
    own_redis: EmbeddedRedis,
) -> None:
    """Reports with an explain window of 0 while Redis is stopped (SIGSTOP) and then killed
    (SIGKILL, restarted from its AOF): every report answered recorded is in the ledger once,
    a resend of every report after the outage adds exactly those not recorded, and the
    trail's trimming takes nothing from the ledger."""
    store = RedisStore.from_url(
        own_redis.url, connect_timeout=0.2, recent_length=20, explain_window_ms=0
    )
    raw = redis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        engine = await make_engine(store, OPEN, store_timeout_s=0.2)
        usages = [bytes_usage(n) for n in range(600)]
        first: dict[str, Verdict] = {}
        assert own_redis.process is not None
        for n, u in enumerate(usages):
            if n == 200:
                os.kill(own_redis.process.pid, signal.SIGSTOP)
            if n == 260:
                os.kill(own_redis.process.pid, signal.SIGCONT)
            if n == 400:
                own_redis.kill()
            if n == 440:
                own_redis.start()
            (first[u.request_id],) = await engine.decide_batch([u])
        recorded = {r for r, v in first.items() if v.recorded}
        unrecorded = set(first) - recorded
        assert unrecorded, "the outage was never seen"
        assert all(first[r].reason is Reason.STORE_UNAVAILABLE for r in unrecorded)
        await engine.late_replies_settled()
        ledger = Counter(e.request_id for e in ledger_entries(raw, "acme"))
        assert {r: ledger[r] for r in recorded} == dict.fromkeys(recorded, 1)  # acknowledged
        # a report answered unavailable may have been committed late by the stopped Redis:
        # then it is in the ledger, but never twice
        assert set(ledger) <= set(first) and max(ledger.values()) == 1

        for _ in range(100):  # the breaker may still be open for a moment
            (probe,) = await engine.decide_batch([usages[0]])
            if probe.reason is not Reason.STORE_UNAVAILABLE:
                break
            await asyncio.sleep(0.05)
        again = {u.request_id: (await engine.decide_batch([u]))[0] for u in usages}
        assert all(again[r].replayed for r in recorded)
        assert all(again[r].recorded for r in again)
        ledger = Counter(e.request_id for e in ledger_entries(raw, "acme"))
        assert ledger == dict.fromkeys(first, 1)  # every report once, none twice
        assert raw.xlen(TRAIL) < 400  # the trail kept about its length throughout
    finally:
        raw.close()
        await store.close()
