"""Decision semantics against a real redis-server: all-or-nothing, debt, quotas, periods."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import redis

from chargepath.core.model import Decision, Mode, Reason, Subject, Usage
from chargepath.core.periods import HOUR_MS, Period, period_bounds
from chargepath.engine import Engine
from chargepath.store.admin import AdminStore
from chargepath.store.redis_store import RedisStore
from tests.conftest import make_engine
from tests.integration.policies import NESTED, OPEN, QUOTAS, REPORTING

_n = 0


def usage(
    tenant: str,
    metric: str,
    amount: int,
    mode: Mode = Mode.ADMIT,
    *,
    slice_: str = "",
    key: str = "",
    rid: str | None = None,
) -> Usage:
    global _n
    _n += 1
    return Usage(rid or f"r{_n}", Subject(tenant, slice_, key), metric, amount, mode)


def level(raw: redis.Redis, key: str) -> int | None:
    v = raw.hget(key, "l")
    return None if v is None else int(v)  # type: ignore[arg-type]


async def test_admit_is_all_or_nothing_across_tenant_slice_and_key(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, NESTED)
    # key k1 holds 4, slice s1 holds 6, tenant holds 10
    v = await e.check(usage("acme", "api.sms.send", 4, slice_="s1", key="k1"))
    assert v.decision is Decision.ALLOW and v.recorded
    assert [lim.remaining for lim in v.limits] == [6, 2, 0]
    # one more on k1: the key limit refuses, and nothing is taken from the tenant or slice
    v = await e.check(usage("acme", "api.sms.send", 1, slice_="s1", key="k1"))
    assert (v.decision, v.reason) == (Decision.THROTTLE, Reason.RATE_LIMITED)
    assert [lim.exceeded for lim in v.limits] == [False, False, True]
    assert [lim.remaining for lim in v.limits] == [6, 2, 0]
    # a second key in the same slice: the slice (2 left) refuses 3, nothing taken anywhere
    v = await e.check(usage("acme", "api.sms.send", 3, slice_="s1", key="k2"))
    assert v.decision is Decision.THROTTLE
    assert [lim.exceeded for lim in v.limits] == [False, True, False]
    assert [lim.remaining for lim in v.limits] == [6, 2, 4]
    # raw Redis agrees: one hour refill = 1 unit, so sub-units per unit = 3_600_000
    scale = 3_600_000
    t = level(raw_redis, "cp:{acme}:r:per-tenant::")
    assert t is not None and 6 * scale <= t < 7 * scale
    assert raw_redis.exists("cp:{acme}:r:per-key:s1:k2") == 0
    # the refill is exact: waiting retry_after would fit, not one ms less
    v = await e.check(usage("acme", "api.sms.send", 1, slice_="s1", key="k1"))
    assert 0 < v.retry_after_ms <= 3_600_000


async def test_amount_larger_than_capacity_is_deny_not_throttle(store: RedisStore) -> None:
    e = await make_engine(store, NESTED)
    v = await e.check(usage("acme", "api.sms.send", 5, slice_="s1", key="k1"))
    assert (v.decision, v.reason) == (Decision.DENY, Reason.AMOUNT_EXCEEDS_CAPACITY)
    assert v.retry_after_ms == 0 and not v.recorded


async def test_report_debits_past_the_limit_and_throttles_exactly(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, REPORTING)
    v = await e.check(usage("mvno", "slice.bytes", 2500, Mode.REPORT, slice_="s1"))
    # 1000 capacity - 2500 = 1500 units of debt at 100/s: exactly 15 s to be out of debt
    assert (v.decision, v.reason) == (Decision.THROTTLE, Reason.RATE_LIMITED)
    assert v.recorded and v.retry_after_ms == 15_000
    rate = next(lim for lim in v.limits if lim.name == "bytes-rate")
    assert rate.remaining == -1500 and rate.exceeded
    assert level(raw_redis, "cp:{mvno}:r:bytes-rate:s1:") == -1500 * 10
    # the hourly quota (5000) is debited too; using the rest of it says stop
    v = await e.check(usage("mvno", "slice.bytes", 2500, Mode.REPORT, slice_="s1"))
    assert (v.decision, v.reason) == (Decision.DENY, Reason.QUOTA_EXHAUSTED)
    assert v.recorded
    hourly = next(lim for lim in v.limits if lim.name == "bytes-hourly")
    assert hourly.remaining == 0 and hourly.exceeded
    # retry_after of a quota DENY is the time until the hour resets, on Redis' clock
    now = v.decided_at_ms
    assert v.retry_after_ms == period_bounds(now, Period.HOUR)[1] - now
    # reports past the quota are still recorded and debited
    v = await e.check(usage("mvno", "slice.bytes", 10, Mode.REPORT, slice_="s1"))
    assert v.recorded and v.decision is Decision.DENY
    assert raw_redis.hget("cp:{mvno}:q:bytes-hourly:s1:", "u") == "5010"
    # an admit, by contrast, takes nothing once the quota is gone
    v = await e.check(usage("mvno", "slice.bytes", 1, slice_="s1"))
    assert (v.decision, v.reason) == (Decision.DENY, Reason.QUOTA_EXHAUSTED)
    assert raw_redis.hget("cp:{mvno}:q:bytes-hourly:s1:", "u") == "5010"


async def _engine_at(store: RedisStore, policy: str, target_ms: int) -> Engine:
    """An engine whose store clock reads ``target_ms`` now (Redis TIME + an offset)."""
    sec, usec = await store.client.time()  # type: ignore[misc]
    redis_now = int(sec) * 1000 + int(usec) // 1000
    store.clock_offset_ms = target_ms - redis_now
    return await make_engine(store, policy)


async def test_quota_resets_at_the_period_boundary(store: RedisStore) -> None:
    boundary = int(datetime(2027, 3, 1, tzinfo=UTC).timestamp() * 1000)
    e = await _engine_at(store, QUOTAS, boundary - 2000)
    v = await e.check(usage("mvno", "slice.bytes", 5000, Mode.REPORT, slice_="s1"))
    assert (v.decision, v.reason) == (Decision.DENY, Reason.QUOTA_EXHAUSTED)
    monthly = next(lim for lim in v.limits if lim.name == "bytes-monthly")
    hourly = next(lim for lim in v.limits if lim.name == "bytes-hourly")
    # February 2027 ends in about 2 s, on the store's clock
    assert 0 < monthly.reset_after_ms <= 2000
    assert monthly.reset_after_ms == hourly.reset_after_ms
    # cross the boundary: both the hour and the month start afresh
    e = await _engine_at(store, QUOTAS, boundary + 500)
    v = await e.check(usage("mvno", "slice.bytes", 1, slice_="s1"))
    assert v.decision is Decision.ALLOW
    monthly = next(lim for lim in v.limits if lim.name == "bytes-monthly")
    hourly = next(lim for lim in v.limits if lim.name == "bytes-hourly")
    assert hourly.remaining == 4999 and monthly.remaining == 999_999
    march_end = int(datetime(2027, 4, 1, tzinfo=UTC).timestamp() * 1000)
    assert abs(monthly.reset_after_ms - (march_end - boundary - 500)) < 1000
    assert abs(hourly.reset_after_ms - (HOUR_MS - 500)) < 1000


async def test_leap_day_month_in_lua_matches_python(store: RedisStore) -> None:
    leap = int(datetime(2028, 2, 29, 23, 0, tzinfo=UTC).timestamp() * 1000)
    e = await _engine_at(store, QUOTAS, leap)
    v = await e.check(usage("mvno", "slice.bytes", 1, Mode.REPORT, slice_="s9"))
    monthly = next(lim for lim in v.limits if lim.name == "bytes-monthly")
    assert (
        monthly.reset_after_ms == period_bounds(v.decided_at_ms, Period.MONTH)[1] - v.decided_at_ms
    )


async def test_unknown_tenant_and_unentitled_metric_are_denied(store: RedisStore) -> None:
    e = await make_engine(store, NESTED)
    for u in (usage("nobody", "api.sms.send", 1), usage("acme", "slice.bytes", 1)):
        v = await e.check(u)
        assert (v.decision, v.reason, v.recorded) == (Decision.DENY, Reason.NO_ENTITLEMENT, False)


async def test_idle_full_buckets_cost_nothing(store: RedisStore, raw_redis: redis.Redis) -> None:
    e = await make_engine(store, OPEN)
    await e.check(usage("acme", "slice.bytes", 1000, slice_="s1"))
    key = "cp:{acme}:r:bytes:s1:"
    # 1000 units at 1e9/s refill: full again within a millisecond, so the key expires at once
    ttl = raw_redis.pttl(key)
    assert ttl <= 2  # type: ignore[operator]
    await asyncio.sleep(0.01)
    assert raw_redis.exists(key) == 0
    # memory per active bucket (issue 6 asks <= 200 bytes)
    await e.check(usage("acme", "api.sms.send", 1, key="k1"))
    mem = raw_redis.memory_usage("cp:{acme}:r:sms::k1")
    assert mem is not None and mem <= 200


async def test_without_ok_limits_only_a_verdict_that_is_not_ok_carries_limits(
    store: RedisStore,
) -> None:
    """The basic view: the store replies no limit states for a verdict with reason OK, and
    still keeps them in the trail for explain."""
    e = await make_engine(store, REPORTING)
    # bytes-rate holds 1000 with no debt yet: 600 is OK, the next 600 goes 200 into debt
    first, second = await e.decide_batch(
        [
            usage("mvno", "slice.bytes", 600, Mode.REPORT, slice_="s1"),
            usage("mvno", "slice.bytes", 600, Mode.REPORT, slice_="s1"),
        ],
        ok_limits=False,
    )
    assert (first.decision, first.reason, first.limits) == (Decision.ALLOW, Reason.OK, ())
    assert (second.decision, second.reason) == (Decision.THROTTLE, Reason.RATE_LIMITED)
    assert [lim.name for lim in second.limits] == ["bytes-rate", "bytes-hourly", "bytes-monthly"]
    assert second.limits[0].remaining == -200 and second.limits[0].exceeded
    explained = await AdminStore(store).find_decision("mvno", first.decision_id)
    assert explained is not None
    rate = explained.limits[0]
    assert (rate.name, rate.remaining_before, rate.remaining_after) == ("bytes-rate", 1000, 400)
