"""The audit trail and the admin input rules on a real grpc.aio server (port 0): the real
AdminService and KeyService, behind the AuditInterceptor and (unless ``--auth none``) the
AuthInterceptor, on a real Redis. Each assertion reads the stream in Redis itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
import redis
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chargepath.core.auth import FailedAttempts, Role
from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine, EngineSettings
from chargepath.store.admin import AdminStore
from chargepath.store.audit import AUDIT_KEY, AuditStream
from chargepath.store.base import PolicyConflictError
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.keys import RedisKeyStore
from chargepath.store.redis_store import POLICY_KEY, RedisStore
from chargepath.telemetry import Telemetry
from chargepath.transport.admin import AdminServicer
from chargepath.transport.audit import AuditInterceptor
from chargepath.transport.auth import Authenticator, AuthInterceptor
from chargepath.transport.keys import KeyServicer
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import keys_pb2, keys_pb2_grpc
from chargepath_protos.v1 import metering_pb2 as pb

pytestmark = pytest.mark.integration

POLICY = """
metrics: [{name: api.sms.send}]
plans:
  - name: gold
    limits:
      - {name: sms, metric: api.sms.send, scope: tenant, quota: {amount: 100, per: day}}
  - name: silver
    limits:
      - {name: sms, metric: api.sms.send, scope: tenant, quota: {amount: 10, per: day}}
tenants:
  - {name: acme, plan: gold}
  - {name: globex, plan: silver}
"""

WITHOUT_SILVER = """
metrics: [{name: api.sms.send}]
plans:
  - name: gold
    limits:
      - {name: sms, metric: api.sms.send, scope: tenant, quota: {amount: 100, per: day}}
tenants:
  - {name: acme, plan: gold}
"""


@dataclass
class Gateway:
    port: int
    store: RedisStore
    keys: RedisKeyStore
    authenticator: Authenticator | None
    server: grpc.aio.Server
    operator: str = ""  # the operator's plaintext key ("" with --auth none)
    operator_id: str = ""

    def admin(self, channel: grpc.aio.Channel) -> apb_grpc.AdminServiceStub:
        return apb_grpc.AdminServiceStub(channel)

    def metadata(self, key: str | None = None) -> tuple[tuple[str, str], ...]:
        key = self.operator if key is None else key
        return (("authorization", f"Bearer {key}"),) if key else ()


async def start(url: str, *, auth: bool) -> Gateway:
    store = RedisStore.from_url(url, connect_timeout=1.0)
    await store.publish_policy(load_policy_text(POLICY))
    engine = Engine(store, EngineSettings(store_timeout_s=2.0), Telemetry())
    await engine.reload_policy()
    keys = RedisKeyStore.from_url(url)
    trail = AuditStream(store.client)
    interceptors: list[Any] = [AuditInterceptor(trail)]
    authenticator = None
    if auth:
        authenticator = Authenticator(
            keys, attempts=FailedAttempts(lambda: time.monotonic_ns() // 1_000_000)
        )
        await authenticator.start()
        interceptors.append(AuthInterceptor(authenticator))
    server = grpc.aio.server(interceptors=interceptors)
    apb_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(engine, store, AdminStore(store), trail), server
    )
    keys_pb2_grpc.add_KeyServiceServicer_to_server(KeyServicer(keys), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gw = Gateway(port, store, keys, authenticator, server)
    if auth:
        record, key = await keys.create(None, Role.OPERATOR, None, "test operator")
        gw.operator, gw.operator_id = key.plaintext, record.key_id
        await asyncio.sleep(0.05)
    return gw


async def stop(gw: Gateway) -> None:
    await gw.server.stop(None)
    if gw.authenticator is not None:
        await gw.authenticator.close()
    await gw.keys.close()
    await gw.store.close()


@pytest_asyncio.fixture
async def gateway(redis_server: EmbeddedRedis, raw_redis: redis.Redis) -> AsyncIterator[Gateway]:
    gw = await start(redis_server.url, auth=True)
    yield gw
    await stop(gw)


@pytest_asyncio.fixture
async def open_gateway(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis
) -> AsyncIterator[Gateway]:
    gw = await start(redis_server.url, auth=False)
    yield gw
    await stop(gw)


def trail(raw: redis.Redis) -> list[dict[str, str]]:
    """The audit stream as Redis holds it, oldest first (with the entry id as ``id``)."""
    entries: Any = raw.xrange(AUDIT_KEY)
    return [{"id": i, **fields} for i, fields in entries]


def live_version(raw: redis.Redis) -> int:
    return int(raw.hget(POLICY_KEY, "v") or 0)  # type: ignore[arg-type]


async def test_every_mutating_call_leaves_one_entry_with_who_what_and_versions(
    gateway: Gateway, raw_redis: redis.Redis
) -> None:
    md = gateway.metadata()
    v0 = live_version(raw_redis)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        admin = gateway.admin(ch)
        keys = keys_pb2_grpc.KeyServiceStub(ch)
        plan = apb.Plan(
            name="bronze",
            limits=[
                apb.Limit(
                    name="sms",
                    metric="api.sms.send",
                    scope=pb.SCOPE_TENANT,
                    quota=apb.QuotaLimit(amount=5, per="day"),
                )
            ],
        )
        await admin.PutPlan(apb.PutPlanRequest(plan=plan), metadata=md)
        await admin.AssignPlan(apb.AssignPlanRequest(tenant="initech", plan="bronze"), metadata=md)
        await admin.Suspend(
            apb.SuspendRequest(subject=pb.Subject(tenant="acme"), reason="fraud check"),
            metadata=md,
        )
        await admin.Resume(apb.ResumeRequest(subject=pb.Subject(tenant="acme")), metadata=md)
        await admin.SetFailurePolicy(
            apb.SetFailurePolicyRequest(tenant="globex", mode=apb.FAILURE_MODE_ALLOW),
            metadata=md,
        )
        await admin.Grant(
            apb.GrantRequest(
                subject=pb.Subject(tenant="acme"), limit="sms", amount=7, note="TICKET-1"
            ),
            metadata=md,
        )
        await admin.AssignPlan(apb.AssignPlanRequest(tenant="initech", plan=""), metadata=md)
        await admin.DeletePlan(apb.DeletePlanRequest(name="bronze"), metadata=md)
        created = await keys.CreateKey(
            keys_pb2.CreateKeyRequest(role=keys_pb2.ROLE_METER, tenant="acme"), metadata=md
        )
        rotated = await keys.RotateKey(
            keys_pb2.RotateKeyRequest(
                key_id=created.key.key_id, grace_period=duration_pb2.Duration(seconds=60)
            ),
            metadata=md,
        )
        await keys.RevokeKey(keys_pb2.RevokeKeyRequest(key_id=rotated.key.key_id), metadata=md)
        # reads are not audited
        await admin.GetPolicy(apb.GetPolicyRequest(), metadata=md)
        await keys.ListKeys(keys_pb2.ListKeysRequest(), metadata=md)

    entries = trail(raw_redis)
    assert [e["rpc"] for e in entries] == [
        "PutPlan",
        "AssignPlan",
        "Suspend",
        "Resume",
        "SetFailurePolicy",
        "Grant",
        "AssignPlan",
        "DeletePlan",
        "CreateKey",
        "RotateKey",
        "RevokeKey",
    ]
    assert all(e["who"] == gateway.operator_id and e["role"] == "operator" for e in entries)
    assert all(e["outcome"] == "OK" and e["detail"] == "" for e in entries)
    # policy changes: each one version after the previous, written with the change
    policy = entries[:5] + entries[6:8]
    versions = [(int(e["vb"]), int(e["va"])) for e in policy]
    assert versions == [(v0 + i, v0 + i + 1) for i in range(7)]
    assert live_version(raw_redis) == v0 + 7
    # what and whom
    assert entries[1]["what"] == "tenant=initech slice= plan=bronze"
    assert entries[1]["tenants"] == "initech"
    assert entries[2]["what"] == "tenant=acme slice= key= reason=fraud check"
    assert entries[2]["tenants"] == "acme"
    assert entries[4]["tenants"] == "globex"
    assert entries[5]["what"].startswith("tenant=acme slice= key= limit=sms amount=7")
    assert (entries[5]["tenants"], entries[5]["vb"], entries[5]["va"]) == ("acme", "0", "0")
    assert entries[8]["tenants"] == entries[9]["tenants"] == entries[10]["tenants"] == "acme"
    assert entries[10]["what"] == f"key_id={rotated.key.key_id}"
    # never a secret: neither key handed out, nor the caller's own
    text = repr(entries)
    for secret in (created.secret_key, rotated.secret_key, gateway.operator):
        # the whole secret after "cpk_<id>_" (the secret's base64 may itself hold "_")
        assert secret.split("_", 2)[2] not in text
    assert "cpk_" not in text


async def test_apply_policy_is_audited_with_the_tenants_it_affects_and_never_the_document(
    gateway: Gateway, raw_redis: redis.Redis
) -> None:
    v0 = live_version(raw_redis)
    document = POLICY.replace("amount: 10, per: day", "amount: 20, per: day")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        r = await gateway.admin(ch).ApplyPolicy(
            apb.ApplyPolicyRequest(document=document), metadata=gateway.metadata()
        )
    assert r.changed and r.policy_version == v0 + 1
    [entry] = trail(raw_redis)
    assert (entry["rpc"], entry["outcome"], entry["who"]) == (
        "ApplyPolicy",
        "OK",
        gateway.operator_id,
    )
    assert (int(entry["vb"]), int(entry["va"])) == (v0, v0 + 1)
    assert entry["tenants"] == "globex"  # silver changed; only globex is on it
    assert entry["what"].startswith(f"document={len(document)} bytes sha256:")
    assert "api.sms.send" not in repr(entry)


async def test_a_meter_key_refused_on_an_admin_call_is_audited_and_changes_nothing(
    gateway: Gateway, raw_redis: redis.Redis
) -> None:
    record, key = await gateway.keys.create("acme", Role.METER, None, "")
    v0 = live_version(raw_redis)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.admin(ch).Suspend(
                apb.SuspendRequest(subject=pb.Subject(tenant="globex")),
                metadata=gateway.metadata(key.plaintext),
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.admin(ch).ListAuditEvents(
                apb.ListAuditEventsRequest(), metadata=gateway.metadata(key.plaintext)
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # no credential at all: not audited (no verified identity to name)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.admin(ch).Suspend(
                apb.SuspendRequest(subject=pb.Subject(tenant="globex")), metadata=()
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert live_version(raw_redis) == v0
    [entry] = trail(raw_redis)
    assert (entry["rpc"], entry["who"], entry["role"], entry["outcome"]) == (
        "Suspend",
        record.key_id,
        "meter",
        "PERMISSION_DENIED",
    )
    assert entry["tenants"] == "globex" and "may not call" in entry["detail"]
    assert key.secret not in repr(entry)


async def test_with_auth_none_the_caller_is_anonymous(
    open_gateway: Gateway, raw_redis: redis.Redis
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{open_gateway.port}") as ch:
        await open_gateway.admin(ch).AssignPlan(apb.AssignPlanRequest(tenant="acme", plan="silver"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await open_gateway.admin(ch).AssignPlan(
                apb.AssignPlanRequest(tenant="acme", plan="platinum")
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    ok, missing = trail(raw_redis)
    assert (ok["who"], ok["role"], ok["outcome"]) == ("anonymous", "", "OK")
    assert int(ok["va"]) == int(ok["vb"]) + 1
    assert (missing["who"], missing["outcome"]) == ("anonymous", "NOT_FOUND")
    assert "platinum" in missing["detail"]


@pytest.mark.parametrize("document", ["", "   \n", "{}", "null", "metrics: [{name: a.b}]\n"])
async def test_an_empty_or_absent_document_is_invalid_and_audited(
    gateway: Gateway, raw_redis: redis.Redis, document: str
) -> None:
    v0 = live_version(raw_redis)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.admin(ch).ApplyPolicy(
                apb.ApplyPolicyRequest(document=document, prune=True),
                metadata=gateway.metadata(),
            )
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["document"]
    assert live_version(raw_redis) == v0
    [entry] = trail(raw_redis)
    assert (entry["rpc"], entry["outcome"]) == ("ApplyPolicy", "INVALID_ARGUMENT")
    assert entry["vb"] == entry["va"] == "0"  # refused before the live policy was read


async def test_removing_plans_or_tenants_needs_prune_and_a_dry_run_previews_it(
    gateway: Gateway, raw_redis: redis.Redis
) -> None:
    md = gateway.metadata()
    v0 = live_version(raw_redis)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        admin = gateway.admin(ch)
        for dry_run in (False, True):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.ApplyPolicy(
                    apb.ApplyPolicyRequest(document=WITHOUT_SILVER, dry_run=dry_run), metadata=md
                )
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
            assert status is not None
            failure = error_details_pb2.PreconditionFailure()
            assert status.details[0].Unpack(failure)
            assert [(v.type, v.subject) for v in failure.violations] == [
                ("PRUNE", "plans/silver"),
                ("PRUNE", "tenants/globex"),
            ]
        assert live_version(raw_redis) == v0

        preview = await admin.ApplyPolicy(
            apb.ApplyPolicyRequest(document=WITHOUT_SILVER, dry_run=True, prune=True), metadata=md
        )
        assert not preview.changed and preview.policy_version == v0
        assert list(preview.removed_plans) == ["silver"]
        assert list(preview.removed_tenants) == ["globex"]
        assert "- plans.silver" in preview.diff and "- tenants.globex" in preview.diff
        assert live_version(raw_redis) == v0

        # the reviewed version is no longer live: nothing is applied
        await admin.Grant(
            apb.GrantRequest(subject=pb.Subject(tenant="acme"), limit="sms", amount=1),
            metadata=md,
        )
        await admin.Suspend(apb.SuspendRequest(subject=pb.Subject(tenant="acme")), metadata=md)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.ApplyPolicy(
                apb.ApplyPolicyRequest(
                    document=WITHOUT_SILVER, prune=True, expected_version=preview.policy_version
                ),
                metadata=md,
            )
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert live_version(raw_redis) == v0 + 1

        applied = await admin.ApplyPolicy(
            apb.ApplyPolicyRequest(document=WITHOUT_SILVER, prune=True, expected_version=v0 + 1),
            metadata=md,
        )
        assert applied.changed and applied.policy_version == v0 + 2
        assert list(applied.removed_tenants) == ["globex"]
        plans = await admin.ListPlans(apb.ListPlansRequest(), metadata=md)
        assert [p.name for p in plans.plans] == ["gold"]

    entries = trail(raw_redis)
    assert [(e["rpc"], e["outcome"]) for e in entries] == [
        ("ApplyPolicy", "FAILED_PRECONDITION"),
        ("ApplyPolicy", "FAILED_PRECONDITION"),
        ("ApplyPolicy", "OK"),
        ("Grant", "OK"),
        ("Suspend", "OK"),
        ("ApplyPolicy", "ABORTED"),
        ("ApplyPolicy", "OK"),
    ]
    assert "globex" in entries[0]["detail"] and "set prune" in entries[0]["detail"]
    assert entries[1]["what"].endswith(" dry_run")
    assert entries[2]["what"].endswith(" dry_run prune")
    assert (entries[2]["vb"], entries[2]["va"]) == (str(v0), str(v0))
    last = entries[-1]
    assert last["what"].endswith(f" prune expected_version={v0 + 1}")
    assert (last["vb"], last["va"]) == (str(v0 + 1), str(v0 + 2))
    # globex goes; acme's suspension (not in the document) is lifted
    assert last["tenants"] == "acme,globex"


async def test_list_audit_events_filters_by_tenant_and_time_and_pages_with_a_cursor(
    gateway: Gateway, raw_redis: redis.Redis
) -> None:
    md = gateway.metadata()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        admin = gateway.admin(ch)
        for tenant in ("acme", "globex", "acme"):
            await admin.Suspend(apb.SuspendRequest(subject=pb.Subject(tenant=tenant)), metadata=md)
        everything = await admin.ListAuditEvents(apb.ListAuditEventsRequest(), metadata=md)
        assert [list(e.tenants) for e in everything.events] == [["acme"], ["globex"], ["acme"]]
        first = everything.events[0]
        assert (first.identity, first.role, first.method, first.outcome) == (
            gateway.operator_id,
            "operator",
            "Suspend",
            "OK",
        )
        assert first.policy_version_after == first.policy_version_before + 1
        assert abs(first.at.ToMilliseconds() - time.time() * 1000) < 60_000
        acme = await admin.ListAuditEvents(apb.ListAuditEventsRequest(tenant="acme"), metadata=md)
        assert [e.event_id for e in acme.events] == [
            everything.events[0].event_id,
            everything.events[2].event_id,
        ]
        page = await admin.ListAuditEvents(apb.ListAuditEventsRequest(limit=2), metadata=md)
        assert len(page.events) == 2
        rest = await admin.ListAuditEvents(
            apb.ListAuditEventsRequest(after=page.next_cursor), metadata=md
        )
        assert [e.event_id for e in rest.events] == [everything.events[2].event_id]
        nothing = await admin.ListAuditEvents(
            apb.ListAuditEventsRequest(after=rest.next_cursor), metadata=md
        )
        assert not nothing.events and nothing.next_cursor == rest.next_cursor
        since = apb.ListAuditEventsRequest()
        since.since.FromMilliseconds(everything.events[2].at.ToMilliseconds() + 1)
        assert not (await admin.ListAuditEvents(since, metadata=md)).events
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.ListAuditEvents(
                apb.ListAuditEventsRequest(after="0-0 OR 1", limit=5000), metadata=md
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "after" in (info.value.details() or "") and "limit" in (info.value.details() or "")


async def test_a_policy_change_and_its_entry_are_one_atomic_step(
    gateway: Gateway, raw_redis: redis.Redis
) -> None:
    """publish.lua writes the version and the entry together: a conflict writes neither."""
    from chargepath.core.audit import AuditEvent

    store = gateway.store
    live = await store.load_policy()
    assert live is not None
    doc = load_policy_text(WITHOUT_SILVER)
    event = AuditEvent("k1", "operator", "ApplyPolicy", "document=1 bytes")
    with pytest.raises(PolicyConflictError):
        await store.publish_policy(doc, expected_version=live.version - 1, audit=event)
    assert trail(raw_redis) == [] and live_version(raw_redis) == live.version
    published = await store.publish_policy(doc, expected_version=live.version, audit=event)
    [entry] = trail(raw_redis)
    assert (int(entry["vb"]), int(entry["va"])) == (live.version, published.version)
    assert abs(int(entry["id"].split("-")[0]) - time.time() * 1000) < 60_000


async def test_apply_policy_returns_every_issue_of_a_document_as_field_violations_with_lines(
    gateway: Gateway, raw_redis: redis.Redis
) -> None:
    """Issue #14, item 6 on the wire: the 13 issues of one document (schema and rules across
    fields) are the BadRequest's field violations, in the order of the text, each naming its
    line; a viewer's key is refused and learns nothing of the document."""
    from tests.unit.test_plans import MANY_ERRORS, MANY_ERRORS_FOUND

    v0 = live_version(raw_redis)
    _, viewer = await gateway.keys.create("acme", Role.VIEWER, None, "a viewer")
    await asyncio.sleep(0.05)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        for md, code in (
            (gateway.metadata(viewer.plaintext), grpc.StatusCode.PERMISSION_DENIED),
            ((), grpc.StatusCode.UNAUTHENTICATED),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await gateway.admin(ch).ApplyPolicy(
                    apb.ApplyPolicyRequest(document=MANY_ERRORS), metadata=md
                )
            assert refused.value.code() == code
            assert "unknown unit" not in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gateway.admin(ch).ApplyPolicy(
                apb.ApplyPolicyRequest(document=MANY_ERRORS), metadata=gateway.metadata()
            )
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    got = [(v.field, v.description) for v in bad.field_violations]
    assert [field for field, _ in got] == [f"document.{p}" for _, p, _ in MANY_ERRORS_FOUND]
    for (_, description), (line, _, message) in zip(got, MANY_ERRORS_FOUND, strict=True):
        assert description.startswith(f"line {line}: {message}"), description
    assert live_version(raw_redis) == v0
