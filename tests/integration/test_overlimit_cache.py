"""The over-limit cache against the real store: it never refuses what a fresh decision allows.

Two tenants on the same plan, one decided by an engine with the cache (``twin-a``), one by
an engine without it (``twin-b``), get the same sequence of admits (random amounts, several
subjects and metrics), the same grants, the same plan change and the same clock jumps (the
store's clock offset and the cache's clock move together). Each admit is decided for
``twin-b`` first, then for ``twin-a``: whatever the cache answers must be what the store
answered the twin a moment before.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable

import pytest_asyncio
import redis

from chargepath.core.leases import LeaseAsk
from chargepath.core.model import Decision, Mode, Reason, Subject, Usage
from chargepath.core.overlimit import CACHED_MESSAGE, OverLimitCache
from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine, EngineSettings, monotonic_ms, new_decision_id
from chargepath.leasing import Leasing
from chargepath.room_watch import RoomWatch
from chargepath.store.admin import AdminStore
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.leases import RedisLeaseStore
from chargepath.store.redis_store import RedisStore
from chargepath.store.room import RedisRoomEvents
from chargepath.telemetry import Telemetry
from tests.conftest import ledger_entries

TWINS = """
metrics: [{name: api.sms.send}, {name: api.voice.minutes}]
plans:
  - name: twin
    limits:
      - {name: sms-key, metric: api.sms.send, scope: key,
         rate: {capacity: CAP, refill: 2, per: minute}}
      - {name: sms-tenant, metric: api.sms.send, scope: tenant,
         rate: {capacity: 30, refill: 6, per: minute}}
      - {name: voice-hour, metric: api.voice.minutes, scope: key,
         quota: {amount: 25, per: hour}}
      - {name: voice-rate, metric: api.voice.minutes, scope: tenant,
         rate: {capacity: 12, refill: 1, per: minute}}
tenants:
  - {name: twin-a, plan: twin}
  - {name: twin-b, plan: twin}
"""


def policy(capacity: int) -> str:
    return TWINS.replace("CAP", str(capacity))


class Watched:
    """An engine with the over-limit cache, its room-events job running."""

    def __init__(self, engine: Engine, cache: OverLimitCache, task: asyncio.Task[None]) -> None:
        self.engine = engine
        self.cache = cache
        self.task = task

    async def heard(self, before: int) -> None:
        """Wait until the cache heard a room event after ``before`` invalidations."""
        await until(lambda: self.cache.stats.invalidations > before)


@pytest_asyncio.fixture
async def cached(store: RedisStore) -> AsyncIterator[Callable[[], Watched]]:
    draining = asyncio.Event()
    made: list[Watched] = []

    def make() -> Watched:
        cache = OverLimitCache(
            lambda: monotonic_ms() + store.clock_offset_ms,
            lambda: time.time_ns() // 1_000_000,
            new_decision_id,
        )
        engine = Engine(store, EngineSettings(store_timeout_s=2.0), Telemetry(), overlimit=cache)
        task = asyncio.create_task(RoomWatch(RedisRoomEvents(store.client), cache).run(draining))
        made.append(Watched(engine, cache, task))
        return made[-1]

    yield make
    draining.set()
    for w in made:
        w.task.cancel()
    await asyncio.gather(*(w.task for w in made), return_exceptions=True)


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``condition`` (a state of the cache, which has no event to wait on) until true."""
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


async def live(w: Watched) -> None:
    await until(lambda: w.cache.live)


def copy_counters(raw: redis.Redis, source: str, target: str) -> None:
    """Make ``target``'s buckets, quotas and grants those of ``source`` (with their ttl)."""
    for key in raw.keys(f"cp:{{{target}}}:[rqg]:*"):
        raw.delete(key)
    for key in raw.keys(f"cp:{{{source}}}:[rqg]:*"):
        name = key.decode().replace(f"{{{source}}}", f"{{{target}}}", 1)
        ttl = raw.pttl(key)
        raw.restore(name, max(ttl, 0), raw.dump(key), replace=True)  # type: ignore[arg-type]


async def test_the_cache_answers_exactly_what_a_gateway_without_it_answers(
    store: RedisStore,
    raw_redis: redis.Redis,
    redis_server: EmbeddedRedis,
    cached: Callable[[], Watched],
) -> None:
    await store.publish_policy(load_policy_text(policy(8)))
    a = cached()
    b = Engine(store, EngineSettings(store_timeout_s=2.0), Telemetry())
    await a.engine.reload_policy()
    await b.reload_policy()
    await live(a)
    admin = AdminStore(store)
    raw = redis.Redis.from_url(redis_server.url)
    rng = random.Random(1616)
    subjects = [("k1", "api.sms.send"), ("k2", "api.sms.send"), ("k1", "api.voice.minutes")]
    last_retry = 0
    hits = edges = 0
    allowed_a: list[str] = []
    mismatches: list[str] = []
    steps = 420
    for step in range(steps):
        if step in (140, 300):  # a grant mid-way
            before = a.cache.stats.invalidations
            lim = next(
                lim
                for _, lim in a.engine.policy.entitlements["twin-a"].limits
                if lim.name == "voice-hour"
            )
            assert await admin.grant(Subject("twin-a", key="k1"), lim, 15, 0, "test") is not None
            await a.heard(before)
        if step == 220:  # a plan change: a larger bucket per key
            before = a.cache.stats.invalidations
            await store.publish_policy(load_policy_text(policy(14)))
            await a.heard(before)
        roll = rng.random()
        if roll < 0.15:  # the clock moves: at times exactly around the last retry_after
            jump = last_retry + rng.randint(-3, 3) if last_retry and roll < 0.08 else 0
            jump = jump or rng.choice([50, 500, 4_000, 20_000, 65_000, 3_600_000])
            store.clock_offset_ms += max(jump, 1)
        # the twin starts each step from the cached gateway's state, and decides first
        copy_counters(raw, "twin-a", "twin-b")
        key, metric = rng.choice(subjects)
        amount = rng.randint(1, 6)
        vb = await b.check(
            Usage(f"b-{step}", Subject("twin-b", key=key), metric, amount, Mode.ADMIT)
        )
        va = await a.engine.check(
            Usage(f"a-{step}", Subject("twin-a", key=key), metric, amount, Mode.ADMIT)
        )
        from_cache = va.message == CACHED_MESSAGE
        hits += from_cache
        if va.decision is Decision.ALLOW:
            allowed_a.append(va.request_id)
        if vb.retry_after_ms:
            last_retry = vb.retry_after_ms
        if (
            not from_cache
            and va.decision is Decision.ALLOW
            and vb.decision is not Decision.ALLOW
            and 0 < vb.retry_after_ms <= 50
        ):
            # Both from the store, the twin's a moment earlier, on the edge of a refill or a
            # period (the clock jumps aim there): time, not the cache.
            edges += 1
            continue
        if (va.decision, va.reason) != (vb.decision, vb.reason):
            mismatches.append(
                f"step {step} {key} {metric} x{amount}: cached={from_cache} "
                f"{va.decision.name}/{va.reason.name} vs {vb.decision.name}/{vb.reason.name}"
            )
    raw.close()
    assert mismatches == [], "\n".join(mismatches)
    assert edges <= steps // 20, edges
    # the sequence exercised the cache: many answers came from it, and it expired, was
    # invalidated and learned again along the way
    assert hits >= steps // 10, hits  # (how many depends on where in the hour the run starts)
    assert a.cache.stats.learned > 10
    assert a.cache.stats.invalidations >= 3
    # what the cached gateway allowed is in its ledger, once; nothing else is
    assert [e.request_id for e in ledger_entries(raw_redis, "twin-a")] == allowed_a


async def test_a_retry_of_an_allowed_admit_is_answered_from_the_record_not_refused(
    store: RedisStore, raw_redis: redis.Redis, cached: Callable[[], Watched]
) -> None:
    await store.publish_policy(load_policy_text(policy(8)))
    a = cached()
    await a.engine.reload_policy()
    await live(a)
    subject = Subject("twin-a", key="k9")
    paid = Usage("paid", subject, "api.sms.send", 5, Mode.ADMIT)
    first = await a.engine.check(paid)
    assert first.decision is Decision.ALLOW and first.recorded
    refused = await a.engine.check(Usage("more", subject, "api.sms.send", 5, Mode.ADMIT))
    assert refused.decision is Decision.THROTTLE and refused.message != CACHED_MESSAGE
    cached_one = await a.engine.check(Usage("again", subject, "api.sms.send", 6, Mode.ADMIT))
    assert cached_one.message == CACHED_MESSAGE  # the entry answers amounts of 5 and more
    # the allowed request id, resent (unmarked, as a client retrying elsewhere-first would):
    # the store's record answers, ALLOW replayed, never a cached THROTTLE
    again = await a.engine.check(paid)
    assert again.decision is Decision.ALLOW and again.replayed
    assert again.decision_id == first.decision_id
    # a marked retry of an id never decided here goes to the store too
    marked = await a.engine.check(
        Usage("retry-x", subject, "api.sms.send", 5, Mode.ADMIT), retried=True
    )
    assert marked.message != CACHED_MESSAGE and marked.decision is Decision.THROTTLE
    assert [e.request_id for e in ledger_entries(raw_redis, "twin-a")] == ["paid"]


async def test_without_a_subscription_the_cache_is_off(
    store: RedisStore, redis_server: EmbeddedRedis, cached: Callable[[], Watched]
) -> None:
    await store.publish_policy(load_policy_text(policy(8)))
    a = cached()
    await a.engine.reload_policy()
    await live(a)
    subject = Subject("twin-a", key="k7")
    await a.engine.check(Usage("fill", subject, "api.sms.send", 8, Mode.ADMIT))
    await a.engine.check(Usage("learn", subject, "api.sms.send", 1, Mode.ADMIT))
    hit = await a.engine.check(Usage("hit", subject, "api.sms.send", 1, Mode.ADMIT))
    assert hit.message == CACHED_MESSAGE
    # the subscription's connection is killed: the cache turns off and forgets
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        for c in client.client_list(_type="pubsub"):
            client.client_kill_filter(_id=c["id"])
    finally:
        client.close()
    await until(lambda: len(a.cache) == 0)
    miss = await a.engine.check(Usage("miss", subject, "api.sms.send", 1, Mode.ADMIT))
    assert miss.message != CACHED_MESSAGE and miss.decision is Decision.THROTTLE
    await live(a)  # and on again once resubscribed
    await a.engine.check(Usage("learn2", subject, "api.sms.send", 1, Mode.ADMIT))
    back = await a.engine.check(Usage("hit2", subject, "api.sms.send", 1, Mode.ADMIT))
    assert back.message == CACHED_MESSAGE and back.reason is Reason.RATE_LIMITED


async def test_reports_are_never_answered_by_the_cache(
    store: RedisStore, raw_redis: redis.Redis, cached: Callable[[], Watched]
) -> None:
    await store.publish_policy(load_policy_text(policy(8)))
    a = cached()
    await a.engine.reload_policy()
    await live(a)
    subject = Subject("twin-a", key="k5")
    await a.engine.check(Usage("fill", subject, "api.sms.send", 8, Mode.ADMIT))
    await a.engine.check(Usage("learn", subject, "api.sms.send", 1, Mode.ADMIT))
    rep = await a.engine.check(Usage("rep", subject, "api.sms.send", 2, Mode.REPORT))
    assert rep.recorded and rep.message != CACHED_MESSAGE
    assert [e.request_id for e in ledger_entries(raw_redis, "twin-a")] == ["fill", "rep"]


LEASED = """
metrics: [{name: api.sms.send}]
plans:
  - name: leased
    limits:
      - {name: sms-key, metric: api.sms.send, scope: key,
         rate: {capacity: 10, refill: 1, per: hour},
         lease: {max_units: 10, max_share_pct: 100, validity: 30s}}
tenants:
  - {name: twin-a, plan: leased}
"""


async def test_a_lease_release_gives_room_and_empties_the_cache(
    store: RedisStore, cached: Callable[[], Watched]
) -> None:
    await store.publish_policy(load_policy_text(LEASED))
    a = cached()
    await a.engine.reload_policy()
    await live(a)
    leasing = Leasing(a.engine, RedisLeaseStore(store))
    subject = Subject("twin-a", key="k1")
    (opened,) = await leasing.lease([LeaseAsk("l-1", subject, "api.sms.send", requested=8)], ["t"])
    assert opened.granted == 8
    await a.engine.check(Usage("u-1", subject, "api.sms.send", 2, Mode.ADMIT))
    refused = await a.engine.check(Usage("u-2", subject, "api.sms.send", 2, Mode.ADMIT))
    assert refused.decision is Decision.THROTTLE
    hit = await a.engine.check(Usage("u-3", subject, "api.sms.send", 2, Mode.ADMIT))
    assert hit.message == CACHED_MESSAGE
    before = a.cache.stats.invalidations
    (released,) = await leasing.lease(
        [LeaseAsk("l-2", subject, "api.sms.send", lease_id=opened.lease_id, used=1, release=True)],
        ["t"],
    )
    assert released.refunded == 7
    await a.heard(before)
    room = await a.engine.check(Usage("u-4", subject, "api.sms.send", 2, Mode.ADMIT))
    assert room.decision is Decision.ALLOW and room.message != CACHED_MESSAGE
