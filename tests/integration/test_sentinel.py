"""Redis Sentinel with real processes: a master, a replica and three sentinels
(``redis-server --sentinel``) started by each test on free ports.

Every surface works through the sentinel-aware client; under load, a forced failover
(``SENTINEL FAILOVER``) and a SIGKILL of the master each cost a bounded stretch of degraded
verdicts, after which decisions go on against the new master. Every usage acknowledged as
recorded is then compared with the new master's ledger: with ``WAIT 1`` none is missing after
a SIGKILL or a forced failover (a batch WAIT did not see replicated is answered by the failure
policy, never recorded). Without WAIT the figure is measured and printed (run with ``-s`` to
see it). Every wait is bounded and fails naming what it waited for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from chargepath.core.model import Mode, Subject, Usage
from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine, EngineSettings
from chargepath.settings import Settings
from chargepath.store.connect import ReplicaWait
from chargepath.store.redis_store import RedisStore, ledger_key
from chargepath.telemetry import Telemetry
from tests.conftest import ledger_entries
from tests.integration.policies import OPEN
from tests.integration.sentinels import MASTER_NAME, SentinelDeployment
from tests.integration.surfaces import check_every_surface, ledger_cli_lines, start_gateway

T = TypeVar("T")


#: Every wait of these tests is bounded by one of these, and fails saying what it waited for:
#: a driver's store call (its own timeout is 1 s; a late reply is followed for 10 s more), a
#: driver's start and its close, and the drivers' end.
CALL_BOUND_S = 15.0
DRIVERS_END_S = 60.0


async def bounded(awaitable: Awaitable[T], seconds: float, what: str) -> T:
    """``awaitable``, or an AssertionError naming ``what`` after ``seconds``."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise AssertionError(f"{what}: no answer within {seconds:.0f} s") from None


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[SentinelDeployment]:
    d = SentinelDeployment(tmp_path, replicas=1)
    try:
        d.start()
        yield d
    finally:
        d.stop()


async def test_every_surface_through_sentinel(
    deployment: SentinelDeployment, tmp_path: Path
) -> None:
    settings = Settings.from_env(
        {}, redis_sentinel=deployment.sentinel_option, redis_master=MASTER_NAME
    )
    gateway = await bounded(start_gateway(settings, tmp_path / "gateway"), 60, "gateway start")
    try:
        report_id = await bounded(
            check_every_surface(gateway, settings.redis_target()), 120, "every surface"
        )
    finally:
        await bounded(gateway.stop(), 60, "gateway stop")
    lines = await bounded(
        ledger_cli_lines(
            "--redis-sentinel", deployment.sentinel_option, "--redis-master", MASTER_NAME
        ),
        60,
        "the ledger CLI",
    )
    assert [line["request_id"] for line in lines] == [report_id]
    # it all went to the master, and from there to its replica
    assert deployment.master is not None
    with deployment.master.client() as m, deployment.replicas[0].client() as r:
        assert m.xlen(ledger_key("mvno-demo")) > 0
        deadline = time.monotonic() + 5
        while r.xlen(ledger_key("mvno-demo")) != m.xlen(ledger_key("mvno-demo")):
            assert time.monotonic() < deadline, "the replica did not catch up"
            await asyncio.sleep(0.05)


@dataclass
class Run:
    """What the drivers saw: request ids acknowledged as recorded, the subset whose batch
    WAIT reported unreplicated, and when verdicts were degraded or recorded."""

    acked: set[str] = field(default_factory=set)
    unreplicated: set[str] = field(default_factory=set)
    degraded_at: list[float] = field(default_factory=list)
    recorded_at: list[float] = field(default_factory=list)
    #: acknowledged, and not in the new master's ledger after the failover
    missing: set[str] = field(default_factory=set)


async def _drive(
    deployment: SentinelDeployment, worker: int, wait: bool, stop: asyncio.Event, run: Run
) -> None:
    """One client: report batches of 8 usages as fast as they are answered. A usage counts
    as acknowledged when answered recorded (with WAIT: replicated, or it would have been
    answered by the failure policy, not recorded)."""
    replica_wait = ReplicaWait(1, 200) if wait else None
    store = RedisStore.connect(deployment.target, connect_timeout=0.5, replica_wait=replica_wait)
    engine = Engine(store, EngineSettings(store_timeout_s=1.0, breaker_cooldown_s=0.2), Telemetry())
    try:
        await bounded(engine.reload_policy(), CALL_BOUND_S, f"driver {worker}: policy load")
        n = 0
        while not stop.is_set():
            batch = [
                Usage(f"w{worker}-{n + i}", Subject("acme", "s1"), "slice.bytes", 1, Mode.REPORT)
                for i in range(8)
            ]
            n += len(batch)
            before = replica_wait.unreplicated_usages if replica_wait else 0
            verdicts = await bounded(
                engine.decide_batch(batch), CALL_BOUND_S, f"driver {worker}: a decision batch"
            )
            now = time.monotonic()
            recorded = [v.request_id for v in verdicts if v.recorded]
            run.acked.update(recorded)
            if replica_wait and replica_wait.unreplicated_usages > before:
                run.unreplicated.update(recorded)
            if len(recorded) < len(verdicts):
                run.degraded_at.append(now)
                await asyncio.sleep(0.02)
            else:
                run.recorded_at.append(now)
    finally:
        # the late replies it still follows first (each bounded by the engine), then the pool
        await bounded(engine.late_replies_settled(), CALL_BOUND_S, f"driver {worker}: late replies")
        # the breaker's probe (if one runs) before the pool, as the app's drain does: a probe
        # left running after the test would open a connection nobody closes
        await bounded(engine.close(), CALL_BOUND_S, f"driver {worker}: closing its engine")
        await bounded(store.close(), CALL_BOUND_S, f"driver {worker}: closing its store")


async def _failover_under_load(deployment: SentinelDeployment, kind: str, wait: bool) -> Run:
    """Drive three clients, fail the master over (``kind``: "failover" or "sigkill"), drive
    on until decisions have been recorded on the new master for 1.5 s; then compare."""
    publisher = RedisStore.connect(deployment.target, connect_timeout=1.0)
    await bounded(publisher.publish_policy(load_policy_text(OPEN)), CALL_BOUND_S, "publish")
    await bounded(publisher.close(), CALL_BOUND_S, "closing the publisher")
    run = Run()
    stop = asyncio.Event()
    drivers = [asyncio.create_task(_drive(deployment, w, wait, stop, run)) for w in range(3)]
    try:
        await asyncio.sleep(1.5)
        old = deployment.master_port()
        started = time.monotonic()
        if kind == "sigkill":
            assert deployment.master is not None
            deployment.master.kill()
        else:
            deployment.failover()
        # bounded inside (30 s), and here too
        new = await bounded(
            asyncio.to_thread(deployment.wait_for_new_master, old), 40, "a new master"
        )
        switched = time.monotonic()
        while not any(t > switched for t in run.recorded_at):
            assert time.monotonic() - started < 30, "no decision recorded after the failover"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)
    finally:
        stop.set()
        done, pending = await asyncio.wait(drivers, timeout=DRIVERS_END_S)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        assert not pending, f"{len(pending)} driver(s) still running {DRIVERS_END_S:.0f} s on"
        for t in done:
            t.result()  # a driver's failure, with its message
    with redis.Redis(port=new, decode_responses=True, socket_timeout=10) as c:
        ledger = [e.request_id for e in ledger_entries(c, "acme")]
    missing = run.missing = run.acked - set(ledger)
    doubled = len(ledger) - len(set(ledger))
    degraded_s = (max(run.degraded_at) - started) if run.degraded_at else 0.0
    late = [t for t in run.recorded_at if t > max(run.degraded_at, default=started)]
    recovered_s = (min(late) - started) if late else float("inf")
    print(
        f"\nsentinel {kind} WAIT {'1 200' if wait else 'off'}: "
        f"acknowledged={len(run.acked)} in_new_master_ledger={len(set(ledger))} "
        f"missing={len(missing)} doubled={doubled} "
        f"unreplicated={len(run.unreplicated)} missing_not_unreplicated="
        f"{len(missing - run.unreplicated)} last_degraded_after_s={degraded_s:.2f} "
        f"recorded_again_after_s={recovered_s:.2f}"
    )
    assert doubled == 0
    assert degraded_s < 20 and run.recorded_at[-1] > switched, "did not recover"
    assert len(run.acked) > 1000  # the load was real
    return run


@pytest.mark.parametrize(("kind", "replicas"), [("sigkill", 2), ("failover", 1)])
async def test_with_wait_every_acknowledged_usage_survives_a_failover(
    tmp_path: Path, kind: str, replicas: int
) -> None:
    """WAIT 1 with as many replicas as a failover leaves usable. A SIGKILL: two replicas, so
    the promoted one (the one with the highest offset) still has a replica and WAIT 1 confirms
    again (with one, nothing is recorded until the dead master returns as a replica). A forced
    failover: one replica (with two, the replica not promoted keeps acknowledging the old
    master's writes until it is moved, and they are lost: WAIT N is certain only with N equal
    to the number of replicas); the old master becomes its replica, and WAIT confirms again
    once it has resynchronised."""
    deployment = SentinelDeployment(tmp_path, replicas=replicas)
    try:
        deployment.start()
        run = await _failover_under_load(deployment, kind, wait=True)
    finally:
        deployment.stop()
    # a usage is answered recorded only once WAIT saw it on the replica: never lost
    assert run.missing == set()


@pytest.mark.parametrize("kind", ["sigkill", "failover"])
async def test_without_wait_a_failover_is_measured(
    deployment: SentinelDeployment, kind: str
) -> None:
    """No WAIT: a SIGKILL of the master loses whatever the replica had not received yet
    (often nothing on loopback); a forced failover loses what was written to the old master
    after the replica's promotion. The figures are printed; decisions must go on."""
    run = await _failover_under_load(deployment, kind, wait=False)
    assert run.unreplicated == set()  # nothing measures replication without WAIT


async def test_min_replicas_to_write_narrows_the_forced_failover_window(tmp_path: Path) -> None:
    """A forced failover promotes the replica while the old master still takes writes, until
    the sentinels name the new one (about a second): without more, those are lost. With
    ``min-replicas-to-write 1`` on the master, the old master refuses writes as soon as its
    replica leaves (those verdicts are degraded, not recorded); what is still lost is what
    the replica dropped unread at its promotion, about one batch per connection: WAIT saw
    those unreplicated, and they were answered by the failure policy, never recorded."""
    deployment = SentinelDeployment(tmp_path, master_args=("--min-replicas-to-write", "1"))
    try:
        deployment.start()
        run = await _failover_under_load(deployment, "failover", wait=True)
    finally:
        deployment.stop()
    # what WAIT did not see replicated was answered by the failure policy, not recorded
    assert run.missing == set()


async def test_a_connection_left_on_the_old_master_is_dropped_when_released(
    deployment: SentinelDeployment,
) -> None:
    """After a failover every write goes to the new master, also through a connection that was
    being opened to the old one while the client switched (the old master keeps taking writes
    until Sentinel reconfigures it, seconds later, and those writes are lost)."""
    from chargepath.store.connect import connect

    client = connect(deployment.target, pool_size=4)
    try:
        assert await client.set("before", 1)
        pool = client.connection_pool
        old = deployment.master_port()
        deployment.failover()
        new = deployment.wait_for_new_master(old)

        deadline = time.monotonic() + 10  # the client's watch asks every 0.25 s
        while pool.master_address is None or pool.master_address[1] != new:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the client did not switch to the new master"
            await asyncio.sleep(0.05)
        # a connection opened to the old master, as one racing the switch is
        stale = await pool.get_connection()
        await stale.disconnect()
        await stale.connect_to(("127.0.0.1", old))
        assert (stale.port, await _port_of(stale)) == (old, old)
        await pool.release(stale)
        assert not stale.is_connected, "released to the pool still connected to the old master"
        # every connection of the pool now writes to the new master
        ports = set()
        for _ in range(20):
            async with client.pipeline(transaction=False) as pipe:
                pipe.execute_command("INFO", "server")
                pipe.set("after", 1)
                info, _ = await pipe.execute()
            ports.add(int(info["tcp_port"]))
        assert ports == {new}
    finally:
        await client.aclose()


async def _port_of(connection: object) -> int:
    await connection.send_command("INFO", "server")  # type: ignore[attr-defined]
    info = await connection.read_response()  # type: ignore[attr-defined]
    text = info if isinstance(info, str) else info.decode()
    return int(text.split("tcp_port:")[1].split()[0])


async def test_concurrent_discoveries_keep_every_sentinel(
    deployment: SentinelDeployment,
) -> None:
    """redis-py's discover_master reorders its sentinels across an await: 50 discoveries at
    once, with the first sentinel down (each then moves the second to the front), dropped one
    of the three from its list before discoveries were made one at a time."""
    from chargepath.store.connect import SerialSentinel

    master = deployment.master_port()
    deployment.sentinels[0].kill()
    manager = SerialSentinel(
        [("127.0.0.1", n.port) for n in deployment.sentinels],
        sentinel_kwargs={"socket_connect_timeout": 0.5},
    )
    try:

        def ports() -> list[int]:
            return sorted(c.connection_pool.connection_kwargs["port"] for c in manager.sentinels)

        before = ports()
        found = await bounded(
            asyncio.gather(*(manager.discover_master(MASTER_NAME) for _ in range(50))),
            30,
            "50 discoveries",
        )
        assert {port for _, port in found} == {master}
        assert ports() == before
    finally:
        await manager.aclose()
