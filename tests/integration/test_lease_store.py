"""Quota leases on a real redis-server: grants, reports, releases, expiry and refunds, the
dedup of retried asks, and the Lua sizing against the Python reference on random inputs."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import grpc
import pytest_asyncio
import redis
from google.protobuf.message import Message
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chargepath.core.leases import LeaseAnswer, LeaseAsk, LeaseTerms, LimitRoom, grant_size
from chargepath.core.model import Decision, Mode, Reason, Subject, Usage
from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine, EngineSettings
from chargepath.leasing import Leasing
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.leases import RedisLeaseStore
from chargepath.store.protocol import lease_index_key
from chargepath.store.redis_store import RedisStore
from chargepath.telemetry import Telemetry
from chargepath.transport import services
from chargepath.transport.leases import LeaseServicer
from chargepath_protos.v1 import lease_pb2 as lpb
from chargepath_protos.v1 import metering_pb2 as pb
from tests.conftest import ledger_entries, make_engine
from tests.fuzzing import RawFuzz

POLICY = """\
metrics:
  - name: api.sms.send
  - name: api.mms.send
plans:
  - name: p
    limits:
      - name: burst
        metric: api.sms.send
        rate: {{ capacity: {capacity}, refill: 1, per: hour }}
        lease: {{ max_units: {max_units}, max_share_pct: {share}, validity: 30s }}
      - name: monthly
        metric: api.sms.send
        quota: {{ amount: {quota}, per: month }}
        lease: {{ max_units: 1000000, max_share_pct: 100, validity: 60s, renew_below_pct: 10 }}
      - name: mms
        metric: api.mms.send
        rate: {{ capacity: 10, refill: 1 }}
tenants:
  - name: t1
    plan: p
"""

SUBJECT = Subject("t1")
SMS = "api.sms.send"


def policy(capacity: int = 1000, max_units: int = 100, share: int = 50, quota: int = 10**6) -> str:
    return POLICY.format(capacity=capacity, max_units=max_units, share=share, quota=quota)


@pytest_asyncio.fixture
async def leasing(store: RedisStore) -> AsyncIterator[Leasing]:
    engine = await make_engine(store, policy())
    yield Leasing(engine, RedisLeaseStore(store))


async def one(leasing: Leasing, ask: LeaseAsk) -> LeaseAnswer:
    (answer,) = await leasing.lease([ask], ["test"])
    return answer


def level(raw: redis.Redis, limit: str = "burst") -> int:
    """A bucket's whole units (a missing hash: full)."""
    v, scale = raw.hmget(f"cp:{{t1}}:r:{limit}::", ["l", "s"])
    return -1 if v is None or scale is None else int(v) // int(scale)


async def test_open_report_renew_release(leasing: Leasing, raw_redis: redis.Redis) -> None:
    a = await one(leasing, LeaseAsk("o1", SUBJECT, SMS, requested=500, holder="gw-1"))
    assert (a.decision, a.reason, a.granted, a.available) == (Decision.ALLOW, Reason.OK, 100, 100)
    assert a.lease_id and 29_000 < a.valid_for_ms <= 30_000  # the shortest validity
    assert a.renew_below == 10  # the smallest renew_below_pct: 10% of 100
    assert [(s.name, s.remaining) for s in a.limits] == [("burst", 900), ("monthly", 999_900)]

    b = await one(leasing, LeaseAsk("o2", SUBJECT, SMS, lease_id=a.lease_id, used=30, requested=50))
    assert (b.recorded, b.overage, b.granted, b.available) == (30, 0, 50, 120)

    c = await one(leasing, LeaseAsk("o3", SUBJECT, SMS, lease_id=a.lease_id, used=20, release=True))
    assert (c.recorded, c.refunded, c.closed, c.available) == (20, 100, True, 0)
    assert [(s.name, s.remaining) for s in c.limits] == [("burst", 950), ("monthly", 999_950)]

    entries = [e for e in ledger_entries(raw_redis, "t1") if e.mode == "lease"]
    assert [(e.request_id, e.amount, e.lease_id, e.overage) for e in entries] == [
        ("o2", 30, a.lease_id, 0),
        ("o3", 20, a.lease_id, 0),
    ]
    assert raw_redis.zcard(lease_index_key("t1")) == 0


async def test_overage_is_recorded_and_debited(leasing: Leasing, raw_redis: redis.Redis) -> None:
    a = await one(leasing, LeaseAsk("v1", SUBJECT, SMS, requested=10))
    b = await one(leasing, LeaseAsk("v2", SUBJECT, SMS, lease_id=a.lease_id, used=25))
    assert (b.recorded, b.overage, b.available) == (10, 15, 0)
    assert b.limits[0].remaining == 1000 - 25
    (e,) = [e for e in ledger_entries(raw_redis, "t1") if e.request_id == "v2"]
    assert (e.amount, e.overage) == (25, 15)


async def test_a_retried_ask_changes_nothing(leasing: Leasing, raw_redis: redis.Redis) -> None:
    a = await one(leasing, LeaseAsk("r1", SUBJECT, SMS, requested=40))
    again = await one(leasing, LeaseAsk("r1", SUBJECT, SMS, requested=40))
    assert again.replayed and again.lease_id == a.lease_id and again.granted == 40
    assert raw_redis.zcard(lease_index_key("t1")) == 1
    rep = LeaseAsk("r2", SUBJECT, SMS, lease_id=a.lease_id, used=7)
    await one(leasing, rep)
    assert (await one(leasing, rep)).replayed
    assert sum(e.amount for e in ledger_entries(raw_redis, "t1")) == 7
    other = await one(leasing, LeaseAsk("r2", SUBJECT, SMS, lease_id=a.lease_id, used=8))
    assert (other.reason, other.violations[0].field) == (Reason.INVALID_USAGE, "request_id")


async def test_a_limit_without_lease_settings_refuses(leasing: Leasing) -> None:
    a = await one(leasing, LeaseAsk("n1", SUBJECT, "api.mms.send", requested=1))
    assert (a.decision, a.reason) == (Decision.DENY, Reason.NO_ENTITLEMENT)
    assert "'mms'" in a.message


async def test_grants_shrink_and_end_with_final_units(store: RedisStore) -> None:
    engine = await make_engine(store, policy(capacity=100, max_units=1000, share=50))
    leasing = Leasing(engine, RedisLeaseStore(store))
    grants = []
    for n in range(12):
        a = await one(leasing, LeaseAsk(f"s{n}", SUBJECT, SMS, requested=1000))
        grants.append(a.granted)
        if a.final_units:
            break
    assert grants == [50, 25, 12, 6, 3, 2, 1, 1]  # half of what remains, at least one
    assert sum(grants) == 100
    refused = await one(leasing, LeaseAsk("s-last", SUBJECT, SMS, requested=1))
    assert (refused.decision, refused.reason, refused.granted) == (
        Decision.THROTTLE,
        Reason.RATE_LIMITED,
        0,
    )
    assert refused.retry_after_ms > 0 and refused.lease_id == ""


async def test_expiry_gives_the_units_back(
    store: RedisStore, redis_server: EmbeddedRedis, raw_redis: redis.Redis
) -> None:
    engine = await make_engine(store, policy())
    leasing = Leasing(engine, RedisLeaseStore(store))
    a = await one(leasing, LeaseAsk("e1", SUBJECT, SMS, requested=100))
    await one(leasing, LeaseAsk("e2", SUBJECT, SMS, lease_id=a.lease_id, used=30))
    assert level(raw_redis) == 900
    # a store whose clock is 31 s ahead sees the lease expired
    later = RedisStore.from_url(redis_server.url, connect_timeout=1.0, clock_offset_ms=31_000)
    try:
        leases = RedisLeaseStore(later)
        assert await leases.sweep("t1") == 1
        assert await leases.sweep("t1") == 0
        # 70 units back, 30 spent; the bucket refilled ~31 s at 1/hour meanwhile
        assert level(raw_redis) == 970
        assert raw_redis.zcard(lease_index_key("t1")) == 0
        late = await one(
            Leasing(engine, leases), LeaseAsk("e3", SUBJECT, SMS, lease_id=a.lease_id, used=5)
        )
        assert (late.decision, late.reason, late.overage, late.closed) == (
            Decision.DENY,
            Reason.LEASE_EXPIRED,
            5,
            True,
        )
    finally:
        await later.close()
    assert sum(e.amount for e in ledger_entries(raw_redis, "t1")) == 35


async def test_state_lists_the_open_leases(leasing: Leasing) -> None:
    a = await one(leasing, LeaseAsk("l1", SUBJECT, SMS, requested=10, holder="gw-7"))
    await one(leasing, LeaseAsk("l2", SUBJECT, SMS, lease_id=a.lease_id, used=4))
    await one(leasing, LeaseAsk("l3", Subject("t1", "s1"), SMS, requested=5))
    assert isinstance(leasing.store, RedisLeaseStore)
    _, views = await leasing.store.leases(SUBJECT)
    (v,) = views
    assert (v.lease_id, v.holder, v.granted, v.used, v.available) == (a.lease_id, "gw-7", 10, 4, 6)
    assert [(h.limit, h.units) for h in v.holds] == [("burst", 6), ("monthly", 6)]


async def test_lua_sizing_equals_the_python_reference(store: RedisStore) -> None:
    rng = random.Random(16)
    for case in range(40):
        capacity = rng.randint(1, 5000)
        max_units, share = rng.randint(1, 3000), rng.randint(1, 100)
        quota = rng.randint(1, 5000)
        engine = await make_engine(
            store, policy(capacity=capacity, max_units=max_units, share=share, quota=quota)
        )
        await store.client.flushall()
        await store.publish_policy(engine.policy.document, force=True)
        await engine.reload_policy()
        leasing = Leasing(engine, RedisLeaseStore(store))
        rate_left, quota_left = capacity, quota
        for n in range(4):
            requested = rng.randint(1, 4000)
            a = await one(leasing, LeaseAsk(f"p{case}-{n}", SUBJECT, SMS, requested=requested))
            rooms = [
                LimitRoom(rate_left, LeaseTerms(max_units, share, 30_000)),
                LimitRoom(quota_left, LeaseTerms(1_000_000, 100, 60_000)),
            ]
            expected = grant_size(requested, rooms)
            assert a.granted == expected, (case, n, rate_left, quota_left, requested)
            rate_left -= expected
            quota_left -= expected
            # the refill of 1 unit/hour adds nothing within a test
            assert a.limits[0].remaining == rate_left or a.granted == 0


async def test_renewals_while_the_bucket_shrinks(store: RedisStore) -> None:
    """Other consumers take from the bucket and a plan change lowers its capacity while a
    holder renews: every grant is what the sizing rule allows of what is left then, the last
    one says final_units, and nothing is granted beyond the (new) capacity."""
    engine = await make_engine(store, policy(capacity=1000, max_units=200, share=50))
    leasing = Leasing(engine, RedisLeaseStore(store))
    a = await one(leasing, LeaseAsk("k0", SUBJECT, SMS, requested=200))
    assert (a.granted, a.limits[0].remaining) == (200, 800)
    # another consumer admits 300 units
    verdict = await engine.check(Usage("k-admit", SUBJECT, SMS, 300, Mode.ADMIT))
    assert verdict.decision is Decision.ALLOW
    # the plan shrinks: capacity 400 (the level, 500, is clamped to it)
    await store.publish_policy(load_policy_text(policy(capacity=400, max_units=200, share=50)))
    remaining = 400
    held = 200
    grants = []
    lease_id = a.lease_id
    for n in range(1, 20):
        r = await one(
            leasing, LeaseAsk(f"k{n}", SUBJECT, SMS, lease_id=lease_id, used=10, requested=200)
        )
        assert r.policy_version == engine.policy.version  # decided with the new plan
        expected = grant_size(200, [LimitRoom(remaining, LeaseTerms(200, 50, 30_000))])
        assert r.granted == expected, (n, remaining, r)
        assert r.limits[0].capacity == 400
        remaining -= r.granted
        held += r.granted
        grants.append(r.granted)
        assert r.limits[0].remaining == remaining
        if r.final_units:
            assert remaining == 0
            break
    assert grants[:3] == [200, 100, 50] and sum(grants) == 400
    refused = await one(
        leasing, LeaseAsk("k-more", SUBJECT, SMS, lease_id=lease_id, used=0, requested=5)
    )
    assert (refused.decision, refused.granted, refused.reason) == (
        Decision.THROTTLE,
        0,
        Reason.RATE_LIMITED,
    )


async def test_a_quota_period_rolls_over_with_a_lease_open(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis
) -> None:
    """Units taken in one hour and given back in the next land nowhere (that hour's counter
    has reset); units taken in the new hour are given back to it."""
    seconds, micros = raw_redis.time()
    now = int(seconds) * 1000 + int(micros) // 1000
    boundary = (now // 3_600_000 + 1) * 3_600_000
    before_ms = boundary - 3_000 - now  # 3 s before the hour ends
    after_ms = before_ms + 6_000  # 3 s into the next hour
    doc = load_policy_text(
        POLICY.replace("per: month", "per: hour").format(
            capacity=10**6, max_units=10**6, share=100, quota=1000
        )
    )
    stores = [
        RedisStore.from_url(redis_server.url, connect_timeout=1.0, clock_offset_ms=off)
        for off in (before_ms, after_ms)
    ]
    try:
        await stores[0].publish_policy(doc)
        engine = Engine(stores[0], EngineSettings(store_timeout_s=2.0), Telemetry())
        await engine.reload_policy()
        old_hour, new_hour = (Leasing(engine, RedisLeaseStore(s)) for s in stores)
        quota = "cp:{t1}:q:monthly::"

        a = await one(old_hour, LeaseAsk("h1", SUBJECT, SMS, requested=100))
        assert a.granted == 100
        assert raw_redis.hmget(quota, ["p", "u"]) == [str(boundary - 3_600_000), "100"]
        b = await one(old_hour, LeaseAsk("h2", SUBJECT, SMS, requested=100))

        # the next hour: a renewal of lease a takes from the new hour's counter
        r = await one(
            new_hour, LeaseAsk("h3", SUBJECT, SMS, lease_id=a.lease_id, used=30, requested=50)
        )
        assert (r.recorded, r.granted) == (30, 50)
        assert raw_redis.hmget(quota, ["p", "u"]) == [str(boundary), "50"]
        # released: the 50 of the new hour go back to it; the 70 left of the old hour are
        # forfeited with it (the bucket, which has no period, gets all 120 back: `refunded`
        # is the most any one limit got back)
        rel = await one(new_hour, LeaseAsk("h4", SUBJECT, SMS, lease_id=a.lease_id, release=True))
        assert (rel.refunded, rel.closed) == (120, True)
        assert raw_redis.hmget(quota, ["p", "u"]) == [str(boundary), "0"]
        # lease b, all of the old hour, released in the new one: nothing lands anywhere
        rel_b = await one(new_hour, LeaseAsk("h5", SUBJECT, SMS, lease_id=b.lease_id, release=True))
        assert rel_b.refunded == 100  # the bucket's
        assert raw_redis.hmget(quota, ["p", "u"]) == [str(boundary), "0"]
        assert rel_b.limits[1].remaining == 1000
        assert sum(e.amount for e in ledger_entries(raw_redis, "t1")) == 30
    finally:
        for s in stores:
            await s.close()


async def test_each_ask_has_a_span(store: RedisStore) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    await store.publish_policy(load_policy_text(policy()))
    engine = Engine(store, EngineSettings(store_timeout_s=2.0), Telemetry(provider))
    await engine.reload_policy()
    leasing = Leasing(engine, RedisLeaseStore(store))
    a = await one(leasing, LeaseAsk("t-1", SUBJECT, SMS, requested=5))
    await one(leasing, LeaseAsk("t-2", SUBJECT, SMS, lease_id=a.lease_id, used=5, release=True))
    spans = [s for s in exporter.get_finished_spans() if s.name == "chargepath.lease"]
    assert [
        (
            s.attributes["chargepath.lease.kind"],  # type: ignore[index]
            s.attributes["chargepath.decision"],  # type: ignore[index]
            s.attributes["chargepath.tenant"],  # type: ignore[index]
        )
        for s in spans
    ] == [("open", "ALLOW", "t1"), ("release", "ALLOW", "t1")]
    # low cardinality: no request id, lease id or subject part beyond the tenant
    assert all(
        "t-1" not in str(s.attributes) and a.lease_id not in str(s.attributes) for s in spans
    )
    provider.shutdown()


async def test_raw_bytes_on_every_lease_rpc_get_only_the_expected_codes(
    store: RedisStore,
) -> None:
    """LeaseService registered as the gateway registers it (deserializers that never raise),
    on a real Redis: mutated and random bytes on Lease and LeaseStream get OK or
    INVALID_ARGUMENT, never an exception's text."""
    engine = await make_engine(store, policy())
    servicer = LeaseServicer(Leasing(engine, RedisLeaseStore(store)), asyncio.Event())
    server = grpc.aio.server()
    services.add_service(server, servicer, services.LEASE)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    seeds: dict[str, list[Message]] = {
        "Lease": [
            lpb.LeaseRequest(
                ask=lpb.LeaseAsk(
                    request_id="seed-1",
                    subject=pb.Subject(tenant="t1"),
                    metric=SMS,
                    requested=5,
                    holder="fuzz",
                )
            ),
            lpb.LeaseRequest(
                ask=lpb.LeaseAsk(
                    request_id="seed-2",
                    subject=pb.Subject(tenant="t1"),
                    metric=SMS,
                    lease_id="0" * 32,
                    used=3,
                    release=True,
                )
            ),
        ],
        "LeaseStream": [
            lpb.LeaseStreamRequest(
                asks=[
                    lpb.LeaseAsk(
                        request_id="seed-3",
                        subject=pb.Subject(tenant="t1"),
                        metric=SMS,
                        requested=1,
                    )
                ]
            )
        ],
    }
    try:
        fuzz = RawFuzz(f"127.0.0.1:{port}")
        await asyncio.to_thread(fuzz.run, services.LEASE, seeds)  # type: ignore[arg-type]
    finally:
        await server.stop(None)
    print("\n" + fuzz.report())
    assert not fuzz.leaks, fuzz.leaks[:5]
    for rpc, counts in fuzz.codes.items():
        assert set(counts) <= {"OK", "INVALID_ARGUMENT"}, (rpc, counts)
        assert counts["INVALID_ARGUMENT"] > 0 and counts["OK"] > 0, (rpc, counts)
    assert fuzz.total() >= len(services.LEASE.methods) * 500


async def test_open_leases_per_tenant_are_capped(store: RedisStore) -> None:
    engine = await make_engine(store, policy())
    leasing = Leasing(engine, RedisLeaseStore(store, max_open_leases=2))
    a = await one(leasing, LeaseAsk("c1", SUBJECT, SMS, requested=1))
    await one(leasing, LeaseAsk("c2", SUBJECT, SMS, requested=1))
    third = await one(leasing, LeaseAsk("c3", SUBJECT, SMS, requested=1))
    assert (third.decision, third.reason, third.granted, third.lease_id) == (
        Decision.DENY,
        Reason.CAP_REACHED,
        0,
        "",
    )
    assert "2 open leases" in third.message
    # a renewal of an open lease is not a new one
    renewed = await one(leasing, LeaseAsk("c4", SUBJECT, SMS, lease_id=a.lease_id, requested=1))
    assert renewed.granted == 1
    await one(leasing, LeaseAsk("c5", SUBJECT, SMS, lease_id=a.lease_id, release=True))
    assert (await one(leasing, LeaseAsk("c6", SUBJECT, SMS, requested=1))).granted == 1


async def test_a_report_after_the_plan_drops_lease_settings_is_recorded(store: RedisStore) -> None:
    """The holder's use reaches the ledger even once its limits grant no more leases; a new
    grant is refused (NO_ENTITLEMENT, naming the limit)."""
    engine = await make_engine(store, policy())
    leasing = Leasing(engine, RedisLeaseStore(store))
    a = await one(leasing, LeaseAsk("d1", SUBJECT, SMS, requested=10))
    no_leases = POLICY.replace(
        "        lease: {{ max_units: {max_units}, max_share_pct: {share}, validity: 30s }}\n", ""
    ).format(capacity=1000, max_units=1, share=1, quota=10**6)
    await store.publish_policy(load_policy_text(no_leases))
    more = await one(leasing, LeaseAsk("d2", SUBJECT, SMS, lease_id=a.lease_id, requested=5))
    assert (more.decision, more.reason) == (Decision.DENY, Reason.NO_ENTITLEMENT)
    assert "'burst'" in more.message
    rep = await one(
        leasing, LeaseAsk("d3", SUBJECT, SMS, lease_id=a.lease_id, used=4, release=True)
    )
    assert (rep.decision, rep.recorded, rep.refunded, rep.closed) == (Decision.ALLOW, 4, 6, True)
