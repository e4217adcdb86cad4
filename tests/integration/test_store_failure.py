"""DESIGN property 6, first form: a dead store gives bounded, policy-driven, degraded verdicts,
and nothing acknowledged before Redis died is missing after it restarts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis

from chargepath.core.model import Decision, Mode, Reason, Subject, Usage, Verdict
from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine, EngineSettings
from chargepath.store.admin import AdminStore
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.redis_store import RedisStore
from chargepath.telemetry import Telemetry
from tests.conftest import ledger_entries
from tests.integration.policies import REPORTING

STORE_TIMEOUT_S = 0.05
# What a verdict may take beyond the store timeout on a loaded 2-core CI machine.
SLACK_S = 0.25


async def test_redis_killed_mid_run(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    store = RedisStore.from_url(server.url, connect_timeout=STORE_TIMEOUT_S)
    engine = Engine(
        store,
        EngineSettings(store_timeout_s=STORE_TIMEOUT_S, breaker_failures=3, breaker_cooldown_s=0.2),
        Telemetry(),
    )
    try:
        await store.publish_policy(load_policy_text(REPORTING))
        await engine.reload_policy()
        results: list[tuple[Usage, Verdict, float]] = []

        async def decide(i: int, tenant: str) -> None:
            u = Usage(f"{tenant}-{i}", Subject(tenant, "s1"), "slice.bytes", 1, Mode.REPORT)
            started = time.perf_counter()
            v = await engine.check(u)
            results.append((u, v, time.perf_counter() - started))

        async def run(start: int, count: int) -> None:
            for i in range(start, start + count):
                await asyncio.gather(decide(i, "mvno"), decide(i, "strict"))

        await run(0, 200)
        assert all(v.recorded and not v.degraded for _, v, _ in results)
        server.kill()
        killed_at = len(results)
        await run(200, 100)
        during = results[killed_at:]
        assert all(v.degraded and not v.recorded for _, v, _ in during)
        assert max(t for _, _, t in during) < STORE_TIMEOUT_S + SLACK_S
        for u, v, _ in during:
            if u.subject.tenant == "mvno":  # fails open
                assert (v.decision, v.reason) == (Decision.ALLOW, Reason.STORE_UNAVAILABLE)
            else:  # fails closed
                assert (v.decision, v.reason) == (Decision.DENY, Reason.STORE_UNAVAILABLE)

        # Redis comes back on the same data folder (its AOF) and port
        server.start()
        for _ in range(100):
            v = await engine.check(
                Usage("probe", Subject("mvno", "s1"), "slice.bytes", 1, Mode.REPORT)
            )
            if not v.degraded:
                break
            await asyncio.sleep(0.05)
        assert not v.degraded
        # the controller resends what was not recorded, with the same ids
        for u, _, _ in during:
            again = await engine.check(u)
            assert again.recorded and not again.degraded
        raw = redis.Redis.from_url(server.url, decode_responses=True)
        acknowledged = {u.request_id for u, v, _ in results if v.recorded} | {
            u.request_id for u, _, _ in during
        }
        in_ledger: list[str] = []
        for tenant in ("mvno", "strict"):
            in_ledger += [e.request_id for e in ledger_entries(raw, tenant)]
        in_ledger.remove("probe")
        assert len(in_ledger) == len(set(in_ledger))  # each once
        assert set(in_ledger) == acknowledged  # nothing lost
        raw.close()
    finally:
        await store.close()
        server.stop()


WEEKLY = """
metrics: [{name: api.sms.send, unit: message}]
plans:
  - name: weekly
    limits:
      - {name: week, metric: api.sms.send, quota: {amount: 150, per: week}}
tenants:
  - {name: acme, plan: weekly, failure_policy: {mode: deny}}
"""


async def test_a_weekly_quota_through_a_redis_kill_loses_nothing_and_counts_once(
    tmp_path: Path,
) -> None:
    """Admits against a weekly quota; Redis is SIGKILLed mid-run and restarted on its AOF. Every
    admit acknowledged (recorded) is in the ledger once, the week's counter holds exactly the
    ledger's units, and the resent admits count once."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    store = RedisStore.from_url(server.url, connect_timeout=STORE_TIMEOUT_S)
    engine = Engine(
        store,
        EngineSettings(store_timeout_s=STORE_TIMEOUT_S, breaker_failures=3, breaker_cooldown_s=0.2),
        Telemetry(),
    )
    subject = Subject("acme")

    def admit(i: int) -> Usage:
        return Usage(f"w-{i}", subject, "api.sms.send", 1, Mode.ADMIT)

    try:
        await store.publish_policy(load_policy_text(WEEKLY))
        await engine.reload_policy()
        before = [await engine.check(admit(i)) for i in range(100)]
        assert all(v.decision is Decision.ALLOW and v.recorded for v in before)
        server.kill()
        during = [await engine.check(admit(i)) for i in range(100, 150)]
        assert all(
            (v.decision, v.reason, v.degraded, v.recorded)
            == (Decision.DENY, Reason.STORE_UNAVAILABLE, True, False)
            for v in during
        )

        server.start()  # the same data folder (its AOF) and port
        for _ in range(100):
            probe = await engine.check(Usage("probe", subject, "api.sms.send", 1, Mode.ADMIT))
            if not probe.degraded:
                break
            await asyncio.sleep(0.05)
        assert not probe.degraded and probe.recorded
        # a resend of an acknowledged admit changes nothing; the refused ones are decided anew
        again = [await engine.check(admit(i)) for i in range(150)]
        assert all(v.recorded and not v.degraded for v in again[:100])
        after = again[100:]
        assert [v.decision for v in after] == [Decision.ALLOW] * 49 + [Decision.DENY]
        assert after[-1].reason is Reason.QUOTA_EXHAUSTED
        assert after[-1].limits[0].remaining == 0

        raw = redis.Redis.from_url(server.url, decode_responses=True)
        in_ledger = [e.request_id for e in ledger_entries(raw, "acme")]
        raw.close()
        acknowledged = {f"w-{i}" for i in range(100)} | {"probe"}
        acknowledged |= {f"w-{i}" for i, v in enumerate(after, start=100) if v.recorded}
        assert len(in_ledger) == len(set(in_ledger)) == 150  # each once: the week's amount
        assert set(in_ledger) == acknowledged  # nothing acknowledged is lost
        limits = engine.policy.resolve(subject, "api.sms.send").limits
        _, (week,), _ = await AdminStore(store).read_limits(subject, limits)
        assert (week.used, week.remaining) == (150, 0)
    finally:
        await store.close()
        server.stop()
