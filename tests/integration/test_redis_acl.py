"""An external Redis with an ACL user that has only what Chargepath needs: a whole gateway
(decisions, admin changes and state, the audit trail, API keys, its background jobs) and the
billing side (ledger export, a consumer group) run through ``redis://user:pass@host:port``,
and the same user is refused everything else."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis

from chargepath.app import Gateway
from chargepath.core.auth import Role
from chargepath.core.leases import LeaseAsk
from chargepath.core.model import Decision, Subject
from chargepath.leasing import Leasing
from chargepath.settings import Settings
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.keys import RedisKeyStore
from chargepath.store.leases import RedisLeaseStore
from chargepath.store.ledger import Ledger
from chargepath.store.redis_store import RedisStore
from chargepath.store.webhooks import GROUP, SUSPENSION_OUTBOX, DeliveryRecord, WebhookStore
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.conftest import make_engine
from tests.integration.surfaces import operator_metadata

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

USER = "chargepath-acl-test"

#: The ACL rule of a Redis user for Chargepath (gateways and the ledger commands): its keys and
#: channels only (every one starts with "cp:"), and only the commands it sends, directly or from
#: its scripts (INFO: the memory gauges read INFO memory). No KEYS, FLUSHALL, CONFIG, DEBUG,
#: SCRIPT FLUSH, or keys of other applications.
ACL_RULE = (
    "on resetkeys ~cp:* resetchannels &cp:* -@all "
    "+ping +hello +auth +time +multi +exec +discard +evalsha +script|load +script|exists "
    "+info +get +set +del +exists +incr +pexpire +pexpireat +pttl +getrange +setrange "
    "+hget +hmget +hset +hgetall +hdel +hincrby +sadd +smembers "
    "+zadd +zcard +zscore +zremrangebyscore +zrem +zrangebyscore "
    "+publish +subscribe +unsubscribe "
    "+xadd +xrange +xrevrange +xread +xreadgroup +xack +xtrim +xlen +xpending +xautoclaim "
    "+xclaim +xdel "
    "+xgroup|create +xgroup|delconsumer +xinfo|stream +xinfo|groups +xinfo|consumers"
)


@pytest.fixture
def acl_url(redis_server: EmbeddedRedis, raw_redis: redis.Redis) -> Iterator[str]:
    password = secrets.token_urlsafe(24)
    raw_redis.execute_command("ACL", "SETUSER", USER, "reset", f">{password}", *ACL_RULE.split())
    yield f"redis://{USER}:{password}@127.0.0.1:{redis_server.port}/0"
    raw_redis.execute_command("ACL", "DELUSER", USER)


@pytest_asyncio.fixture
async def gateway(acl_url: str, tmp_path: Path) -> AsyncIterator[Gateway]:
    settings = Settings(
        port=0,
        redis_url=acl_url,
        plans=str(ROOT / "examples" / "plans.yaml"),
        data_dir=str(tmp_path / "gateway"),
        ledger_lag_interval_ms=100,
        health_probe_ms=100,
        redis_memory_interval_ms=100,
    )
    gw = Gateway(settings)
    await gw.start()
    yield gw
    await gw.stop()


def check(tenant: str = "cpaas-demo", key: str = "acl-key") -> pb.CheckRequest:
    return pb.CheckRequest(
        usage=pb.Usage(
            request_id=str(uuid.uuid4()),
            subject=pb.Subject(tenant=tenant, key=key),
            metric="api.sms.send",
            amount=1,
            mode=pb.MODE_ADMIT,
        )
    )


async def test_a_gateway_and_the_ledger_work_through_an_acl_user(
    gateway: Gateway, acl_url: str, raw_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # authentication as shipped: the operator key bootstrapped, and each call's key looked up,
    # through the ACL user
    auth = operator_metadata(gateway)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        meter = pb_grpc.MeteringServiceStub(ch)
        admin = apb_grpc.AdminServiceStub(ch)
        first = (await meter.Check(check(), metadata=auth)).verdict
        assert first.decision == pb.DECISION_ALLOW and first.recorded and not first.degraded
        suspended = await admin.Suspend(
            apb.SuspendRequest(subject=pb.Subject(tenant="cpaas-demo", key="acl-key")),
            metadata=auth,
        )
        denied = (await meter.Check(check(), metadata=auth)).verdict
        assert (denied.decision, denied.reason) == (pb.DECISION_DENY, pb.REASON_SUSPENDED)
        assert denied.policy_version == suspended.policy_version
        state = await admin.GetState(
            apb.GetStateRequest(subject=pb.Subject(tenant="cpaas-demo", key="acl-key")),
            metadata=auth,
        )
        assert state.policy_version == suspended.policy_version and state.limits
        assert [r.decision_id for r in state.recent][:2] == [denied.decision_id, first.decision_id]
        audit = await admin.ListAuditEvents(
            apb.ListAuditEventsRequest(tenant="cpaas-demo"), metadata=auth
        )
        assert [(e.method, e.outcome) for e in audit.events] == [("Suspend", "OK")]

    # API keys: scripts, the index and the change channel
    keys = RedisKeyStore.from_url(acl_url)
    try:
        record, _ = await keys.create("cpaas-demo", Role.METER, None, "acl")
        assert (await keys.get(record.key_id)) == record
        async with keys.changes() as changed:
            await keys.revoke(record.key_id)
            assert await anext(changed) == record.key_id
    finally:
        await keys.close()

    # billing: an export, then a consumer group that acknowledges (and so trims) the entry
    ledger = Ledger.from_url(acl_url)
    try:
        exported = [e async for e in ledger.export("cpaas-demo", None, mark=False)]
        assert [e.amount for e in exported] == [1]
        batches = ledger.consume_batches("cpaas-demo", "billing", "c1", count=10, block_ms=10)
        batch = await anext(batches)
        await batches.aclose()
        assert [e.request_id for _, e in batch] == [e.request_id for e in exported]
        assert await ledger.ack("cpaas-demo", "billing", [i for i, _ in batch]) == 1
    finally:
        await ledger.close()
    # the background jobs (health probe, policy watch, ledger lag, aggregates) ran too
    await asyncio.sleep(0.3)
    assert "NOPERM" not in caplog.text and "permission" not in caplog.text.lower()
    # the memory gauges' job read INFO memory (a refused read only keeps the gauges empty)
    assert gateway.parts is not None and gateway.parts.telemetry.store_memory is not None


async def test_webhook_outboxes_and_their_log_work_through_an_acl_user(
    acl_url: str, raw_redis: redis.Redis
) -> None:
    """What a gateway's webhook dispatcher sends: both relays' scripts, reads in the consumer
    group, lease renewal (XCLAIM), a dead process's entries taken over (XAUTOCLAIM), delivered
    entries acknowledged and deleted (XDEL), and the delivery log."""
    store = RedisStore.from_url(acl_url, connect_timeout=1.0)
    hooks = WebhookStore.of_store(store)
    try:
        assert await hooks.relay_thresholds("cpaas-demo") == (0, False)  # starts at the end
        assert await hooks.relay_suspensions(1, {}) == 0  # the first call only records
        assert await hooks.relay_suspensions(2, {("cpaas-demo", "", "acl-key"): "unpaid"}) == 1
        [entry] = await hooks.read_new(SUSPENSION_OUTBOX, "gw-a", 10)
        assert (entry.fields["t"], entry.fields["s"], entry.fields["r"]) == (
            "cpaas-demo",
            "1",
            "unpaid",
        )
        await hooks.renew(SUSPENSION_OUTBOX, "gw-a", [entry.entry_id])
        [taken] = await hooks.claim(SUSPENSION_OUTBOX, "gw-b", 0, 10)
        assert taken == entry
        await hooks.done(SUSPENSION_OUTBOX, [taken.entry_id])
        record = DeliveryRecord(
            at_ms=1,
            event_id="evt_1",
            type="suspension",
            tenant="cpaas-demo",
            endpoint="billing",
            url="http://127.0.0.1:1/hooks",
            attempt=1,
            outcome="delivered",
            status=200,
            error="",
            duration_ms=3,
            retry_in_ms=0,
        )
        await hooks.log([record])
        assert await hooks.read_log() == [record]
    finally:
        await store.close()
    assert raw_redis.xlen(SUSPENSION_OUTBOX) == 0
    assert raw_redis.xpending(SUSPENSION_OUTBOX, GROUP)["pending"] == 0


def test_the_acl_user_is_refused_everything_else(acl_url: str, raw_redis: redis.Redis) -> None:
    raw_redis.set("other-app:secret", "x")
    client = redis.Redis.from_url(acl_url, decode_responses=True)
    try:
        for command in (
            ("FLUSHALL",),
            ("CONFIG", "GET", "requirepass"),
            ("KEYS", "*"),
            ("GET", "other-app:secret"),
            ("ACL", "LIST"),
            ("SCRIPT", "FLUSH"),
            ("EVAL", "return 1", "0"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
        assert client.ping() is True
    finally:
        client.close()
    assert raw_redis.get("other-app:secret") == "x"


def test_the_readme_gives_the_rule_tested_here() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    [line] = [ln for ln in readme.splitlines() if ln.startswith("ACL SETUSER chargepath ")]
    words = line.split()[3:]
    assert [w for w in words if w != ">PASSWORD"] == ACL_RULE.split()


async def test_quota_leases_work_through_an_acl_user(acl_url: str, raw_redis: redis.Redis) -> None:
    """lease.lua, lease_sweep.lua and lease_read.lua send only what the rule allows."""
    store = RedisStore.from_url(acl_url, connect_timeout=1.0)
    try:
        engine = await make_engine(
            store,
            """\
metrics: [{name: api.sms.send}]
plans:
  - name: p
    limits:
      - name: burst
        metric: api.sms.send
        rate: {capacity: 100, refill: 1}
        lease: {max_units: 10, max_share_pct: 50, validity: 30s}
tenants: [{name: t1, plan: p}]
""",
        )
        leases = RedisLeaseStore(store)
        leasing = Leasing(engine, leases)
        (a,) = await leasing.lease(
            [LeaseAsk("acl-1", Subject("t1"), "api.sms.send", requested=5)], ["x"]
        )
        assert (a.decision, a.granted) == (Decision.ALLOW, 5)
        (b,) = await leasing.lease(
            [LeaseAsk("acl-2", Subject("t1"), "api.sms.send", lease_id=a.lease_id, used=2)], ["x"]
        )
        assert b.recorded == 2
        _, views = await leases.leases(Subject("t1"))
        assert [v.available for v in views] == [3]
        assert await leases.sweep("t1") == 0
        assert await leases.find_decision("t1", b.decision_id) is not None
    finally:
        await store.close()
