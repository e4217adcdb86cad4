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
