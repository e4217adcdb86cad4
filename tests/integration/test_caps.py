"""Tenant caps on what usages keep in Redis (issue #12, item 7), on a real redis-server: live
request ids, sessions, slices and keys are counted exactly under expiry, a usage past a cap is
DENY CAP_REACHED and writes nothing, and a tenant the policy does not name writes nothing.
Open quota leases are capped the same way (``caps.leases``), over the gateway's LeaseService."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
import redis

from chargepath.core.auth import Role
from chargepath.core.model import Decision, Mode, Reason, Subject, Usage, Verdict
from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine
from chargepath.leasing import Leasing
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.keys import RedisKeyStore
from chargepath.store.leases import RedisLeaseStore
from chargepath.store.protocol import (
    CAP_KEYS,
    CAP_REQUEST_IDS,
    CAP_SESSIONS,
    CAP_SLICES,
    caps_key,
    lease_index_key,
)
from chargepath.store.redis_store import RedisStore
from chargepath.transport import services
from chargepath.transport.auth import Authenticator, AuthInterceptor
from chargepath.transport.leases import LeaseServicer
from chargepath_protos.v1 import lease_pb2 as lpb
from chargepath_protos.v1 import lease_pb2_grpc as lpb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from tests.conftest import ledger_entries, make_engine

CAPPED = """
metrics: [{name: api.sms.send}, {name: slice.bytes}]
plans:
  - name: p
    limits:
      - {name: per-key, metric: api.sms.send, scope: key,
         rate: {capacity: 100, refill: 1, per: hour}}
      - {name: per-slice, metric: slice.bytes, scope: slice,
         quota: {amount: 1000000, per: month}}
      - {name: tenant-wide, metric: "*", scope: tenant,
         quota: {amount: 1000000, per: month}}
  - name: quick
    limits:
      - {name: per-key, metric: api.sms.send, scope: key,
         rate: {capacity: 100, refill: 100, per: second}}
tenants:
  - {name: quick, plan: quick, caps: {request_ids: null, keys: 3}}
  - {name: acme, plan: p, caps: {request_ids: 3, sessions: 2, slices: 2, keys: 3}}
  - {name: keyed, plan: p, caps: {request_ids: null, sessions: null, slices: 2, keys: 3}}
  - {name: free, plan: p, caps: {request_ids: null, sessions: null, slices: null, keys: null}}
"""

WINDOW_MS = 400


@pytest_asyncio.fixture
async def short_store(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis
) -> AsyncIterator[RedisStore]:
    """A store whose request ids and sessions live for WINDOW_MS."""
    s = RedisStore.from_url(
        redis_server.url,
        connect_timeout=1.0,
        dedup_window_ms=WINDOW_MS,
        session_ttl_ms=WINDOW_MS,
    )
    yield s
    await s.close()


def sms(rid: str, key: str = "k1", tenant: str = "acme") -> Usage:
    return Usage(rid, Subject(tenant, "", key), "api.sms.send", 1, Mode.ADMIT)


def members(raw: redis.Redis, tenant: str, cap: int) -> set[str]:
    return set(raw.zrange(caps_key(tenant, cap), 0, -1))


def refused(v: Verdict, cap: str) -> bool:
    return (
        v.decision is Decision.DENY
        and v.reason is Reason.CAP_REACHED
        and not v.recorded
        and v.message.startswith(f"caps.{cap}: ")
    )


async def test_request_ids_past_the_cap_are_refused_and_write_nothing(
    short_store: RedisStore, raw_redis: redis.Redis
) -> None:
    e = await make_engine(short_store, CAPPED)
    first = [await e.check(sms(f"r{i}")) for i in range(3)]
    assert all(v.decision is Decision.ALLOW for v in first)
    before = raw_redis.hget("cp:{acme}:r:per-key::k1", "l")
    fourth = await e.check(sms("r3"))
    assert refused(fourth, "request_ids"), fourth
    assert "3 live request ids" in fourth.message
    # nothing of it: no dedup record, no debit, no ledger entry
    assert not raw_redis.exists("cp:{acme}:d:r3")
    assert raw_redis.hget("cp:{acme}:r:per-key::k1", "l") == before
    assert [x.request_id for x in ledger_entries(raw_redis, "acme")] == ["r0", "r1", "r2"]
    # a resend of a live id adds nothing: answered from its record, as always
    again = await e.check(sms("r1"))
    assert again.replayed and again.decision is Decision.ALLOW
    assert members(raw_redis, "acme", CAP_REQUEST_IDS) == {"r0", "r1", "r2"}
    # the set lives no longer than its members
    assert 0 < raw_redis.pttl(caps_key("acme", CAP_REQUEST_IDS)) <= WINDOW_MS
    # once the records expire, their places are free: exact under expiry, no timer
    await asyncio.sleep(WINDOW_MS / 1000 + 0.1)
    later = [await e.check(sms(f"n{i}")) for i in range(4)]
    assert [v.decision for v in later[:3]] == [Decision.ALLOW] * 3
    assert refused(later[3], "request_ids")
    assert members(raw_redis, "acme", CAP_REQUEST_IDS) == {"n0", "n1", "n2"}
    live = {k.removeprefix("cp:{acme}:d:") for k in raw_redis.scan_iter("cp:{acme}:d:*")}
    assert live == {"n0", "n1", "n2"}


async def test_a_batch_counts_its_own_new_ids(
    short_store: RedisStore, raw_redis: redis.Redis
) -> None:
    e = await make_engine(short_store, CAPPED)
    verdicts = await e.decide_batch([sms(f"b{i}") for i in range(5)] + [sms("b0")])
    assert [v.decision for v in verdicts[:3]] == [Decision.ALLOW] * 3
    assert all(refused(v, "request_ids") for v in verdicts[3:5])
    # the same id later in the batch is a resend of the first, not a new id
    assert verdicts[5].replayed and verdicts[5].decision_id == verdicts[0].decision_id
    assert len(ledger_entries(raw_redis, "acme")) == 3


async def test_sessions_past_the_cap_are_refused_and_known_ones_go_on(
    short_store: RedisStore, raw_redis: redis.Redis
) -> None:
    e = await make_engine(short_store, CAPPED)

    def usage(session: str, seq: int) -> Usage:
        return Usage(
            f"{session}-{seq}",
            Subject("acme", "s1"),
            "slice.bytes",
            10,
            Mode.REPORT,
            session_id=session,
            sequence=seq,
        )

    a, b = await e.decide_batch([usage("a", 1), usage("b", 1)])
    assert a.recorded and b.recorded
    (c,) = await e.decide_batch([usage("c", 1)])
    assert refused(c, "sessions"), c
    assert not raw_redis.exists("cp:{acme}:s:c")
    # a known session is not new: it goes on, and its expiry (and its member's) moves
    (a2,) = await e.decide_batch([usage("a", 2)])
    assert a2.recorded
    assert members(raw_redis, "acme", CAP_SESSIONS) == {"a", "b"}
    score_a = raw_redis.zscore(caps_key("acme", CAP_SESSIONS), "a")
    score_b = raw_redis.zscore(caps_key("acme", CAP_SESSIONS), "b")
    assert score_a is not None and score_b is not None and score_a >= score_b
    # the refused usage moved nothing: once b has expired, c's resend is decided as new
    await asyncio.sleep(WINDOW_MS / 1000 + 0.05)
    (a3,) = await e.decide_batch([usage("a", 3)])
    (c2,) = await e.decide_batch([usage("c", 1)])
    assert a3.recorded and c2.recorded and not c2.replayed
    assert members(raw_redis, "acme", CAP_SESSIONS) == {"a", "c"}


async def test_keys_and_slices_past_their_caps_create_no_counter(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, CAPPED)
    keys = [await e.check(sms(f"k-{i}", key=f"key{i}", tenant="keyed")) for i in range(4)]
    assert [v.decision for v in keys[:3]] == [Decision.ALLOW] * 3
    assert refused(keys[3], "keys"), keys[3]
    assert not raw_redis.exists("cp:{keyed}:r:per-key::key3")
    # nothing counted at the tenant's scope either
    assert raw_redis.hget("cp:{keyed}:q:tenant-wide::", "u") == "3"
    assert members(raw_redis, "keyed", CAP_KEYS) == {f"\x1fkey{i}" for i in range(3)}
    # a known key goes on
    assert (await e.check(sms("k-again", key="key1", tenant="keyed"))).decision is Decision.ALLOW

    def slice_usage(rid: str, sl: str) -> Usage:
        return Usage(rid, Subject("keyed", sl), "slice.bytes", 5, Mode.REPORT)

    slices = [await e.check(slice_usage(f"s-{i}", f"s{i}")) for i in range(3)]
    assert [v.recorded for v in slices] == [True, True, False]
    assert refused(slices[2], "slices")
    assert not raw_redis.exists("cp:{keyed}:q:per-slice:s2:")
    assert members(raw_redis, "keyed", CAP_SLICES) == {"s0", "s1"}
    # a slice's member expires with its counter: an hour after its period ends
    score = raw_redis.zscore(caps_key("keyed", CAP_SLICES), "s0")
    counter_ttl = raw_redis.pttl("cp:{keyed}:q:per-slice:s0:")
    now_ms = int(raw_redis.time()[0]) * 1000  # type: ignore[index]
    assert score is not None and abs(score - (now_ms + counter_ttl)) < 5_000


async def test_a_key_whose_bucket_refilled_frees_its_place(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    # a bucket that is full again is gone (it expires when it would be full): its key's
    # member goes with it, 1 unit at 100/s: 10 ms. One batch, so that no bucket refills
    # between its usages.
    e = await make_engine(store, CAPPED)
    verdicts = await e.decide_batch([sms(f"x{i}", key=f"key{i}", tenant="quick") for i in range(4)])
    assert [v.decision for v in verdicts[:3]] == [Decision.ALLOW] * 3
    assert refused(verdicts[3], "keys")
    await asyncio.sleep(0.1)
    assert not list(raw_redis.scan_iter("cp:{quick}:r:per-key:*"))
    assert (await e.check(sms("x4", key="key3", tenant="quick"))).decision is Decision.ALLOW
    assert members(raw_redis, "quick", CAP_KEYS) == {"\x1fkey3"}


async def test_a_tenant_without_caps_counts_nothing(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, CAPPED)
    verdicts = [await e.check(sms(f"f{i}", key=f"key{i}", tenant="free")) for i in range(10)]
    assert all(v.decision is Decision.ALLOW for v in verdicts)
    assert not list(raw_redis.scan_iter("cp:{free}:cap:*"))


async def test_an_unknown_tenant_creates_nothing_in_redis(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    e: Engine = await make_engine(store, CAPPED)
    before = set(raw_redis.keys("*"))
    usages = [
        Usage(f"u{i}", Subject(f"nobody{i}", "s1", "k1"), "api.sms.send", 1, Mode.ADMIT)
        for i in range(20)
    ]
    checks = [await e.check(u) for u in usages[:10]]
    streamed = await e.decide_batch(
        [u._replace(session_id="sess", sequence=i + 1) for i, u in enumerate(usages[10:])]
    )
    for v in [*checks, *streamed]:
        assert (v.decision, v.reason, v.recorded) == (
            Decision.DENY,
            Reason.NO_ENTITLEMENT,
            False,
        )
    assert set(raw_redis.keys("*")) == before
    # a known tenant's refusal for a metric outside its plan still shows in its trail
    assert raw_redis.exists("cp:{acme}:recent") == 0
    await e.check(Usage("x", Subject("acme"), "api.sms.send", 1, Mode.ADMIT))
    assert raw_redis.exists("cp:{acme}:recent") == 1


# -- caps.leases: open quota leases, over the gateway's LeaseService with authentication ------

LEASED = """
metrics: [{name: api.sms.send}]
plans:
  - name: p
    limits:
      - {name: burst, metric: api.sms.send, rate: {capacity: 1000, refill: 1, per: hour},
         lease: {max_units: 10, max_share_pct: 100, validity: 60s}}
tenants:
  - {name: acme, plan: p, caps: {leases: 2}}
  - {name: other, plan: p}
"""


@pytest_asyncio.fixture
async def lease_gateway(
    redis_server: EmbeddedRedis, store: RedisStore
) -> AsyncIterator[tuple[str, RedisKeyStore, Engine]]:
    """LeaseService as the gateway serves it: API keys in Redis, the auth interceptor, the
    servicer's registration; on port 0. Yields its address, the key store and the engine."""
    engine = await make_engine(store, LEASED)
    keys = RedisKeyStore.from_url(redis_server.url)
    authenticator = Authenticator(keys)
    await authenticator.start()
    server = grpc.aio.server(interceptors=[AuthInterceptor(authenticator)])
    leasing = Leasing(engine, RedisLeaseStore(store))
    services.add_service(server, LeaseServicer(leasing, asyncio.Event()), services.LEASE)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", keys, engine
    await server.stop(None)
    await authenticator.close()
    await keys.close()


async def test_open_leases_are_capped_by_caps_leases(
    lease_gateway: tuple[str, RedisKeyStore, Engine], store: RedisStore, raw_redis: redis.Redis
) -> None:
    """acme may hold 2 open leases (``caps.leases: 2``): a third is DENY CAP_REACHED naming
    the cap, nothing granted or written, while a renewal of an open one is granted and
    another tenant (the default, 100,000) is not held back; a caller of another tenant and
    a caller without a key are refused before anything is counted; raising the cap in the
    policy lets the third in."""
    address, keys, engine = lease_gateway
    _, acme_key = await keys.create("acme", Role.METER, None, "acme meter")
    _, other_key = await keys.create("other", Role.METER, None, "other meter")

    async def lease(
        key: str | None, rid: str, tenant: str = "acme", **fields: Any
    ) -> lpb.LeaseAnswer:
        ask = lpb.LeaseAsk(
            request_id=rid,
            subject=pb.Subject(tenant=tenant),
            metric="api.sms.send",
            holder="edge-1",
            **fields,
        )
        metadata = () if key is None else (("authorization", f"Bearer {key}"),)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = lpb_grpc.LeaseServiceStub(channel)
            reply = await stub.Lease(lpb.LeaseRequest(ask=ask), metadata=metadata, timeout=10)
        return reply.answer

    first = await lease(acme_key.plaintext, "a1", requested=5)
    second = await lease(acme_key.plaintext, "a2", requested=5)
    assert first.granted == second.granted == 5
    index = lease_index_key("acme")
    ledger_before = raw_redis.xlen("cp:{acme}:ledger")
    third = await lease(acme_key.plaintext, "a3", requested=5)
    assert (third.decision, third.reason, third.granted, third.lease_id) == (
        pb.DECISION_DENY,
        pb.REASON_CAP_REACHED,
        0,
        "",
    )
    assert third.message.startswith("caps.leases: the tenant's 2 open leases"), third.message
    assert raw_redis.zcard(index) == 2
    assert raw_redis.xlen("cp:{acme}:ledger") == ledger_before
    level, scale = raw_redis.hmget("cp:{acme}:r:burst::", ["l", "s"])
    assert int(level) // int(scale) == 990  # the two grants of 5 only
    # a renewal (with a report) of an open lease is not a new lease
    renewed = await lease(acme_key.plaintext, "a4", lease_id=first.lease_id, used=5, requested=5)
    assert (renewed.decision, renewed.granted, renewed.recorded) == (pb.DECISION_ALLOW, 5, 5)
    # the cap is acme's: another tenant opens leases as it likes
    for n in range(3):
        assert (await lease(other_key.plaintext, f"o{n}", tenant="other", requested=1)).granted

    # callers who must be refused, and who change nothing
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await lease(other_key.plaintext, "x1", requested=1)
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await lease(None, "x2", requested=1)
    assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert raw_redis.zcard(index) == 2

    # a release frees a place; then the cap holds again
    released = await lease(acme_key.plaintext, "a5", lease_id=second.lease_id, release=True)
    assert released.closed
    assert (await lease(acme_key.plaintext, "a6", requested=1)).granted == 1
    assert (await lease(acme_key.plaintext, "a7", requested=1)).reason == pb.REASON_CAP_REACHED

    # the cap is the policy's: raised to 3, the third lease is granted
    await store.publish_policy(load_policy_text(LEASED.replace("leases: 2", "leases: 3")))
    await engine.reload_policy()
    assert (await lease(acme_key.plaintext, "a8", requested=1)).granted == 1
    assert raw_redis.zcard(index) == 3
    refused_again = await lease(acme_key.plaintext, "a9", requested=1)
    assert refused_again.message.startswith("caps.leases: the tenant's 3 open leases")
