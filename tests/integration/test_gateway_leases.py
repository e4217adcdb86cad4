"""Gateway-held leases against the real store: admits answered from a lease the gateway holds
reach the ledger once each, a request id also decided elsewhere is counted once, the limits
never admit more than they hold, and a lease that is gone sends its admits as reports."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import redis

from chargepath.core.model import Decision, Mode, Subject, Usage
from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine, EngineSettings
from chargepath.gateway_leases import LEASED_MESSAGE, GatewayLeases
from chargepath.leasing import Leasing
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.gateway_report import RedisGatewayReports
from chargepath.store.leases import RedisLeaseStore
from chargepath.store.redis_store import RedisStore
from chargepath.telemetry import Telemetry
from tests.conftest import ledger_entries

PLANS = """
metrics: [{name: api.sms.send}]
plans:
  - name: hot
    limits:
      - {name: sms-key, metric: api.sms.send, scope: key,
         rate: {capacity: 100, refill: 1, per: hour},
         lease: {max_units: 30, max_share_pct: 50, validity: 30s, gateway: true}}
      - {name: sms-tenant, metric: api.sms.send, scope: tenant,
         rate: {capacity: 1000, refill: 1, per: hour},
         lease: {max_units: 1000, max_share_pct: 100, validity: 30s, gateway: true}}
  - name: plain
    limits:
      - {name: sms-key, metric: api.sms.send, scope: key,
         rate: {capacity: 100, refill: 1, per: hour},
         lease: {max_units: 30, max_share_pct: 50, validity: 30s}}
tenants:
  - {name: hot, plan: hot}
  - {name: plain, plan: plain}
"""


async def setup(store: RedisStore) -> tuple[Engine, GatewayLeases]:
    await store.publish_policy(load_policy_text(PLANS))
    engine = Engine(store, EngineSettings(store_timeout_s=2.0), Telemetry())
    await engine.reload_policy()
    gl = GatewayLeases(engine, Leasing(engine, RedisLeaseStore(store)), RedisGatewayReports(store))
    engine.leased = gl
    return engine, gl


def admit(rid: str, amount: int = 1, tenant: str = "hot") -> Usage:
    return Usage(rid, Subject(tenant, key="k1"), "api.sms.send", amount, Mode.ADMIT)


async def test_leased_admits_reach_the_ledger_once_and_never_exceed_the_limits(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    engine, gl = await setup(store)
    first = await engine.check(admit("c-0"))
    assert first.recorded and not first.leased  # the store's: it marks the subject wanted
    await gl.round()  # opens a lease: min(30, 50 % of the 99 left) = 30 units
    verdicts = [first]
    for i in range(1, 150):
        verdicts.append(await engine.check(admit(f"c-{i}")))
        if i % 10 == 0:
            await gl.round()  # reports, renews as the lease runs low
    leased = [v for v in verdicts if v.leased]
    assert len(leased) > 60
    assert all(v.decision is Decision.ALLOW and not v.recorded for v in leased)
    assert all(v.message == LEASED_MESSAGE for v in leased)
    allowed = [v.request_id for v in verdicts if v.decision is Decision.ALLOW]
    # the key's bucket holds 100: never more admitted, leased or not
    assert len(allowed) == 100
    await gl.close()  # reports what is pending, releases the leases
    ledger = ledger_entries(raw_redis, "hot")
    assert sorted(e.request_id for e in ledger) == sorted(allowed)
    assert all(e.amount == 1 for e in ledger)
    # a resend of a leased id, marked as a retry, is answered from its record
    again = await engine.check(admit(leased[0].request_id), retried=True)
    assert again.replayed and again.decision is Decision.ALLOW
    assert again.decision_id == leased[0].decision_id
    assert gl.snapshot().held == 0 and gl.unreported() == 0


async def test_a_request_id_also_decided_elsewhere_is_counted_once(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    engine, gl = await setup(store)
    await engine.check(admit("w-0"))
    await gl.round()
    local = await engine.check(admit("dup", 3))
    assert local.leased
    available = gl._held[("hot", "", "k1", "api.sms.send")].available
    # the client retries it (marked) before the report: the store decides it afresh
    elsewhere = await engine.check(admit("dup", 3), retried=True)
    assert elsewhere.recorded and not elsewhere.leased
    await gl.round()  # the report finds its record: credited back to the lease, not recorded
    assert gl.stats.credited == 3
    assert gl._held[("hot", "", "k1", "api.sms.send")].available == available + 3
    await gl.close()
    ids = [e.request_id for e in ledger_entries(raw_redis, "hot")]
    assert ids.count("dup") == 1


async def test_a_lease_gone_before_its_report_records_the_admits_as_reports(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    engine, gl = await setup(store)
    await engine.check(admit("g-0"))
    await gl.round()
    leased = [await engine.check(admit(f"g-{i}")) for i in range(1, 6)]
    assert all(v.leased for v in leased)
    store.clock_offset_ms += 60_000  # the store's clock passes the lease's validity
    await gl.round()
    entries = ledger_entries(raw_redis, "hot")
    assert sorted(e.request_id for e in entries) == [f"g-{i}" for i in range(6)]
    assert [e.mode for e in entries if e.request_id != "g-0"] == ["report"] * 5
    assert gl.snapshot().held == 0


async def test_only_limits_that_opt_in_are_leased_by_the_gateway(store: RedisStore) -> None:
    engine, gl = await setup(store)
    for i in range(3):
        v = await engine.check(admit(f"p-{i}", tenant="plain"))
        assert v.recorded and not v.leased
        await gl.round()
    assert gl.snapshot().opened == 0


async def test_admits_acknowledged_while_redis_is_stopped_all_reach_the_ledger(
    tmp_path: Path,
) -> None:
    """Redis SIGSTOPped for a second, twice, while admits are answered from a lease (its
    reports wait for Redis): every admit acknowledged ALLOW (leased or by the store) is in the
    ledger once after Redis is back and the job reported and drained; nothing else is."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    store = RedisStore.from_url(server.url, connect_timeout=1.0)
    draining = asyncio.Event()
    try:
        engine, gl = await setup(store)
        job = asyncio.create_task(gl.run(draining))
        assert server.process is not None
        pid = server.process.pid
        verdicts = []
        for i in range(300):  # the bucket holds 100: the rest are refused
            if i in (10, 60):
                os.kill(pid, signal.SIGSTOP)
                loop = asyncio.get_running_loop()
                loop.call_later(1.0, os.kill, pid, signal.SIGCONT)
            verdicts.append(await engine.check(admit(f"f-{i}")))
            await asyncio.sleep(0.002)
        draining.set()
        await asyncio.wait_for(job, 30)  # the drain reports and releases
        acknowledged = sorted(
            v.request_id for v in verdicts if v.decision is Decision.ALLOW and not v.degraded
        )
        assert sum(v.leased for v in verdicts) > 50  # most allowed ones from the lease
        assert len(acknowledged) == 100  # the key's bucket: never more, paused or not
        client = redis.Redis.from_url(server.url)
        try:
            ids = [e.request_id for e in ledger_entries(client, "hot")]
        finally:
            client.close()
        assert len(ids) == len(set(ids))
        assert sorted(ids) == acknowledged
        assert gl.unreported() == 0
    finally:
        await store.close()
        server.stop()
