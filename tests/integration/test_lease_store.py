"""Quota leases on a real redis-server: grants, reports, releases, expiry and refunds, the
dedup of retried asks, and the Lua sizing against the Python reference on random inputs."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest_asyncio
import redis

from chargepath.core.leases import LeaseAnswer, LeaseAsk, LeaseTerms, LimitRoom, grant_size
from chargepath.core.model import Decision, Reason, Subject
from chargepath.leasing import Leasing
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.leases import RedisLeaseStore
from chargepath.store.protocol import lease_index_key
from chargepath.store.redis_store import RedisStore
from tests.conftest import ledger_entries, make_engine

POLICY = """\
metrics:
  - name: api.sms.send
  - name: api.mms.send
plans:
  - name: p
    limits:
      - name: burst
        metric: api.sms.send
        rate: {{ capacity: {capacity}, refill: 1, per: hour }}
        lease: {{ max_units: {max_units}, max_share_pct: {share}, validity: 30s }}
      - name: monthly
        metric: api.sms.send
        quota: {{ amount: {quota}, per: month }}
        lease: {{ max_units: 1000000, max_share_pct: 100, validity: 60s, renew_below_pct: 10 }}
      - name: mms
        metric: api.mms.send
        rate: {{ capacity: 10, refill: 1 }}
tenants:
  - name: t1
    plan: p
"""

SUBJECT = Subject("t1")
SMS = "api.sms.send"


def policy(capacity: int = 1000, max_units: int = 100, share: int = 50, quota: int = 10**6) -> str:
    return POLICY.format(capacity=capacity, max_units=max_units, share=share, quota=quota)


@pytest_asyncio.fixture
async def leasing(store: RedisStore) -> AsyncIterator[Leasing]:
    engine = await make_engine(store, policy())
    yield Leasing(engine, RedisLeaseStore(store))


async def one(leasing: Leasing, ask: LeaseAsk) -> LeaseAnswer:
    (answer,) = await leasing.lease([ask], ["test"])
    return answer


def level(raw: redis.Redis, limit: str = "burst") -> int:
    """A bucket's whole units (a missing hash: full)."""
    v, scale = raw.hmget(f"cp:{{t1}}:r:{limit}::", ["l", "s"])
    return -1 if v is None or scale is None else int(v) // int(scale)


async def test_open_report_renew_release(leasing: Leasing, raw_redis: redis.Redis) -> None:
    a = await one(leasing, LeaseAsk("o1", SUBJECT, SMS, requested=500, holder="gw-1"))
    assert (a.decision, a.reason, a.granted, a.available) == (Decision.ALLOW, Reason.OK, 100, 100)
    assert a.lease_id and 29_000 < a.valid_for_ms <= 30_000  # the shortest validity
    assert a.renew_below == 10  # the smallest renew_below_pct: 10% of 100
    assert [(s.name, s.remaining) for s in a.limits] == [("burst", 900), ("monthly", 999_900)]

    b = await one(leasing, LeaseAsk("o2", SUBJECT, SMS, lease_id=a.lease_id, used=30, requested=50))
    assert (b.recorded, b.overage, b.granted, b.available) == (30, 0, 50, 120)

    c = await one(leasing, LeaseAsk("o3", SUBJECT, SMS, lease_id=a.lease_id, used=20, release=True))
    assert (c.recorded, c.refunded, c.closed, c.available) == (20, 100, True, 0)
    assert [(s.name, s.remaining) for s in c.limits] == [("burst", 950), ("monthly", 999_950)]

    entries = [e for e in ledger_entries(raw_redis, "t1") if e.mode == "lease"]
    assert [(e.request_id, e.amount, e.lease_id, e.overage) for e in entries] == [
        ("o2", 30, a.lease_id, 0),
        ("o3", 20, a.lease_id, 0),
    ]
    assert raw_redis.zcard(lease_index_key("t1")) == 0


async def test_overage_is_recorded_and_debited(leasing: Leasing, raw_redis: redis.Redis) -> None:
    a = await one(leasing, LeaseAsk("v1", SUBJECT, SMS, requested=10))
    b = await one(leasing, LeaseAsk("v2", SUBJECT, SMS, lease_id=a.lease_id, used=25))
    assert (b.recorded, b.overage, b.available) == (10, 15, 0)
    assert b.limits[0].remaining == 1000 - 25
    (e,) = [e for e in ledger_entries(raw_redis, "t1") if e.request_id == "v2"]
    assert (e.amount, e.overage) == (25, 15)


async def test_a_retried_ask_changes_nothing(leasing: Leasing, raw_redis: redis.Redis) -> None:
    a = await one(leasing, LeaseAsk("r1", SUBJECT, SMS, requested=40))
    again = await one(leasing, LeaseAsk("r1", SUBJECT, SMS, requested=40))
    assert again.replayed and again.lease_id == a.lease_id and again.granted == 40
    assert raw_redis.zcard(lease_index_key("t1")) == 1
    rep = LeaseAsk("r2", SUBJECT, SMS, lease_id=a.lease_id, used=7)
    await one(leasing, rep)
    assert (await one(leasing, rep)).replayed
    assert sum(e.amount for e in ledger_entries(raw_redis, "t1")) == 7
    other = await one(leasing, LeaseAsk("r2", SUBJECT, SMS, lease_id=a.lease_id, used=8))
    assert (other.reason, other.violations[0].field) == (Reason.INVALID_USAGE, "request_id")


async def test_a_limit_without_lease_settings_refuses(leasing: Leasing) -> None:
    a = await one(leasing, LeaseAsk("n1", SUBJECT, "api.mms.send", requested=1))
    assert (a.decision, a.reason) == (Decision.DENY, Reason.NO_ENTITLEMENT)
    assert "'mms'" in a.message


async def test_grants_shrink_and_end_with_final_units(store: RedisStore) -> None:
    engine = await make_engine(store, policy(capacity=100, max_units=1000, share=50))
    leasing = Leasing(engine, RedisLeaseStore(store))
    grants = []
    for n in range(12):
        a = await one(leasing, LeaseAsk(f"s{n}", SUBJECT, SMS, requested=1000))
        grants.append(a.granted)
        if a.final_units:
            break
    assert grants == [50, 25, 12, 6, 3, 2, 1, 1]  # half of what remains, at least one
    assert sum(grants) == 100
    refused = await one(leasing, LeaseAsk("s-last", SUBJECT, SMS, requested=1))
    assert (refused.decision, refused.reason, refused.granted) == (
        Decision.THROTTLE,
        Reason.RATE_LIMITED,
        0,
    )
    assert refused.retry_after_ms > 0 and refused.lease_id == ""


async def test_expiry_gives_the_units_back(
    store: RedisStore, redis_server: EmbeddedRedis, raw_redis: redis.Redis
) -> None:
    engine = await make_engine(store, policy())
    leasing = Leasing(engine, RedisLeaseStore(store))
    a = await one(leasing, LeaseAsk("e1", SUBJECT, SMS, requested=100))
    await one(leasing, LeaseAsk("e2", SUBJECT, SMS, lease_id=a.lease_id, used=30))
    assert level(raw_redis) == 900
    # a store whose clock is 31 s ahead sees the lease expired
    later = RedisStore.from_url(redis_server.url, connect_timeout=1.0, clock_offset_ms=31_000)
    try:
        leases = RedisLeaseStore(later)
        assert await leases.sweep("t1") == 1
        assert await leases.sweep("t1") == 0
        # 70 units back, 30 spent; the bucket refilled ~31 s at 1/hour meanwhile
        assert level(raw_redis) == 970
        assert raw_redis.zcard(lease_index_key("t1")) == 0
        late = await one(
            Leasing(engine, leases), LeaseAsk("e3", SUBJECT, SMS, lease_id=a.lease_id, used=5)
        )
        assert (late.decision, late.reason, late.overage, late.closed) == (
            Decision.DENY,
            Reason.LEASE_EXPIRED,
            5,
            True,
        )
    finally:
        await later.close()
    assert sum(e.amount for e in ledger_entries(raw_redis, "t1")) == 35


async def test_state_lists_the_open_leases(leasing: Leasing) -> None:
    a = await one(leasing, LeaseAsk("l1", SUBJECT, SMS, requested=10, holder="gw-7"))
    await one(leasing, LeaseAsk("l2", SUBJECT, SMS, lease_id=a.lease_id, used=4))
    await one(leasing, LeaseAsk("l3", Subject("t1", "s1"), SMS, requested=5))
    assert isinstance(leasing.store, RedisLeaseStore)
    _, views = await leasing.store.leases(SUBJECT)
    (v,) = views
    assert (v.lease_id, v.holder, v.granted, v.used, v.available) == (a.lease_id, "gw-7", 10, 4, 6)
    assert [(h.limit, h.units) for h in v.holds] == [("burst", 6), ("monthly", 6)]


async def test_lua_sizing_equals_the_python_reference(store: RedisStore) -> None:
    rng = random.Random(16)
    for case in range(40):
        capacity = rng.randint(1, 5000)
        max_units, share = rng.randint(1, 3000), rng.randint(1, 100)
        quota = rng.randint(1, 5000)
        engine = await make_engine(
            store, policy(capacity=capacity, max_units=max_units, share=share, quota=quota)
        )
        await store.client.flushall()
        await store.publish_policy(engine.policy.document, force=True)
        await engine.reload_policy()
        leasing = Leasing(engine, RedisLeaseStore(store))
        rate_left, quota_left = capacity, quota
        for n in range(4):
            requested = rng.randint(1, 4000)
            a = await one(leasing, LeaseAsk(f"p{case}-{n}", SUBJECT, SMS, requested=requested))
            rooms = [
                LimitRoom(rate_left, LeaseTerms(max_units, share, 30_000)),
                LimitRoom(quota_left, LeaseTerms(1_000_000, 100, 60_000)),
            ]
            expected = grant_size(requested, rooms)
            assert a.granted == expected, (case, n, rate_left, quota_left, requested)
            rate_left -= expected
            quota_left -= expected
            # the refill of 1 unit/hour adds nothing within a test
            assert a.limits[0].remaining == rate_left or a.granted == 0
