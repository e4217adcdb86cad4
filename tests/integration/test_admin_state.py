"""The admin API's live state (AdminStore.read_limits) reads counters with decide.lua's own rules
(read_limits.lua, from the same Lua libraries): what it shows is what the next decision starts
from, across a grant and a plan change that converts and clamps a bucket."""

from __future__ import annotations

import pytest
import redis

from chargepath.core.model import Decision, Mode, Subject, Usage
from chargepath.core.plans import PolicyError, load_policy_text
from chargepath.store.admin import AdminStore
from chargepath.store.redis_store import POLICY_KEY, RedisStore
from chargepath.transport.mapping import limit_state_to_pb
from tests.conftest import make_engine

POLICY = """
metrics: [{{name: api.sms.send}}]
plans:
  - name: p
    limits:
      - {{name: burst, metric: api.sms.send, scope: key,
         rate: {{capacity: {capacity}, refill: 1, per: {per}}}}}
      - {{name: daily, metric: api.sms.send, scope: key, quota: {{amount: 100, per: day}}}}
tenants:
  - {{name: acme, plan: p}}
"""

SUBJECT = Subject("acme", "", "k1")


def admit(n: int, amount: int) -> Usage:
    return Usage(f"state-{n}", SUBJECT, "api.sms.send", amount, Mode.ADMIT)


async def test_state_is_what_the_next_decision_starts_from(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    engine = await make_engine(store, POLICY.format(capacity=10, per="hour"))
    admin = AdminStore(store)
    v = await engine.check(admit(1, 7))
    assert v.decision is Decision.ALLOW
    limits = engine.policy.resolve(SUBJECT, "api.sms.send").limits

    now, (rate, daily), grants = await admin.read_limits(SUBJECT, limits)
    # 1 unit an hour: 3 of 10 left, a full bucket in 7 hours (less the ms since the decision)
    assert (rate.remaining, rate.capacity, rate.used, rate.granted) == (3, 10, 0, 0)
    assert 7 * 3_600_000 - (now - v.decided_at_ms) == rate.reset_after_ms
    assert (daily.remaining, daily.capacity, daily.used, daily.granted) == (93, 100, 7, 0)
    assert daily.reset_after_ms == 86_400_000 - now % 86_400_000
    assert grants == []

    granted = await admin.grant(SUBJECT, limits[1], 50, 0, "goodwill")
    assert granted is not None
    _, (_, daily), grants = await admin.read_limits(SUBJECT, limits)
    assert (daily.remaining, daily.capacity, daily.used, daily.granted) == (143, 150, 7, 50)
    assert [(g.grant_id, g.limit, g.amount, g.expires_at_ms, g.note) for g in grants] == [
        (granted[0], "daily", 50, 0, "goodwill")
    ]

    # A plan change: 2 units at 1 a second. The level (3 units, in sub-units of 3,600,000 per
    # unit) is converted to 1,000 per unit and clamped to the new capacity.
    await store.publish_policy(load_policy_text(POLICY.format(capacity=2, per="second")))
    await engine.reload_policy()
    limits = engine.policy.resolve(SUBJECT, "api.sms.send").limits
    _, (rate, _), _ = await admin.read_limits(SUBJECT, limits)
    assert (rate.remaining, rate.capacity, rate.reset_after_ms) == (2, 2, 0)
    nxt = await engine.check(admit(2, 2))
    assert nxt.decision is Decision.ALLOW and nxt.limits[0].remaining == 0
    # the stored bucket is now in the new limit's sub-units
    key = "cp:{acme}:r:burst::k1"
    assert raw_redis.hget(key, "s") == "1000"
    _, (rate, daily), _ = await admin.read_limits(SUBJECT, limits)
    assert rate.remaining == 0 and 0 < rate.reset_after_ms <= 2000
    assert (daily.used, daily.remaining) == (9, 141)


WEEKLY = """
metrics: [{name: api.sms.send, unit: message}]
plans:
  - name: w
    limits:
      - {name: weekly, metric: api.sms.send, scope: key, quota: {amount: 5, per: week}}
tenants:
  - {name: acme, plan: w}
"""
WEEK_MS = 7 * 86_400_000
#: 1970-01-01 was a Thursday: ISO weeks start 3 days before the epoch's multiples of 7 days
MONDAY_OFFSET_MS = 3 * 86_400_000


async def test_a_weekly_quota_is_decided_and_shown_until_next_monday(store: RedisStore) -> None:
    engine = await make_engine(store, WEEKLY)
    admin = AdminStore(store)
    verdicts = [await engine.check(admit(100 + n, 2)) for n in range(3)]
    assert [v.decision for v in verdicts] == [Decision.ALLOW, Decision.ALLOW, Decision.DENY]
    first = verdicts[0]
    # Redis' clock, in the decide script: the reset is the next Monday 00:00 UTC
    monday_next = first.decided_at_ms - (first.decided_at_ms + MONDAY_OFFSET_MS) % WEEK_MS
    monday_next += WEEK_MS
    assert first.limits[0].reset_after_ms == monday_next - first.decided_at_ms
    assert verdicts[2].retry_after_ms == monday_next - verdicts[2].decided_at_ms

    limits = engine.policy.resolve(SUBJECT, "api.sms.send").limits
    now, (weekly,), _ = await admin.read_limits(SUBJECT, limits)
    assert (weekly.used, weekly.remaining, weekly.capacity) == (4, 1, 5)
    assert weekly.reset_after_ms == monday_next - now
    # GetState's limit: the period by name
    shown = limit_state_to_pb("w", "api.sms.send", limits[0], weekly)
    assert (shown.per, shown.used, shown.capacity) == ("week", 4, 5)


async def test_a_live_policy_published_with_a_unit_before_the_list_still_loads(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    """A policy published before units came from a list (``unit: MB``) is what the store holds:
    the gateway loads it and decides; a new document with that unit is refused."""
    engine = await make_engine(store, WEEKLY)
    doc = raw_redis.hget(POLICY_KEY, "doc")
    assert isinstance(doc, str) and '"unit":"message"' in doc
    raw_redis.hset(POLICY_KEY, "doc", doc.replace('"unit":"message"', '"unit":"MB"'))
    loaded = await store.load_policy()
    assert loaded is not None and loaded.document.metrics[0].unit == "MB"
    await engine.reload_policy()
    assert (await engine.check(admit(200, 1))).decision is Decision.ALLOW
    with pytest.raises(PolicyError, match="unknown unit 'MB'"):
        load_policy_text(loaded.document.model_dump_json())
