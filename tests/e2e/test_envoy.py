"""Envoy's rate limit service (RLS v3) and quota service (RLQS v3) on a live gateway, driven by
xds-protos clients with requests shaped like Envoy's; the counters and the ledger checked in
the gateway's Redis. Envoy calls as an Envoy shared by tenants does, with the operator key in its
``initial_metadata``; one test gives it a meter key of one tenant instead."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as rl
from envoy.service.rate_limit_quota.v3 import rlqs_pb2, rlqs_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy.type.v3 import ratelimit_strategy_pb2

from chargepath_protos.v1 import keys_pb2 as kpb
from chargepath_protos.v1 import keys_pb2_grpc as kpb_grpc
from tests.conftest import ledger_entries
from tests.e2e.conftest import GatewayProcess, start_gateway

pytestmark = pytest.mark.e2e

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
HOUR = rls_pb2.RateLimitResponse.RateLimit.HOUR
ALLOW_ALL = ratelimit_strategy_pb2.RateLimitStrategy.ALLOW_ALL
DENY_ALL = ratelimit_strategy_pb2.RateLimitStrategy.DENY_ALL

POLICY = """\
metrics:
  - {name: api.sms.send, unit: message}
  - {name: api.calls, unit: call}
plans:
  - name: edge
    limits:
      - {name: sms-per-key, metric: api.sms.send, scope: key,
         rate: {capacity: 10, refill: 10, per: hour}}
      - {name: sms-daily, metric: api.sms.send, scope: tenant, quota: {amount: 1000, per: day}}
      - {name: calls-soft, metric: api.calls, scope: tenant, soft: true,
         rate: {capacity: 3, refill: 3, per: hour}}
tenants:
  - {name: acme, plan: edge, failure_policy: {mode: deny}}
  - {name: open-co, plan: edge, failure_policy: {mode: allow}}
envoy:
  - domain: edge
    descriptors:
      - key: tenant
        subject: tenant
        descriptors:
          - key: api_key
            subject: key
            descriptors:
              - {key: route, value: sms, metric: api.sms.send}
          - {key: route, value: calls, metric: api.calls}
          - {key: route, value: sms-shadow, metric: api.sms.send, shadow_mode: true}
  - domain: strict-edge
    tenant: acme
    strict: true
    descriptors:
      - {key: route, value: calls, metric: api.calls}
"""


@pytest.fixture(scope="module")
def envoy_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("envoy")
    plans = workdir / "plans.yaml"
    plans.write_text(POLICY)
    gw = start_gateway(workdir, plans=plans)
    yield gw
    code = gw.stop()
    if gw.redis is not None:
        gw.redis.stop()
    assert code == 0, gw.log()


@pytest.fixture
def rls(envoy_gateway: GatewayProcess) -> Iterator[rls_pb2_grpc.RateLimitServiceStub]:
    with envoy_gateway.channel() as ch:
        yield rls_pb2_grpc.RateLimitServiceStub(ch)


@pytest.fixture
def db(envoy_gateway: GatewayProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(envoy_gateway.redis_url, decode_responses=True)
    yield client
    client.close()


def descriptor(*entries: tuple[str, str], hits: int | None = None) -> rl.RateLimitDescriptor:
    d = rl.RateLimitDescriptor(
        entries=[rl.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if hits is not None:
        d.hits_addend.value = hits
    return d


def ask(
    stub: rls_pb2_grpc.RateLimitServiceStub,
    *descriptors: rl.RateLimitDescriptor,
    domain: str = "edge",
    hits: int = 0,
) -> tuple[rls_pb2.RateLimitResponse, dict[str, str]]:
    """What Envoy's rate limit filter sends: a domain, descriptors and a hits_addend."""
    resp = stub.ShouldRateLimit(
        rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits),
        timeout=5,
    )
    return resp, {h.key: h.value for h in resp.response_headers_to_add}


def sms(key: str, tenant: str = "acme", hits: int | None = None) -> rl.RateLimitDescriptor:
    return descriptor(("tenant", tenant), ("api_key", key), ("route", "sms"), hits=hits)


def test_several_descriptors_and_hits_addend(
    rls: rls_pb2_grpc.RateLimitServiceStub, db: redis.Redis
) -> None:
    before = len(ledger_entries(db, "acme"))
    resp, headers = ask(
        rls,
        sms("k1"),  # the request's hits_addend: 3
        descriptor(("tenant", "acme"), ("route", "calls"), hits=1),  # its own
        descriptor(("user", "u1")),  # unknown: OK, counted nowhere
        hits=3,
    )
    assert resp.overall_code == OK
    per_key, calls, unknown = resp.statuses
    assert per_key.code == OK
    assert per_key.current_limit.name == "sms-per-key"
    assert (per_key.current_limit.requests_per_unit, per_key.current_limit.unit) == (10, HOUR)
    assert per_key.limit_remaining == 7
    # 3 units of a bucket refilling 10 an hour: full again in 18 minutes
    assert per_key.duration_until_reset.seconds in (1079, 1080)
    assert (calls.code, calls.current_limit.name, calls.limit_remaining) == (OK, "calls-soft", 2)
    assert unknown == rls_pb2.RateLimitResponse.DescriptorStatus(code=OK)
    assert headers["RateLimit-Policy"] == (
        '"sms-per-key";q=10;w=3600, "sms-daily";q=1000;w=86400, "calls-soft";q=3;w=3600'
    )
    assert headers["RateLimit"].startswith('"sms-per-key";r=7;t=108')
    assert '"sms-daily";r=997;' in headers["RateLimit"]
    assert "retry-after" not in headers
    # the same ledger entries as Checks: one per admitted descriptor, with its amount
    new = ledger_entries(db, "acme")[before:]
    assert sorted((e.metric, e.key, e.amount, e.mode) for e in new) == [
        ("api.calls", "", 1, "admit"),
        ("api.sms.send", "k1", 3, "admit"),
    ]


def test_over_limit_once_the_capacity_is_spent(
    rls: rls_pb2_grpc.RateLimitServiceStub, db: redis.Redis
) -> None:
    resp, _ = ask(rls, sms("k2", hits=10))
    assert resp.overall_code == OK and resp.statuses[0].limit_remaining == 0
    before = len(ledger_entries(db, "acme"))
    resp, headers = ask(rls, sms("k2"), descriptor(("tenant", "acme"), ("route", "calls")))
    assert resp.overall_code == OVER_LIMIT
    spent, other = resp.statuses
    assert spent.code == OVER_LIMIT
    assert (spent.current_limit.name, spent.limit_remaining) == ("sms-per-key", 0)
    assert spent.duration_until_reset.seconds in (3599, 3600)  # empty: an hour to full
    assert other.code == OK  # the other descriptor is its own admit
    # one unit refills in 6 minutes
    assert headers["retry-after"] == "360"
    assert '"sms-per-key";r=0;t=3600' in headers["RateLimit"]
    # a refused admit takes and records nothing
    new = ledger_entries(db, "acme")[before:]
    assert [(e.metric, e.amount) for e in new] == [("api.calls", 1)]


def test_soft_limits_and_shadow_mode_answer_ok_with_headers(
    envoy_gateway: GatewayProcess, db: redis.Redis
) -> None:
    with envoy_gateway.channel() as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        # calls-soft (capacity 3) is soft: crossing it is OK, flagged in the headers (r=0)
        for _ in range(4):
            resp, headers = ask(stub, descriptor(("tenant", "open-co"), ("route", "calls")))
            assert resp.overall_code == OK
        # crossing a soft limit takes the units all the same: 4 of 3, full in 80 minutes
        assert headers["RateLimit"] == '"calls-soft";r=0;t=4800'
        assert "retry-after" not in headers
        # shadow mode: 2000 units can never fit the daily 1000 (DENY), answered OK, nothing taken
        before = len(ledger_entries(db, "open-co"))
        shadow = descriptor(("tenant", "open-co"), ("route", "sms-shadow"), hits=2000)
        resp, headers = ask(stub, shadow)
        assert resp.overall_code == OK and resp.statuses[0].code == OK
        assert resp.statuses[0].current_limit.name == "sms-daily"
        assert '"sms-daily";r=1000;' in headers["RateLimit"]
        assert "retry-after" not in headers
        assert len(ledger_entries(db, "open-co")) == before
        # within the limit, a shadow descriptor is counted as usual
        resp, headers = ask(stub, descriptor(("tenant", "open-co"), ("route", "sms-shadow")))
        assert resp.overall_code == OK and '"sms-daily";r=999;' in headers["RateLimit"]
        assert len(ledger_entries(db, "open-co")) == before + 1


def test_unknown_descriptors_count_nothing_unless_strict(
    rls: rls_pb2_grpc.RateLimitServiceStub, db: redis.Redis
) -> None:
    before = {t: len(ledger_entries(db, t)) for t in ("acme", "open-co")}
    for domain, descriptors in [
        ("edge", [descriptor(("tenant", "acme"), ("route", "nope"))]),
        ("edge", [descriptor(("tenant", "acme"))]),
        ("edge", [descriptor(("remote_address", "10.0.0.1"))]),
        ("not-mapped", [sms("k1")]),
    ]:
        resp, headers = ask(rls, *descriptors, domain=domain)
        assert resp.overall_code == OK and [s.code for s in resp.statuses] == [OK]
        assert headers == {}
    resp, _ = ask(rls, descriptor(("route", "sms")), domain="strict-edge")
    assert resp.overall_code == OVER_LIMIT and resp.statuses[0].code == OVER_LIMIT
    # a known one of the strict domain is decided as usual
    resp, _ = ask(rls, descriptor(("route", "calls")), domain="strict-edge")
    assert resp.statuses[0].current_limit.name == "calls-soft"
    assert len(ledger_entries(db, "acme")) == before["acme"] + 1
    assert len(ledger_entries(db, "open-co")) == before["open-co"]


def test_bad_values_and_unknown_tenants_are_over_limit(
    rls: rls_pb2_grpc.RateLimitServiceStub,
) -> None:
    # a header value that is no valid key, a tenant that has no entitlement: never let through
    resp, _ = ask(rls, sms("not a key!"), sms("k1", tenant="nobody"), sms("k9", hits=1))
    assert resp.overall_code == OVER_LIMIT
    assert [s.code for s in resp.statuses] == [OVER_LIMIT, OVER_LIMIT, OK]


def test_fail_closed_tenants_are_over_limit_while_redis_is_down(tmp_path: Path) -> None:
    plans = tmp_path / "plans.yaml"
    plans.write_text(POLICY)
    gw = start_gateway(tmp_path, plans=plans)
    assert gw.redis is not None
    try:
        with gw.channel() as ch:
            stub = rls_pb2_grpc.RateLimitServiceStub(ch)
            assert ask(stub, sms("k1"))[0].overall_code == OK
            gw.redis.kill()
            for _ in range(5):
                started = time.perf_counter()
                resp, headers = ask(stub, sms("k1"), sms("k1", tenant="open-co"))
                assert time.perf_counter() - started < 1.0  # the store timeout, not Envoy's
                closed, open_ = resp.statuses
                # deny (fail closed): OVER_LIMIT, so Envoy refuses whatever its
                # failure_mode_deny; allow (fail open): OK within the local allowance
                assert resp.overall_code == OVER_LIMIT
                assert closed == rls_pb2.RateLimitResponse.DescriptorStatus(code=OVER_LIMIT)
                assert open_.code == OK
                assert headers["retry-after"] == "1"
    finally:
        assert gw.stop() == 0
        gw.redis.stop()


class QuotaStream:
    """An RLQS stream as Envoy's rate_limit_quota filter holds it: reports go in when sent,
    each answered by one response."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.outbox: queue.Queue[rlqs_pb2.RateLimitQuotaUsageReports | None] = queue.Queue()
        stub = rlqs_pb2_grpc.RateLimitQuotaServiceStub(self.channel)
        self.responses = stub.StreamRateLimitQuotas(iter(self.outbox.get, None), timeout=30)

    def report(
        self, domain: str, *usages: tuple[dict[str, str], int, int, float]
    ) -> list[rlqs_pb2.RateLimitQuotaResponse.BucketAction]:
        msg = rlqs_pb2.RateLimitQuotaUsageReports(domain=domain)
        for bucket, allowed, denied, elapsed_s in usages:
            u = msg.bucket_quota_usages.add(
                num_requests_allowed=allowed, num_requests_denied=denied
            )
            u.bucket_id.bucket.update(bucket)
            u.time_elapsed.FromMilliseconds(int(elapsed_s * 1000))
        self.outbox.put(msg)
        return list(next(self.responses).bucket_action)

    def close(self) -> None:
        self.outbox.put(None)
        for _ in self.responses:
            pass
        self.channel.close()


def test_rlqs_reports_in_assignments_out(envoy_gateway: GatewayProcess, db: redis.Redis) -> None:
    stream = QuotaStream(envoy_gateway.channel())
    bucket = {"tenant": "acme", "api_key": "k3", "route": "sms"}
    before = len(ledger_entries(db, "acme"))
    try:
        # the first request of a new bucket: Envoy reports it at once, with nothing elapsed
        (action,) = stream.report("edge", (bucket, 1, 0, 0))
        assert dict(action.bucket_id.bucket) == bucket
        q = action.quota_assignment_action
        tb = q.rate_limit_strategy.token_bucket
        # the request already allowed is recorded (a report), one more unit is admitted ahead
        assert (tb.max_tokens, tb.tokens_per_fill.value, tb.fill_interval.seconds) == (1, 1, 1)
        assert q.assignment_time_to_live.seconds == 2  # two reporting intervals
        # a second later: 5 allowed, 1 of them prepaid, so 4 recorded; of the demand (5) the
        # key's bucket (10) has 4 left: those are admitted instead
        (action,) = stream.report("edge", (bucket, 5, 0, 1.0))
        tb = action.quota_assignment_action.rate_limit_strategy.token_bucket
        assert (tb.max_tokens, tb.tokens_per_fill.value) == (4, 4)
        # 5 allowed (4 prepaid, 1 recorded: the bucket is in debt), 5 denied: nothing fits
        (action, unknown) = stream.report(
            "", (bucket, 5, 5, 1.0), ({"tenant": "acme", "other": "x"}, 3, 0, 1.0)
        )
        q = action.quota_assignment_action
        assert q.rate_limit_strategy.blanket_rule == DENY_ALL
        assert q.assignment_time_to_live.seconds == 60  # until retry_after, at most a minute
        assert not q.rate_limit_strategy.HasField("token_bucket")
        # an unmapped bucket: let through, counted nowhere (the domain is not strict)
        rule = unknown.quota_assignment_action.rate_limit_strategy.blanket_rule
        assert rule == ALLOW_ALL
    finally:
        stream.close()
    # the ledger: every request Envoy allowed is in it once, as a report or ahead as an admit
    # (11 = 1 + 5 + 5), and the key's bucket of 10 is one unit in debt
    new = [e for e in ledger_entries(db, "acme")[before:] if e.key == "k3"]
    assert [(e.mode, e.amount) for e in new] == [
        ("report", 1),
        ("admit", 1),
        ("report", 4),
        ("admit", 4),
        ("report", 1),
    ]


def test_rlqs_stream_for_a_fail_closed_tenant_while_redis_is_down(tmp_path: Path) -> None:
    plans = tmp_path / "plans.yaml"
    plans.write_text(POLICY)
    gw = start_gateway(tmp_path, plans=plans)
    assert gw.redis is not None
    stream = QuotaStream(gw.channel())
    try:
        (ok,) = stream.report("edge", ({"tenant": "acme", "route": "calls"}, 0, 0, 0))
        assert ok.quota_assignment_action.rate_limit_strategy.token_bucket.max_tokens == 1
        gw.redis.kill()
        closed, open_ = stream.report(
            "",
            ({"tenant": "acme", "route": "calls"}, 1, 0, 1.0),
            ({"tenant": "open-co", "route": "calls"}, 1, 0, 1.0),
        )
        rule = closed.quota_assignment_action.rate_limit_strategy.blanket_rule
        assert rule == DENY_ALL
        assert open_.quota_assignment_action.rate_limit_strategy.token_bucket.max_tokens >= 1
    finally:
        try:
            stream.close()
        finally:  # the gateway stops even if the stream ended in an error
            assert gw.stop() == 0
            gw.redis.stop()


def test_too_many_descriptors_are_invalid(rls: rls_pb2_grpc.RateLimitServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as e:
        ask(rls, *[sms("k1")] * 65)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "descriptors: at most 64" in e.value.details()  # type: ignore[attr-defined]


def test_an_envoy_of_one_tenant_counts_only_that_tenant(
    envoy_gateway: GatewayProcess, db: redis.Redis
) -> None:
    """With a meter key of acme, acme's descriptors and buckets are decided as usual; another
    tenant's are refused (OVER_LIMIT, DENY_ALL) and count nothing."""
    with envoy_gateway.channel() as ch:
        created = kpb_grpc.KeyServiceStub(ch).CreateKey(
            kpb.CreateKeyRequest(tenant="acme", role=kpb.ROLE_METER, description="envoy"),
            timeout=5,
        )
    before = {t: len(ledger_entries(db, t)) for t in ("acme", "open-co")}
    with envoy_gateway.channel(created.secret_key) as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        resp, _ = ask(stub, sms("k4"), sms("k4", tenant="open-co"))
    assert resp.overall_code == OVER_LIMIT
    assert [s.code for s in resp.statuses] == [OK, OVER_LIMIT]
    assert resp.statuses[1] == rls_pb2.RateLimitResponse.DescriptorStatus(code=OVER_LIMIT)
    stream = QuotaStream(envoy_gateway.channel(created.secret_key))
    try:
        mine, theirs = stream.report(
            "edge",
            ({"tenant": "acme", "route": "calls"}, 1, 0, 0),
            ({"tenant": "open-co", "route": "calls"}, 1, 0, 0),
        )
    finally:
        stream.close()
    assert mine.quota_assignment_action.rate_limit_strategy.token_bucket.max_tokens >= 1
    assert theirs.quota_assignment_action.rate_limit_strategy.blanket_rule == DENY_ALL
    # acme: the admitted sms unit, then the calls report and one call admitted ahead
    assert len(ledger_entries(db, "acme")) == before["acme"] + 3
    assert len(ledger_entries(db, "open-co")) == before["open-co"]
