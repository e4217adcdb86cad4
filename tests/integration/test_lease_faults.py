"""Quota leases when Redis stops (SIGSTOP) or dies (SIGKILL, then restarts from its AOF) while
holders ask: every ask answered with units granted or use recorded is in Redis and the ledger
afterwards, an ask answered STORE_UNAVAILABLE is resent with the same request id and applied
once, and a resend of every ask after the outage changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import redis

from chargepath.core.leases import LeaseAnswer, LeaseAsk
from chargepath.core.model import Decision, Reason, Subject
from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine, EngineSettings
from chargepath.leasing import Leasing
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.leases import RedisLeaseStore
from chargepath.store.protocol import lease_index_key, lease_key
from chargepath.store.redis_store import RedisStore
from chargepath.telemetry import Telemetry
from tests.conftest import ledger_entries

pytestmark = pytest.mark.integration

POLICY = """\
metrics: [{name: api.sms.send}]
plans:
  - name: p
    limits:
      - name: burst
        metric: api.sms.send
        rate: {capacity: 100000, refill: 1000}
        lease: {max_units: 20, max_share_pct: 50, validity: 60s}
tenants: [{name: t1, plan: p}]
"""
SUBJECT = Subject("t1")
SMS = "api.sms.send"


@pytest_asyncio.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    """A redis-server of this test's own, fsync always: what it acknowledged survives a kill."""
    server = EmbeddedRedis(tmp_path / "redis", fsync="always")
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


@dataclass
class Holder:
    """A holder that spends its grants, reports, renews, and resends an ask answered
    STORE_UNAVAILABLE with the same request id until the store answers it."""

    name: str
    leasing: Leasing
    lease_id: str = ""
    available: int = 0
    unreported: int = 0
    spent: int = 0
    asks: list[LeaseAsk] = field(default_factory=list)
    answers: dict[str, LeaseAnswer] = field(default_factory=dict)
    unavailable: int = 0
    n: int = 0

    async def ask(self, requested: int, release: bool = False) -> LeaseAnswer:
        self.n += 1
        a = LeaseAsk(
            f"{self.name}-{self.n}",
            SUBJECT,
            SMS,
            lease_id=self.lease_id,
            requested=requested,
            used=self.unreported,
            release=release,
        )
        self.asks.append(a)
        while True:
            (answer,) = await self.leasing.lease([a], [self.name])
            if answer.reason is not Reason.STORE_UNAVAILABLE:
                break
            self.unavailable += 1
            await asyncio.sleep(0.02)
        self.answers[a.request_id] = answer
        self.unreported = 0
        if answer.closed or not answer.lease_id:
            self.lease_id, self.available = "", 0
        else:
            self.lease_id, self.available = answer.lease_id, answer.available
        return answer

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.available <= 2:
                await self.ask(requested=20)
                continue
            self.available -= 3
            self.unreported += 3
            self.spent += 3
            await asyncio.sleep(0.005)
        if self.lease_id:
            await self.ask(requested=0, release=True)


async def _faults(server: EmbeddedRedis, stop: asyncio.Event) -> list[str]:
    done = []
    await asyncio.sleep(0.3)
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    await asyncio.sleep(1.0)
    os.kill(server.process.pid, signal.SIGCONT)
    done.append("sigstop")
    await asyncio.sleep(0.3)
    server.kill()  # SIGKILL: nothing flushed but what fsync always already wrote
    await asyncio.sleep(0.3)
    server.start()
    done.append("sigkill")
    await asyncio.sleep(0.5)
    stop.set()
    return done


async def test_asks_through_a_stopped_and_a_killed_redis(own_redis: EmbeddedRedis) -> None:
    store = RedisStore.from_url(own_redis.url, connect_timeout=0.2)
    raw = redis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        await store.publish_policy(load_policy_text(POLICY))
        settings = EngineSettings(store_timeout_s=0.2, breaker_cooldown_s=0.1)
        engine = Engine(store, settings, Telemetry())
        await engine.reload_policy()
        leasing = Leasing(engine, RedisLeaseStore(store))
        holders = [Holder(f"h{i}", leasing) for i in range(4)]
        stop = asyncio.Event()
        faults, *_ = await asyncio.gather(_faults(own_redis, stop), *(h.run(stop) for h in holders))
        assert faults == ["sigstop", "sigkill"]
        assert sum(h.unavailable for h in holders) > 0, "the outage was never seen"

        entries = [e for e in ledger_entries(raw, "t1") if e.mode == "lease"]
        by_rid = {e.request_id: e for e in entries}
        assert len(by_rid) == len(entries)  # no request id twice
        # every answer that recorded use is in the ledger with exactly that use
        recorded = {
            rid: a.recorded + a.overage
            for h in holders
            for rid, a in h.answers.items()
            if a.recorded + a.overage
        }
        assert {rid: e.amount for rid, e in by_rid.items()} == recorded
        spent = sum(h.spent for h in holders)
        assert sum(e.amount for e in entries) == spent
        # every lease granted was released: none open, every hash gone
        assert raw.zcard(lease_index_key("t1")) == 0
        granted_ids = {a.lease_id for h in holders for a in h.answers.values() if a.granted}
        assert granted_ids and not any(raw.exists(lease_key("t1", i)) for i in granted_ids)

        # a resend of every ask changes nothing: each is answered from its record
        before = raw.xlen("cp:{t1}:ledger")
        for h in holders:
            for ask in h.asks:
                (again,) = await leasing.lease([ask], [h.name])
                first = h.answers[ask.request_id]
                assert again.replayed, (ask, again)
                assert (again.decision, again.granted, again.recorded, again.lease_id) == (
                    first.decision,
                    first.granted,
                    first.recorded,
                    first.lease_id,
                )
        assert raw.xlen("cp:{t1}:ledger") == before
        assert raw.zcard(lease_index_key("t1")) == 0
        assert all(a.decision is Decision.ALLOW for h in holders for a in h.answers.values())
    finally:
        raw.close()
        await store.close()
