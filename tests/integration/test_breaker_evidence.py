"""Issue #13 item 3, on a real redis-server: the breaker opens only on evidence that the
store is unhealthy (a failed probe), never on store timeouts alone; it closes on the store's
first answer; store calls beyond the admission bound wait outside their store timeout, and
that wait is bounded. Each test pauses Redis (``CLIENT PAUSE``) and then counts what was
acknowledged against what the ledger holds."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from chargepath.core.breaker import BreakerState
from chargepath.core.model import Decision, Usage, Verdict
from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine, EngineSettings
from chargepath.store.redis_store import RedisStore
from chargepath.telemetry import Telemetry
from tests.conftest import ledger_entries
from tests.integration.test_late_commits import POLICY, admit, net_billed, report

pytestmark = pytest.mark.integration

#: generous bounds for waits on a loaded machine (never asserted as timings)
SETTLE_S = 10.0


async def engine_with(store: RedisStore, **settings: float) -> tuple[Engine, InMemoryMetricReader]:
    await store.publish_policy(load_policy_text(POLICY))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(TracerProvider(), MeterProvider(metric_readers=[reader]), tracing=False)
    engine = Engine(store, EngineSettings(**settings), telemetry)  # type: ignore[arg-type]
    await engine.reload_policy()
    return engine, reader


def failures_by_cause(reader: InMemoryMetricReader) -> dict[str, int]:
    data = reader.get_metrics_data()
    if data is None:
        return {}
    return {
        str(p.attributes["cause"]): int(p.value)  # type: ignore[union-attr]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "chargepath.store.failures"
        for p in m.data.data_points  # type: ignore[union-attr]
        if p.value  # type: ignore[union-attr]
    }


async def until(condition: object, what: str) -> None:
    """Wait (at most SETTLE_S) until ``condition()`` holds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + SETTLE_S
    while not condition():  # type: ignore[operator]
        assert loop.time() < end, f"still waiting for {what}"
        await asyncio.sleep(0.01)


def assert_ledger_agrees(raw: redis.Redis, decided: list[tuple[Usage, Verdict]]) -> None:
    """Per request id (a resend carries the same one): recorded by any of its verdicts, it is
    in its tenant's ledger exactly once; refused (DENY or THROTTLE) by all of them, it nets
    to 0; allowed without a record (fail-open), at most once."""
    billed: Counter[str] = Counter()
    for tenant in ("strict", "open"):
        billed += net_billed(ledger_entries(raw, tenant))
    verdicts: dict[str, list[Verdict]] = {}
    for u, v in decided:
        verdicts.setdefault(u.request_id, []).append(v)
    for rid, vs in verdicts.items():
        if any(v.recorded for v in vs):
            assert billed[rid] == 1, (rid, vs)
        elif all(v.decision is not Decision.ALLOW for v in vs):
            assert billed[rid] == 0, (rid, vs)
        else:
            assert billed[rid] in (0, 1), (rid, vs)
    assert set(billed) <= set(verdicts)  # nothing billed that nobody asked for


async def test_store_timeouts_that_a_probe_answers_leave_the_breaker_closed(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    # the old rule (2 failures in a row open it) would have opened on these timeouts
    engine, reader = await engine_with(
        store, store_timeout_s=0.05, breaker_failures=2, store_probe_timeout_s=2.0
    )
    decided: list[tuple[Usage, Verdict]] = []
    first = [admit("w-1", "strict"), report("w-2", "open")]
    decided += zip(first, await asyncio.gather(*(engine.check(u) for u in first)), strict=True)
    raw_redis.execute_command("CLIENT", "PAUSE", "300", "ALL")  # slow, not dead
    during = [admit(f"a-{i}", "strict", f"k{i}") for i in range(3)]
    during += [report(f"r-{i}", "open") for i in range(3)]
    verdicts = await asyncio.gather(*(engine.check(u) for u in during))
    decided += zip(during, verdicts, strict=True)
    assert failures_by_cause(reader).get("timeout", 0) >= 2  # both tenants' calls timed out
    await until(lambda: not engine.breaker.probe_running, "the probe")
    assert engine.breaker.state is BreakerState.CLOSED and engine.breaker.openings == 0
    after = [admit("b-1", "strict"), report("b-2", "open")]
    verdicts = await asyncio.gather(*(engine.check(u) for u in after))
    assert all(v.recorded and not v.degraded for v in verdicts)
    decided += zip(after, verdicts, strict=True)
    await engine.late_replies_settled()
    assert_ledger_agrees(raw_redis, decided)
    await engine.close()


async def test_a_silent_store_opens_the_breaker_and_its_first_answer_closes_it(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    engine, reader = await engine_with(
        store, store_timeout_s=0.05, store_probe_timeout_s=0.1, breaker_cooldown_s=0.05
    )
    decided: list[tuple[Usage, Verdict]] = []
    v = await engine.check(admit("w-1", "strict"))
    decided.append((admit("w-1", "strict"), v))
    raw_redis.execute_command("CLIENT", "PAUSE", "1500", "ALL")
    try:
        first = admit("a-0", "strict")
        v = await engine.check(first)
        decided.append((first, v))
        assert v.degraded and not v.recorded and v.decision is Decision.DENY
        await until(lambda: engine.breaker.state is BreakerState.OPEN, "the breaker to open")
        refused = [admit(f"a-{i}", "strict", f"k{i}") for i in range(1, 4)]
        refused += [report(f"r-{i}", "open") for i in range(3)]
        for u in refused:
            v = await engine.check(u)
            decided.append((u, v))
            # while the breaker is open no call goes to the store; the message says why
            # (the probe may close it only once the store answers, after the pause)
            assert v.degraded and not v.recorded
        assert failures_by_cause(reader).get("breaker_open", 0) >= 1
    finally:
        raw_redis.execute_command("CLIENT", "UNPAUSE")
    await until(lambda: engine.breaker.state is BreakerState.CLOSED, "the breaker to close")
    assert engine.breaker.openings == 1
    again = [admit("a-1", "strict", "k1"), report("r-0", "open")]
    verdicts = await asyncio.gather(*(engine.check(u) for u in again))
    assert all(v.recorded and not v.degraded for v in verdicts)
    decided += zip(again, verdicts, strict=True)
    await engine.late_replies_settled()
    assert_ledger_agrees(raw_redis, decided)
    await engine.close()


async def test_calls_beyond_the_admission_bound_are_bounded_and_named_the_gateways(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    """One store call in flight at most: while it waits on a paused Redis, the next one
    waits for admission outside its store timeout, and no longer than the queue timeout."""
    engine, reader = await engine_with(
        store,
        store_timeout_s=0.05,
        store_max_in_flight=1,
        store_queue_timeout_s=0.05,
        store_probe_timeout_s=2.0,
    )
    decided: list[tuple[Usage, Verdict]] = []
    raw_redis.execute_command("CLIENT", "PAUSE", "400", "ALL")
    first, second = admit("a-1", "strict"), report("r-1", "open")
    held = asyncio.ensure_future(engine.check(first))
    await until(lambda: engine._admission.locked(), "the first call to be admitted")
    v2 = await engine.check(second)
    assert v2.degraded and not v2.recorded
    assert failures_by_cause(reader).get("queue") == 1
    decided += [(first, await held), (second, v2)]
    await engine.late_replies_settled()
    # the slot was held until the late reply came: free again now, and Redis answers
    assert not engine._admission.locked()
    v3 = await engine.check(report("r-2", "open"))
    assert v3.recorded and not v3.degraded
    decided.append((report("r-2", "open"), v3))
    assert_ledger_agrees(raw_redis, decided)
    await engine.close()
