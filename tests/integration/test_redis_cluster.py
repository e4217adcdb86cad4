"""The same scripts on a real Redis Cluster (three masters started by the test): every key of a
decision (and of its reversal) carries the tenant's hash tag, so a decision's keys are in one
slot."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from chargepath.core.leases import LeaseAsk
from chargepath.core.model import Decision, Mode, Reason, Subject, Usage
from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine, EngineSettings
from chargepath.leasing import Leasing
from chargepath.policy_files import load_policy_file
from chargepath.settings import Settings
from chargepath.store.base import DecideItem, Reversal
from chargepath.store.embedded import find_redis_server
from chargepath.store.leases import RedisLeaseStore
from chargepath.store.redis_store import RedisStore, ledger_key
from chargepath.telemetry import Telemetry
from tests.conftest import ledger_entries, make_engine
from tests.integration.surfaces import check_every_surface, ledger_cli_lines, start_gateway
from tests.integration.test_late_commits import CREDIT_POLICY, late_counts, net_billed

ROOT = Path(__file__).resolve().parents[2]
SLOTS = 16384
LEASE_POLICY = """\
metrics: [{name: m.x}]
plans:
  - name: p
    limits:
      - name: b
        metric: m.x
        rate: {capacity: 100, refill: 1, per: hour}
        lease: {max_units: 10, max_share_pct: 50, validity: 30s}
tenants: [{name: ta, plan: p}, {name: tb, plan: p}]
"""


def cluster_ports(n: int) -> list[int]:
    """``n`` distinct ports p, each with p + 10000 (its cluster bus) free too. Ephemeral ports
    will not do: p + 10000 may pass 65535. Every socket stays bound until all are chosen."""
    held: list[socket.socket] = []
    ports: list[int] = []
    rng = random.Random()
    try:
        while len(ports) < n:
            p = rng.randrange(20000, 30000)
            if p in ports:
                continue
            pair = []
            try:
                for port in (p, p + 10000):
                    s = socket.socket()
                    pair.append(s)
                    s.bind(("127.0.0.1", port))
            except OSError:
                for s in pair:
                    s.close()
                continue
            held += pair
            ports.append(p)
    finally:
        for s in held:
            s.close()
    return ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Three cluster-enabled redis-servers, slots split in three, joined with CLUSTER MEET."""
    binary = find_redis_server()
    ports = cluster_ports(3)
    procs = []
    for port in ports:
        d = tmp_path_factory.mktemp(f"cluster-{port}")
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(d / "nodes.conf"),
                    "--dir",
                    str(d),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=subprocess.DEVNULL,
            )
        )
    try:
        clients = []
        for port, proc in zip(ports, procs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"cluster node on port {port} exited with {proc.returncode}")
            for _ in range(100):
                try:
                    c = redis.Redis(port=port)
                    c.ping()
                    clients.append(c)
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
        bounds = [0, SLOTS // 3, 2 * SLOTS // 3, SLOTS]
        for i, c in enumerate(clients):
            c.execute_command("CLUSTER ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        for port in ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = [c.execute_command("CLUSTER INFO").get("cluster_state") for c in clients]
            if all(st in ("ok", b"ok") for st in states):
                break
            time.sleep(0.1)
        else:
            raise TimeoutError("the test cluster did not converge")
        for c in clients:
            c.close()
        yield ports
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


@pytest_asyncio.fixture
async def engine(cluster: list[int]) -> AsyncIterator[Engine]:
    store = RedisStore.from_url(f"redis://127.0.0.1:{cluster[0]}", cluster=True, connect_timeout=2)
    await store.publish_policy(load_policy_file(ROOT / "examples" / "plans.yaml"))
    e = Engine(store, EngineSettings(store_timeout_s=2.0), Telemetry())
    await e.reload_policy()
    yield e
    await store.close()


async def test_decisions_dedup_and_ledger_on_a_cluster(engine: Engine, cluster: list[int]) -> None:
    u = Usage("c-1", Subject("cpaas-demo", key="k1"), "api.sms.send", 3, Mode.ADMIT)
    first = await engine.check(u)
    assert (first.decision, first.reason, first.recorded) == (Decision.ALLOW, Reason.OK, True)
    assert [lim.remaining for lim in first.limits] == [17, 197, 999_997]
    again = await engine.check(u)
    assert again.replayed and again.decision_id == first.decision_id
    batch = [
        Usage(
            f"s{i}",
            Subject("mvno-demo", "1-000001"),
            "slice.bytes",
            10,
            Mode.REPORT,
            session_id="sess",
            sequence=i,
        )
        for i in range(5)
    ]
    other = Usage("x", Subject("cpaas-demo", key="k2"), "api.sms.send", 1, Mode.ADMIT)
    verdicts = await engine.decide_batch([*batch, other])
    assert all(v.recorded for v in verdicts)
    assert [v.replayed for v in await engine.decide_batch(batch)] == [True] * 5
    # the two tenants hash to different slots; each ledger is on its tenant's node
    nodes = redis.RedisCluster(host="127.0.0.1", port=cluster[0], decode_responses=True)
    try:
        assert nodes.keyslot(ledger_key("cpaas-demo")) != nodes.keyslot(ledger_key("mvno-demo"))
        assert nodes.xlen(ledger_key("cpaas-demo")) == 2
        assert nodes.xlen(ledger_key("mvno-demo")) == 5
    finally:
        nodes.close()


async def test_every_surface_on_a_cluster(cluster: list[int], tmp_path: Path) -> None:
    """Admin (suspend, grant, state, explain, watch), ledger export and consumer group, policy
    publish and load, and the key store with its change feed, all on the cluster."""
    settings = Settings(redis_url=f"redis://127.0.0.1:{cluster[0]}", redis_cluster=True)
    gateway = await start_gateway(settings, tmp_path)
    try:
        report_id = await check_every_surface(gateway, settings.redis_target())
    finally:
        await gateway.stop()
    lines = await ledger_cli_lines("--redis-url", settings.redis_url, "--redis-cluster")
    assert report_id in [line["request_id"] for line in lines]


async def test_quota_leases_on_a_cluster(cluster: list[int]) -> None:
    """lease.lua, lease_sweep.lua and lease_read.lua on a cluster: the lease hashes they reach
    by name (not in KEYS) share the tenant's hash tag, hence the slot of the keys they are
    given; two tenants on different slots."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{cluster[0]}", cluster=True, connect_timeout=2)
    later = RedisStore.from_url(
        f"redis://127.0.0.1:{cluster[0]}", cluster=True, connect_timeout=2, clock_offset_ms=120_000
    )
    try:
        await store.publish_policy(load_policy_text(LEASE_POLICY))
        engine = Engine(store, EngineSettings(store_timeout_s=2.0), Telemetry())
        await engine.reload_policy()
        leases = RedisLeaseStore(store)
        leasing = Leasing(engine, leases)
        for tenant in ("ta", "tb"):
            (a,) = await leasing.lease(
                [LeaseAsk(f"{tenant}-1", Subject(tenant), "m.x", requested=7)], ["h"]
            )
            assert (a.decision, a.granted) == (Decision.ALLOW, 7)
            (b,) = await leasing.lease(
                [LeaseAsk(f"{tenant}-2", Subject(tenant), "m.x", lease_id=a.lease_id, used=3)],
                ["h"],
            )
            assert b.recorded == 3
            _, views = await leases.leases(Subject(tenant))
            assert [v.available for v in views] == [4]
            # two minutes later the lease has expired: the sweep gives its 4 units back
            assert await RedisLeaseStore(later).sweep(tenant) == 1
            _, views = await leases.leases(Subject(tenant))
            assert views == []
        nodes = redis.RedisCluster(host="127.0.0.1", port=cluster[0], decode_responses=True)
        try:
            assert nodes.keyslot(ledger_key("ta")) != nodes.keyslot(ledger_key("tb"))
            # 4 of the 7 granted came back, 3 stay spent
            level, scale = nodes.hmget("cp:{ta}:r:b::", ["l", "s"])
            assert int(level) // int(scale) == 97
        finally:
            nodes.close()
    finally:
        await store.close()
        await later.close()


# test_late_commits' policy for a tenant of its own on the shared cluster
LATE_POLICY = CREDIT_POLICY.replace("{name: strict,", "{name: late-strict,")


async def test_a_refused_admit_committed_late_is_reversed_on_a_cluster(cluster: list[int]) -> None:
    """reverse.lua on a cluster (issue #13, item 1): the tenant's node holds its replies past
    the store timeout, so the fail-closed tenant's admit is refused while the script commits
    afterwards; the late reply is reversed on that node: no net bill, the units back in the
    bucket and the quota, the dedup record gone, and a second reversal writes nothing."""
    url = f"redis://127.0.0.1:{cluster[0]}"
    store = RedisStore.from_url(url, cluster=True, connect_timeout=2)
    other = RedisStore.from_url(url, cluster=True, connect_timeout=2)
    nodes = redis.RedisCluster(host="127.0.0.1", port=cluster[0], decode_responses=True)
    owner = nodes.get_node_from_key(ledger_key("late-strict"))
    node = redis.Redis(host=owner.host, port=owner.port)
    subject = Subject("late-strict", key="k1")
    quota_key = "cp:{late-strict}:q:monthly::"
    try:
        # the units taken before, on a store of their own: the engine's store has not read
        # Redis' clock yet, so its call carries no deadline and commits after the pause
        before = await (await make_engine(other, LATE_POLICY)).check(
            Usage("before", subject, "api.calls", 4, Mode.ADMIT)
        )
        assert before.recorded
        reader = InMemoryMetricReader()
        telemetry = Telemetry(
            TracerProvider(), MeterProvider(metric_readers=[reader]), tracing=False
        )
        engine = Engine(store, EngineSettings(store_timeout_s=0.05), telemetry)
        await engine.reload_policy()
        quota0 = nodes.hgetall(quota_key)
        assert quota0["u"] == "4"

        refused_usage = Usage("refused", subject, "api.calls", 3, Mode.ADMIT)
        node.execute_command("CLIENT", "PAUSE", "300", "ALL")
        try:
            refused = await engine.check(refused_usage)
            await engine.late_replies_settled()
        finally:
            await engine.close()
        assert (refused.decision, refused.degraded, refused.recorded) == (
            Decision.DENY,
            True,
            False,
        )
        assert late_counts(reader) == {"reversed": 1}
        entries = ledger_entries(nodes, "late-strict")  # type: ignore[arg-type]
        assert net_billed(entries) == Counter({"before": 1, "refused": 0})
        late = next(e for e in entries if e.request_id == "refused" and not e.reversal)
        back = next(e for e in entries if e.reversal)
        assert (back.request_id, back.decision_id, back.billed_amount) == (
            "refused",
            late.decision_id,
            -3,
        )
        assert nodes.hgetall(quota_key) == quota0  # the same period: the 3 units are back
        assert not nodes.exists("cp:{late-strict}:d:refused")  # a resend is decided anew

        item = DecideItem(
            refused_usage, engine.policy.resolve(subject, "api.calls"), late.decision_id, ""
        )
        again = Reversal(item, refused, late.policy_version, late.decided_at_ms)
        assert await store.reverse("late-strict", [again]) == [False]
        assert ledger_entries(nodes, "late-strict") == entries  # type: ignore[arg-type]
    finally:
        node.close()
        nodes.close()
        await store.close()
        await other.close()
