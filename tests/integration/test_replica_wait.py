"""``WAIT`` after each decision batch (store.connect.ReplicaWait), on a real Redis.

Short of replicas, a batch is still answered as recorded (it is committed on the master) and
counted as unreplicated; with a replica, a verdict comes back only once the replica holds
what the batch wrote."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from chargepath.core.model import Decision, Mode, Subject, Usage
from chargepath.store.connect import ReplicaWait
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.redis_store import RedisStore, ledger_key
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


async def test_short_of_replicas_the_verdict_is_recorded_and_counted(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis
) -> None:
    reader = InMemoryMetricReader()
    wait = ReplicaWait(1, 40, meter=MeterProvider(metric_readers=[reader]).get_meter("t"))
    store = RedisStore.from_url(redis_server.url, connect_timeout=1.0, replica_wait=wait)
    try:
        engine = await make_engine(store, OPEN)
        started = time.perf_counter()
        verdicts = await engine.decide_batch([report("r-1"), report("r-2")])
        waited = time.perf_counter() - started
    finally:
        await store.close()
    # the session's Redis has no replica: WAIT 1 gives up after 40 ms and answers 0
    assert waited >= 0.04
    assert [(v.decision, v.recorded, v.degraded) for v in verdicts] == [
        (Decision.ALLOW, True, False)
    ] * 2
    assert [e.request_id for e in ledger_entries(raw_redis, "acme")] == ["r-1", "r-2"]
    assert (wait.unreplicated_batches, wait.unreplicated_usages) == (1, 2)
    assert unreplicated_sum(reader) == 2


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
    assert v.recorded and not v.degraded
    assert [e.request_id for e in ledger_entries(raw_redis, "acme")] == ["r-1"]


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
