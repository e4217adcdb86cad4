"""``WAIT`` after each decision batch (store.connect.ReplicaWait), on a real Redis.

Short of replicas, a batch is committed on the master but never answered as recorded: it is
answered by the failure policy and spooled, counted as unreplicated, and the spool's replay
records it once (found by its dedup record when the master's write survives, recorded anew
when a failover lost it); with a replica, a verdict comes back only once the replica holds what
the batch wrote."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from chargepath.core.model import Decision, Mode, Reason, Subject, Usage
from chargepath.engine import Engine, EngineSettings
from chargepath.spool_replay import RedisSessionSlots, SpoolReplayer
from chargepath.store.base import DecideItem, Reversal, StoreUnavailableError
from chargepath.store.connect import ReplicaWait
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.ledger import Ledger
from chargepath.store.redis_store import RedisStore, ledger_key
from chargepath.store.spool import SPOOL_FILE, Spool
from chargepath.telemetry import Telemetry
from tests.conftest import ledger_entries, make_engine
from tests.integration.policies import OPEN
from tests.integration.sentinels import SentinelDeployment


def report(rid: str) -> Usage:
    return Usage(rid, Subject("acme", "s1"), "slice.bytes", 5, Mode.REPORT)


def unreplicated_sum(reader: InMemoryMetricReader) -> int:
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == "chargepath.store.unreplicated":
                    return sum(int(p.value) for p in m.data.data_points)  # type: ignore[union-attr]
    return 0


async def _spooling_engine(store: RedisStore, spool: Spool) -> Engine:
    engine = await make_engine(store, OPEN)
    spooling = Engine(store, EngineSettings(store_timeout_s=2.0), Telemetry(), spool=spool)
    spooling.policy = engine.policy
    return spooling


async def _replay_all(engine: Engine, store: RedisStore, spool: Spool) -> list[int]:
    """Replay the spool until it is empty; (replayed, already recorded) over the rounds."""
    replayer = SpoolReplayer(
        spool,
        store,
        lambda: engine.policy,
        engine.reload_policy,
        session_slots=RedisSessionSlots(store.client, store.session_window),
        holder="test",
    )
    replayed = already = 0
    for _ in range(20):
        r = await replayer.replay_once()
        assert r.claimed
        replayed, already = replayed + r.replayed, already + r.already_recorded
        if not r.left:
            return [replayed, already]
    raise AssertionError(f"the spool did not drain in 20 rounds: {r}")


async def test_short_of_replicas_nothing_is_answered_recorded_and_the_replay_is_exact(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> None:
    reader = InMemoryMetricReader()
    wait = ReplicaWait(1, 40, meter=MeterProvider(metric_readers=[reader]).get_meter("t"))
    store = RedisStore.from_url(redis_server.url, connect_timeout=1.0, replica_wait=wait)
    spool = Spool(tmp_path / SPOOL_FILE)
    await spool.open()
    try:
        engine = await _spooling_engine(store, spool)
        started = time.perf_counter()
        verdicts = await engine.decide_batch([report("r-1"), report("r-2")])
        waited = time.perf_counter() - started
        # the session's Redis has no replica: WAIT 1 gives up after 40 ms and answers 0; the
        # batch is committed on the master, and answered as not durable: spooled
        assert waited >= 0.04
        assert [(v.recorded, v.degraded, v.spooled) for v in verdicts] == [(False, True, True)] * 2
        assert [e.request_id for e in ledger_entries(raw_redis, "acme")] == ["r-1", "r-2"]
        assert (wait.unreplicated_batches, wait.unreplicated_usages) == (1, 2)
        assert unreplicated_sum(reader) == 2
        await engine.late_replies_settled()
        assert (await spool.stats()).depth == 2  # never settled from an unreplicated write

        # the master's write survived: the replay finds its dedup records (its own batch is
        # unreplicated too, so it stays spooled, and is found again next round)
        no_wait = RedisStore.from_url(redis_server.url, connect_timeout=1.0)
        try:
            assert await _replay_all(engine, no_wait, spool) == [0, 2]
        finally:
            await no_wait.close()
        assert [e.request_id for e in ledger_entries(raw_redis, "acme")] == ["r-1", "r-2"]

        # a failover lost the master's write: the replay records it, once
        (v3,) = await engine.decide_batch([report("r-3")])
        assert v3.spooled, v3
        raw_redis.delete(ledger_key("acme"), "cp:{acme}:d:r-3")
        no_wait = RedisStore.from_url(redis_server.url, connect_timeout=1.0)
        try:
            assert await _replay_all(engine, no_wait, spool) == [1, 0]
        finally:
            await no_wait.close()
        assert [e.request_id for e in ledger_entries(raw_redis, "acme")] == ["r-3"]
    finally:
        await spool.close()
        await store.close()


async def test_a_stream_usage_unreplicated_keeps_a_request_id_record_for_the_replay(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> None:
    """With a replica wait every session usage also keeps its request id's record: the
    replay finds the master's write however far the session moved on."""
    wait = ReplicaWait(1, 5)
    store = RedisStore.from_url(
        redis_server.url, connect_timeout=1.0, replica_wait=wait, session_window=4
    )
    spool = Spool(tmp_path / SPOOL_FILE)
    await spool.open()
    try:
        engine = await _spooling_engine(store, spool)
        stream = [report(f"st-{i}")._replace(session_id="sess", sequence=i + 1) for i in range(10)]
        verdicts = await engine.decide_batch(stream)
        assert all(v.spooled and not v.recorded for v in verdicts)
        assert len(ledger_entries(raw_redis, "acme")) == 10
        # the session window (4) no longer covers the first six sequences
        no_wait = RedisStore.from_url(redis_server.url, connect_timeout=1.0, session_window=4)
        try:
            assert await _replay_all(engine, no_wait, spool) == [0, 10]
        finally:
            await no_wait.close()
        assert len(ledger_entries(raw_redis, "acme")) == 10
    finally:
        await spool.close()
        await store.close()


async def test_a_master_without_the_script_loads_it_and_decides_once(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis
) -> None:
    """A promoted replica has never seen the script: NOSCRIPT, load, run once."""
    wait = ReplicaWait(1, 5)
    store = RedisStore.from_url(redis_server.url, connect_timeout=1.0, replica_wait=wait)
    try:
        engine = await make_engine(store, OPEN)
        raw_redis.script_flush()
        v = await engine.check(report("r-1"))
    finally:
        await store.close()
    # no replica here: not durable, so not answered recorded; but run once, not twice
    assert not v.recorded and v.degraded
    assert [e.request_id for e in ledger_entries(raw_redis, "acme")] == ["r-1"]
    assert wait.unreplicated_batches == 1


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[SentinelDeployment]:
    d = SentinelDeployment(tmp_path, replicas=1)
    try:
        d.start()
        yield d
    finally:
        d.stop()


async def test_with_a_replica_a_verdict_waits_until_the_replica_has_it(
    replicated: SentinelDeployment,
) -> None:
    wait = ReplicaWait(1, 1000)
    store = RedisStore.connect(replicated.target, connect_timeout=1.0, replica_wait=wait)
    replica = replicated.replicas[0].client()
    try:
        engine = await make_engine(store, OPEN)
        for i in range(50):
            v = await engine.check(report(f"r-{i}"))
            assert v.recorded
            # read on the replica right after the verdict: already there
            assert replica.xlen(ledger_key("acme")) == i + 1
    finally:
        replica.close()
        await store.close()
    assert wait.unreplicated_batches == 0


async def _first_batches(ledger: Ledger, n: int) -> list[list[str]]:
    """The ids of the first ``n`` batches ``ledger`` hands on to consumer c1 of "billing"."""
    out: list[list[str]] = []
    batches = ledger.consume_batches("acme", "billing", "c1", count=10, block_ms=50)
    try:
        async for batch in batches:
            out.append([i for i, _ in batch])
            if batch:
                await ledger.ack("acme", "billing", [i for i, _ in batch])
            if len(out) == n:
                break
    finally:
        await batches.aclose()
    return out


async def test_a_consumer_with_a_replica_wait_hands_on_only_what_a_replica_holds(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis
) -> None:
    """No replica here: WAIT never confirms, so nothing is handed on (empty batches let the
    caller stop) and the entries stay pending; a consumer without the wait gets them."""
    store = RedisStore.from_url(redis_server.url, connect_timeout=1.0)
    try:
        engine = await make_engine(store, OPEN)
        for i in range(3):
            assert (await engine.check(report(f"r-{i}"))).recorded
        waiting = Ledger.from_url(redis_server.url, replica_wait=(1, 20))
        try:
            assert await asyncio.wait_for(_first_batches(waiting, 3), 10) == [[], [], []]
        finally:
            await waiting.close()
        assert raw_redis.xpending(ledger_key("acme"), "billing")["pending"] == 3
        plain = Ledger.from_url(redis_server.url)
        try:
            (handed,) = await asyncio.wait_for(_first_batches(plain, 1), 10)
        finally:
            await plain.close()
        assert len(handed) == 3
    finally:
        await store.close()


async def test_a_consumer_with_a_replica_wait_hands_on_once_the_replica_has_it(
    replicated: SentinelDeployment,
) -> None:
    store = RedisStore.connect(replicated.target, connect_timeout=1.0)
    ledger = Ledger.connect(replicated.target, replica_wait=(1, 1000))
    replica = replicated.replicas[0].client()
    try:
        engine = await make_engine(store, OPEN)
        for i in range(5):
            assert (await engine.check(report(f"r-{i}"))).recorded
        (handed,) = await asyncio.wait_for(_first_batches(ledger, 1), 10)
        assert len(handed) == 5
        # the delivery and the acknowledgement are on the replica too
        info = replica.xinfo_groups(ledger_key("acme"))
        assert [(g["name"], g["pending"]) for g in info] == [("billing", 0)]
    finally:
        replica.close()
        await ledger.close()
        await store.close()


CONSUME = (sys.executable, "-m", "chargepath", "ledger", "consume")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--redis-wait-replicas", "-1"], "--redis-wait-replicas"),
        (["--redis-wait-replicas", "1", "--redis-wait-timeout-ms", "0"], "--redis-wait-timeout-ms"),
    ],
)
def test_ledger_consume_refuses_a_bad_replica_wait(
    redis_server: EmbeddedRedis, flags: list[str], named: str
) -> None:
    done = subprocess.run(
        [*CONSUME, "--tenant", "acme", "--group", "billing", "--max", "1", *flags],
        env={**os.environ, "CHARGEPATH_REDIS_URL": redis_server.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert named in done.stderr and "Traceback" not in done.stderr


# -- a reversal is durable, or not done -------------------------------------------------------


def _admit(rid: str) -> Usage:
    return Usage(rid, Subject("acme", "s1", "k1"), "api.sms.send", 1, Mode.ADMIT)


async def _recorded_reversal(url_store: RedisStore, rid: str) -> Reversal:
    """An admit recorded by ``url_store`` (no wait), as the reversal of a refused caller."""
    engine = await make_engine(url_store, OPEN)
    usage = _admit(rid)
    v = await engine.check(usage)
    assert v.recorded, v
    item = DecideItem(usage, engine.policy.resolve(usage.subject, usage.metric), v.decision_id, "")
    told = v._replace(decision=Decision.DENY, reason=Reason.STORE_UNAVAILABLE, degraded=True)
    return Reversal(item, told, engine.policy.version, v.decided_at_ms)


async def test_a_reversal_short_of_replicas_is_not_done_and_is_tried_again(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis
) -> None:
    """A reversal's reply is trusted once a replica holds it: a node no replica follows (a
    master a failover replaced) may answer 0 for a decision it never saw, and loses what it
    writes. Short of replicas the store raises, and the engine tries again."""
    plain = RedisStore.from_url(redis_server.url, connect_timeout=1.0)
    waiting = RedisStore.from_url(
        redis_server.url, connect_timeout=1.0, replica_wait=ReplicaWait(1, 20)
    )
    try:
        rev = await _recorded_reversal(plain, "a-1")
        with pytest.raises(StoreUnavailableError, match="reversal: not durable yet"):
            await waiting.reverse("acme", [rev])
        # this node wrote it (once, however often it is tried): not answered as done
        with pytest.raises(StoreUnavailableError, match="reversal: not durable yet"):
            await waiting.reverse("acme", [rev])
        entries = ledger_entries(raw_redis, "acme")
        assert [(e.request_id, e.reversal) for e in entries] == [("a-1", False), ("a-1", True)]
        # a node that never saw the decision answers 0: not taken for "reversed already"
        unknown = await _recorded_reversal(plain, "a-2")
        raw_redis.delete("cp:{acme}:d:a-2")
        with pytest.raises(StoreUnavailableError, match="reversal: not durable yet"):
            await waiting.reverse("acme", [unknown])
        # reversals are no decisions: the unreplicated count stays as it was
        assert waiting.replica_wait is not None
        assert waiting.replica_wait.unreplicated_usages == 0
    finally:
        await plain.close()
        await waiting.close()


async def test_with_a_replica_a_reversal_is_done_once_the_replica_holds_it(
    replicated: SentinelDeployment,
) -> None:
    plain = RedisStore.connect(replicated.target, connect_timeout=1.0)
    waiting = RedisStore.connect(
        replicated.target, connect_timeout=1.0, replica_wait=ReplicaWait(1, 1000)
    )
    replica = replicated.replicas[0].client()
    try:
        rev = await _recorded_reversal(plain, "a-1")
        assert await waiting.reverse("acme", [rev]) == [True]
        # read on the replica right after the answer: the reversal is there
        assert [e.reversal for e in ledger_entries(replica, "acme")] == [False, True]
        assert await waiting.reverse("acme", [rev]) == [False]  # written once
        assert len(ledger_entries(replica, "acme")) == 2
    finally:
        replica.close()
        await plain.close()
        await waiting.close()
