"""The engine's degraded path writes the spool (issue #13, item 4), against a real Redis that
is killed and restarted and a real spool file: which verdicts say ``spooled``, that each says
so only once its usage is on disk, and that the replay puts exactly those usages in the
ledger, once, under the degraded verdicts' decision ids."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from chargepath.core.model import Decision, Mode, Reason, Subject, Usage, Verdict
from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine, EngineSettings, session_fingerprint
from chargepath.spool_replay import RedisSessionSlots, SpoolReplayer
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.redis_store import RedisStore
from chargepath.store.spool import SPOOL_FILE, Spool
from chargepath.telemetry import Telemetry
from tests.conftest import ledger_entries

pytestmark = pytest.mark.integration

POLICY = """
metrics: [{name: api.sms.send}, {name: slice.bytes}]
plans:
  - name: p
    limits:
      - {name: sms, metric: api.sms.send, scope: key,
         rate: {capacity: 3, refill: 1, per: minute}}
      - {name: bytes, metric: slice.bytes, scope: slice,
         rate: {capacity: 1000000, refill: 1000000, per: second}}
tenants:
  - {name: open, plan: p, failure_policy: {mode: allow}}
  - {name: closed, plan: p, failure_policy: {mode: deny}}
"""


def report(rid: str, tenant: str = "open", amount: int = 10, **kw: Any) -> Usage:
    return Usage(rid, Subject(tenant, "s1"), "slice.bytes", amount, Mode.REPORT, **kw)


def admit(rid: str, tenant: str = "open") -> Usage:
    return Usage(rid, Subject(tenant, key="k1"), "api.sms.send", 1, Mode.ADMIT)


@dataclass
class Outage:
    """A gateway's engine and spool on a Redis of its own, which the test kills and restarts
    (same data folder, AOF)."""

    server: EmbeddedRedis
    store: RedisStore
    spool: Spool
    engine: Engine

    def raw(self) -> redis.Redis:
        return redis.Redis.from_url(self.server.url, decode_responses=True)

    async def replay(self) -> None:
        """Restart Redis and replay the spool until it is empty."""
        self.server.start()
        r = SpoolReplayer(
            self.spool,
            self.store,
            lambda: self.engine.policy,
            self.engine.reload_policy,
            session_slots=RedisSessionSlots(self.store.client, self.store.session_window),
        )
        for _ in range(100):
            round_ = await r.replay_once()
            if round_.claimed and not round_.store_error and not round_.left:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the spool did not drain")


async def open_outage(tmp_path: Path, spool: Spool | None, **settings: Any) -> Outage:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    store = RedisStore.from_url(server.url, connect_timeout=0.2)
    await store.publish_policy(load_policy_text(POLICY))
    if spool is None:
        spool = Spool(tmp_path / SPOOL_FILE)
    await spool.open()
    engine = Engine(
        store, EngineSettings(store_timeout_s=0.2, **settings), Telemetry(), spool=spool
    )
    await engine.reload_policy()
    server.kill()
    return Outage(server, store, spool, engine)


@pytest.fixture
async def outage(tmp_path: Path) -> AsyncIterator[Outage]:
    o = await open_outage(tmp_path, None)
    yield o
    await o.spool.close()
    await o.store.close()
    o.server.stop()


async def test_what_the_client_may_act_on_is_spooled_and_replayed_once(outage: Outage) -> None:
    e = outage.engine
    verdicts = {
        "open-report": await e.check(report("r-open")),
        "closed-report": await e.check(report("r-closed", "closed")),
        "unentitled-report": await e.check(report("r-none", "nobody")),
        "closed-admit": await e.check(admit("a-closed", "closed")),
        **{f"open-admit-{i}": await e.check(admit(f"a-open-{i}")) for i in range(4)},
    }
    stream = [report(f"st{i}", amount=100 + i, session_id="ctl-1", sequence=i) for i in range(1, 4)]
    streamed = await e.decide_batch(stream)

    for v in [*verdicts.values(), *streamed]:
        assert v.degraded and not v.recorded
    spooled = {name for name, v in verdicts.items() if v.spooled}
    # reports of an entitled subject whatever the failure policy; admits the policy allowed
    # (the local allowance has the plan's capacity of 3, the fourth is throttled)
    assert spooled == {
        "open-report",
        "closed-report",
        "open-admit-0",
        "open-admit-1",
        "open-admit-2",
    }
    assert verdicts["closed-report"].decision is Decision.DENY
    assert verdicts["open-admit-3"].decision is Decision.THROTTLE
    assert verdicts["unentitled-report"].reason is Reason.NO_ENTITLEMENT
    assert all(v.spooled for v in streamed)
    assert "spooled: recorded once the store is back" in verdicts["open-report"].message
    assert "nothing recorded, resend" in verdicts["closed-admit"].message

    held = await outage.spool.head(100)
    assert [r.entry.usage.request_id for r in held] == [
        "r-open",
        "r-closed",
        "a-open-0",
        "a-open-1",
        "a-open-2",
        "st1",
        "st2",
        "st3",
    ]
    # a stream usage's replay is keyed on its request id, with its first attempt's (session)
    # fingerprint: the one a request-id record written in doubt holds
    assert held[5].entry.fingerprint == session_fingerprint(stream[0])
    assert [r.entry.decision_id for r in held[5:]] == [v.decision_id for v in streamed]

    await outage.replay()
    raw = outage.raw()
    try:
        ledger = {t: ledger_entries(raw, t) for t in ("open", "closed", "nobody")}
    finally:
        raw.close()
    assert [(x.request_id, x.decision_id) for x in ledger["open"]] == [
        (r.entry.usage.request_id, r.entry.decision_id)
        for r in held
        if r.entry.usage.subject.tenant == "open"
    ]
    assert [x.request_id for x in ledger["closed"]] == ["r-closed"]
    assert ledger["nobody"] == []
    assert sum(x.amount for x in ledger["open"] if x.request_id.startswith("st")) == 101 + 102 + 103

    # the client resends a spooled unary report anyway: answered from the replay's record
    # (the engine's breaker may stay open for its cooldown: until then it answers degraded)
    for _ in range(50):
        v = await outage.engine.check(report("r-open"))
        if not v.degraded:
            break
        await asyncio.sleep(0.05)
    assert v.replayed and v.recorded and v.decision_id == verdicts["open-report"].decision_id
    raw = outage.raw()
    try:
        assert len(ledger_entries(raw, "open")) == len(ledger["open"])
    finally:
        raw.close()


async def test_a_full_spool_refuses_and_the_verdict_says_resend(tmp_path: Path) -> None:
    o = await open_outage(tmp_path, Spool(tmp_path / SPOOL_FILE, max_entries=2))
    try:
        got = [await o.engine.check(report(f"f{i}")) for i in range(3)]
        assert [v.spooled for v in got] == [True, True, False]
        assert "not spooled (spool full or unavailable)" in got[2].message
        assert (await o.spool.stats()).refused == 1
        await o.replay()
        raw = o.raw()
        try:
            assert [x.request_id for x in ledger_entries(raw, "open")] == ["f0", "f1"]
        finally:
            raw.close()
    finally:
        await o.spool.close()
        await o.store.close()
        o.server.stop()


async def test_a_closed_spool_or_none_spools_nothing(outage: Outage) -> None:
    await outage.spool.close()
    v = await outage.engine.check(report("c1"))
    assert v.degraded and not v.spooled and not v.recorded
    assert "not spooled" in v.message
    outage.engine.spool = None
    v = await outage.engine.check(report("c2"))
    assert not v.spooled
    assert v.message.endswith("nothing recorded, resend reports with the same ids")


async def test_a_spool_write_past_its_bound_is_withdrawn_never_written(tmp_path: Path) -> None:
    """Another process holds the spool file's write lock past the engine's bound: the verdict
    says not spooled, and the usage is withdrawn, so it never reaches the file (nothing the
    client was told "resend" is recorded behind its back). The client's resend counts once."""
    o = await open_outage(tmp_path, None, spool_timeout_s=0.2)
    blocker = sqlite3.connect(tmp_path / SPOOL_FILE, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        started = time.perf_counter()
        slow = await o.engine.check(report("slow"))
        assert time.perf_counter() - started < 1.0
        assert slow.degraded and not slow.spooled and not slow.recorded
        assert "not spooled" in slow.message
        blocker.execute("ROLLBACK")
        fast = await o.engine.check(report("fast"))  # the lock is free again
        assert fast.spooled
        stats = await o.spool.stats()
        assert [r.entry.usage.request_id for r in await o.spool.head(10)] == ["fast"]
        assert (stats.appended, stats.refused) == (1, 1)
        await o.replay()
        for _ in range(50):  # the client's resend, once the engine's breaker lets it through
            resent: Verdict = await o.engine.check(report("slow"))
            if not resent.degraded:
                break
            await asyncio.sleep(0.05)
        assert resent.recorded and not resent.replayed
        raw = o.raw()
        try:
            assert sorted(x.request_id for x in ledger_entries(raw, "open")) == ["fast", "slow"]
        finally:
            raw.close()
    finally:
        blocker.close()
        await o.spool.close()
        await o.store.close()
        o.server.stop()
