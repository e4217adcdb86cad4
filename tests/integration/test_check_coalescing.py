"""Checks of one tenant that arrive together share one store call, and stay exact."""

from __future__ import annotations

import asyncio

import redis

from chargepath.core.model import Decision, Mode, Reason, Subject, Usage
from chargepath.core.validation import MAX_BATCH
from chargepath.store.redis_store import RedisStore
from tests.conftest import make_engine
from tests.integration.policies import OPEN


def script_calls(raw: redis.Redis) -> int:
    stats = raw.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


async def test_concurrent_checks_of_a_tenant_share_a_store_call_and_stay_exact(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, OPEN)
    # key k1 holds 5 per minute: of 12 concurrent admits of 1, exactly 5 are allowed
    usages = [
        Usage(f"co-{i}", Subject("acme", key="k1"), "api.sms.send", 1, Mode.ADMIT)
        for i in range(12)
    ]
    before = script_calls(raw_redis)
    verdicts = await asyncio.gather(*(e.check(u) for u in usages))
    calls = script_calls(raw_redis) - before
    assert calls < len(usages)
    assert [v.request_id for v in verdicts] == [u.request_id for u in usages]
    decided = [(v.decision, v.reason) for v in verdicts]
    # in arrival order: the first five fit, the rest wait for the refill
    assert decided[:5] == [(Decision.ALLOW, Reason.OK)] * 5
    assert decided[5:] == [(Decision.THROTTLE, Reason.RATE_LIMITED)] * 7
    assert [v.limits[0].remaining for v in verdicts[:5]] == [4, 3, 2, 1, 0]
    assert len({v.decision_id for v in verdicts}) == len(verdicts)


async def test_a_cancelled_check_does_not_cancel_the_others_of_its_batch(
    store: RedisStore,
) -> None:
    e = await make_engine(store, OPEN)
    usages = [
        Usage(f"cx-{i}", Subject("acme", key="k2"), "api.sms.send", 1, Mode.ADMIT) for i in range(3)
    ]
    tasks = [asyncio.ensure_future(e.check(u)) for u in usages]
    await asyncio.sleep(0)  # every check is waiting for the shared store call
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert [v.decision for v in (done[0], done[2])] == [Decision.ALLOW, Decision.ALLOW]  # type: ignore[union-attr]
    # the cancelled one was decided all the same (its caller just stopped waiting): its
    # resend is a replay, and the bucket counted 3
    again = await e.check(usages[1])
    assert again.replayed and again.decision is Decision.ALLOW


async def test_a_burst_beyond_a_batch_is_split_and_stays_exact(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, OPEN)
    n = MAX_BATCH + 5
    usages = [
        Usage(f"burst-{i}", Subject("acme", key="k3"), "api.sms.send", 1, Mode.ADMIT)
        for i in range(n)
    ]
    before = script_calls(raw_redis)
    verdicts = await asyncio.gather(*(e.check(u) for u in usages))
    assert script_calls(raw_redis) - before >= 2  # no script call decides more than MAX_BATCH
    assert sum(v.decision is Decision.ALLOW for v in verdicts) == 5  # the key holds 5
    assert [v.request_id for v in verdicts] == [u.request_id for u in usages]
