"""The plan file's ``envoy`` section: validation with lines, descriptor and bucket routing; the
RLS answer built from verdicts (statuses, RateLimit headers); the example Envoy bootstrap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import json_format

from chargepath.core.model import Decision, LimitKind, LimitState, Reason, Scope, Subject, Verdict
from chargepath.core.periods import Period
from chargepath.core.plans import PolicyError, load_policy_text
from chargepath.core.policy import Limit, Policy
from chargepath.policy_files import load_policy_file
from chargepath.transport.envoy import (
    OK,
    OVER_LIMIT,
    DescriptorOutcome,
    QuotaAnswer,
    bucket_action,
    code_of,
    descriptor_status,
    response_headers,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

POLICY = """\
metrics:
  - name: api.sms.send
  - name: api.calls
plans:
  - name: edge
    limits:
      - name: sms-per-key
        metric: api.sms.send
        scope: key
        rate: { capacity: 10, refill: 10, per: hour }
tenants:
  - name: acme
    plan: edge
envoy:
  - domain: edge
    descriptors:
      - key: tenant
        subject: tenant
        descriptors:
          - key: api_key
            subject: key
            descriptors:
              - { key: route, value: sms, metric: api.sms.send }
              - { key: route, metric: api.calls }
          - { key: route, value: sms, metric: api.sms.send, shadow_mode: true }
  - domain: own
    tenant: acme
    strict: true
    descriptors:
      - key: slice
        subject: slice
        metric: api.calls
"""


def policy() -> Policy:
    return Policy(load_policy_text(POLICY), 3)


def test_descriptors_route_to_subjects_and_metrics() -> None:
    p = policy()
    r = p.route_descriptor("edge", [("tenant", "acme"), ("api_key", "k1"), ("route", "sms")])
    assert r.matched and (r.subject, r.metric, r.shadow) == (
        Subject("acme", "", "k1"),
        "api.sms.send",
        False,
    )
    # a node without a value matches any value, after the exact ones
    r = p.route_descriptor("edge", [("tenant", "acme"), ("api_key", "k1"), ("route", "x")])
    assert r.matched and r.metric == "api.calls"
    r = p.route_descriptor("edge", [("tenant", "acme"), ("route", "sms")])
    assert r.matched and r.shadow and r.subject == Subject("acme")
    # the domain's fixed tenant, an entry as the slice
    r = p.route_descriptor("own", [("slice", "s-1")])
    assert r.matched and r.subject == Subject("acme", "s-1", "") and r.strict


@pytest.mark.parametrize(
    ("domain", "entries", "strict"),
    [
        ("edge", [("tenant", "acme")], False),  # ends on a node without a metric
        ("edge", [("tenant", "acme"), ("route", "other")], False),
        ("edge", [("api_key", "k1")], False),
        ("edge", [("tenant", "acme"), ("api_key", "k"), ("route", "sms"), ("x", "y")], False),
        ("edge", [], False),
        ("nowhere", [("tenant", "acme")], False),
        ("own", [("route", "sms")], True),
    ],
)
def test_unknown_descriptors(domain: str, entries: list[tuple[str, str]], strict: bool) -> None:
    r = policy().route_descriptor(domain, entries)
    assert not r.matched and r.strict is strict


def test_buckets_route_whatever_the_order_of_their_entries() -> None:
    p = policy()
    r = p.route_bucket("edge", {"route": "sms", "api_key": "k1", "tenant": "acme"})
    assert r.matched and r.subject == Subject("acme", "", "k1") and r.metric == "api.sms.send"
    r = p.route_bucket("edge", {"route": "sms", "tenant": "acme"})
    assert r.matched and r.shadow
    assert not p.route_bucket("edge", {"route": "sms", "tenant": "acme", "x": "1"}).matched
    assert p.route_bucket("own", {"x": "1"}) == (False, Subject(""), "", False, True)


def test_a_document_without_envoy_serialises_as_before() -> None:
    doc = load_policy_text("metrics: [{name: api.sms.send}]")
    assert "envoy" not in doc.canonical_json()
    assert '"envoy":[{' in load_policy_text(POLICY).canonical_json()
    assert load_policy_text(POLICY).canonical_json() == load_policy_text(POLICY).canonical_json()


@pytest.mark.parametrize(
    ("snippet", "line", "path", "message"),
    [
        (
            "      - {key: route, metric: api.nope}",
            7,
            "envoy.0.descriptors.0.metric",
            "unknown metric 'api.nope'",
        ),
        ("      - {key: route}", 7, "envoy.0.descriptors.0", "needs a 'metric' or nested"),
        ("      - {key: route, metric: api.calls, subject: user}", 7, "", "'tenant', 'slice'"),
        (
            "      - {key: tenant, subject: tenant, descriptors: [{key: t, subject: tenant, "
            "metric: api.calls}]}",
            6,
            "envoy.0.descriptors.0.descriptors.0.subject",
            "the tenant is already given above",
        ),
        (
            "      - {key: a, metric: api.calls}\n      - {key: a, metric: api.calls}",
            8,
            "envoy.0.descriptors.1",
            "duplicate descriptor (key, value) name 'a=*'",
        ),
    ],
)
def test_mapping_errors_name_their_line_and_field(
    snippet: str, line: int, path: str, message: str
) -> None:
    text = (
        "metrics: [{name: api.calls}]\n"
        "tenants: [{name: acme}]\n"
        "envoy:\n"
        "  - domain: d\n"
        "    descriptors:\n"
        f"{snippet}\n"
    )
    if "subject: tenant" not in snippet:
        text = text.replace("  - domain: d\n", "  - domain: d\n    tenant: acme\n")
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, source="plans.yaml")
    (issue,) = e.value.issues
    assert issue.line == line, issue
    assert issue.path is not None and issue.path.startswith(path), issue
    assert message in issue.message, issue


def test_a_descriptor_with_a_metric_needs_a_tenant() -> None:
    text = "metrics: [{name: api.calls}]\nenvoy:\n  - domain: d\n    descriptors:\n" + (
        "      - {key: route, metric: api.calls}\n"
    )
    with pytest.raises(PolicyError) as e:
        load_policy_text(text, source="p.yaml")
    assert str(e.value.issues[0]).startswith("p.yaml:5: envoy.0.descriptors.0: no tenant")


def test_duplicate_domains_are_refused() -> None:
    text = "envoy:\n  - {domain: d, tenant: a}\n  - {domain: d, tenant: b}\n"
    with pytest.raises(PolicyError, match="duplicate envoy domain name 'd'"):
        load_policy_text(text)


def test_the_demo_policy_maps_the_example_envoy_config() -> None:
    p = Policy(load_policy_file(ROOT / "examples" / "plans.yaml"), 1)
    r = p.route_descriptor(
        "cpaas-edge", [("tenant", "cpaas-demo"), ("api_key", "key-1"), ("route", "sms-send")]
    )
    assert r.matched and r.subject == Subject("cpaas-demo", "", "key-1")
    assert r.metric == "api.sms.send"
    r = p.route_descriptor("cpaas-edge", [("tenant", "cpaas-demo"), ("route", "voice-call")])
    assert r.matched and r.metric == "api.voice.minutes"


def _example_bootstrap() -> bootstrap_pb2.Bootstrap:
    # the typed_config messages of the example must be in the descriptor pool to be parsed
    from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2  # noqa: F401
    from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
    from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
        http_connection_manager_pb2,
    )
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401

    data = yaml.safe_load((ROOT / "examples" / "envoy" / "envoy.yaml").read_text())
    return json_format.ParseDict(data, bootstrap_pb2.Bootstrap())


def test_the_example_envoy_config_is_a_valid_bootstrap() -> None:
    from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2,
    )

    boot = _example_bootstrap()
    (listener,) = boot.static_resources.listeners
    hcm = http_connection_manager_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    rl = rate_limit_pb2.RateLimit()
    assert hcm.http_filters[0].typed_config.Unpack(rl)
    assert rl.domain == "cpaas-edge" and rl.failure_mode_deny
    assert rl.rate_limit_service.grpc_service.envoy_grpc.cluster_name == "chargepath"
    assert {c.name for c in boot.static_resources.clusters} >= {"chargepath"}
    keys = [
        a.request_headers.descriptor_key or a.metadata.descriptor_key
        for a in hcm.route_config.virtual_hosts[0].rate_limits[0].actions
    ]
    assert keys == ["tenant", "api_key", "route"]
    routes = {
        r.metadata.filter_metadata["chargepath"]["route"]
        for r in hcm.route_config.virtual_hosts[0].routes
    }
    # every route value the example sends is mapped by the demo policy
    p = Policy(load_policy_file(ROOT / "examples" / "plans.yaml"), 1)
    for route in routes:
        assert p.route_descriptor("cpaas-edge", [("tenant", "t"), ("route", route)]).matched


def test_an_unknown_field_in_the_example_would_fail() -> None:
    data: Any = yaml.safe_load((ROOT / "examples" / "envoy" / "envoy.yaml").read_text())
    data["static_resources"]["clusters"][0]["conect_timeout"] = "1s"
    with pytest.raises(json_format.ParseError, match="conect_timeout"):
        json_format.ParseDict(data, bootstrap_pb2.Bootstrap())


# -- the RLS answer -------------------------------------------------------------------------

PER_KEY = Limit("sms-per-key", LimitKind.RATE, Scope.KEY, False, capacity=10, refill=10, per="hour")
DAILY = Limit("sms-daily", LimitKind.QUOTA, Scope.TENANT, False, amount=1000, per="day")
MONTHLY = Limit("sms-monthly", LimitKind.QUOTA, Scope.TENANT, False, amount=5000, per="month")
SPECS = {lim.name: lim for lim in (PER_KEY, DAILY, MONTHLY)}


def verdict(decision: Decision, reason: Reason, *limits: LimitState, retry_ms: int = 0) -> Verdict:
    return Verdict("r", decision, reason, "d", 1, retry_ms, limits, recorded=True)


def state(
    name: str, remaining: int, capacity: int, reset_ms: int, *, exceeded: bool = False
) -> LimitState:
    kind = LimitKind.RATE if name == "sms-per-key" else LimitKind.QUOTA
    return LimitState(name, kind, Scope.KEY, remaining, capacity, reset_ms, False, exceeded)


def test_an_allow_reports_its_tightest_limit_and_the_headers() -> None:
    v = verdict(
        Decision.ALLOW,
        Reason.OK,
        state("sms-per-key", 7, 10, 1_080_000),
        state("sms-daily", 997, 1000, 3_600_500),
        state("sms-monthly", 4997, 5000, 9_000_000),
    )
    o = DescriptorOutcome(code_of(v, False), v, SPECS)
    assert o.code == OK
    status = rls_pb2.RateLimitResponse.DescriptorStatus(**descriptor_status(o))
    assert status.code == OK
    assert status.current_limit.name == "sms-per-key"
    assert status.current_limit.requests_per_unit == 10
    assert status.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.HOUR
    assert status.limit_remaining == 7
    assert status.duration_until_reset.seconds == 1080
    assert dict(response_headers([o])) == {
        "RateLimit-Policy": '"sms-per-key";q=10;w=3600, "sms-daily";q=1000;w=86400, '
        '"sms-monthly";q=5000',
        "RateLimit": '"sms-per-key";r=7;t=1080, "sms-daily";r=997;t=3601, '
        '"sms-monthly";r=4997;t=9000',
    }


def test_a_throttle_is_over_limit_with_retry_after() -> None:
    v = verdict(
        Decision.THROTTLE,
        Reason.RATE_LIMITED,
        state("sms-per-key", 0, 10, 3_600_000, exceeded=True),
        state("sms-daily", 990, 1000, 100_000),
        retry_ms=359_001,
    )
    o = DescriptorOutcome(code_of(v, False), v, SPECS)
    status = rls_pb2.RateLimitResponse.DescriptorStatus(**descriptor_status(o))
    assert (status.code, status.current_limit.name, status.limit_remaining) == (
        OVER_LIMIT,
        "sms-per-key",
        0,
    )
    headers = dict(response_headers([o]))
    assert headers["retry-after"] == "360"
    assert headers["RateLimit"].startswith('"sms-per-key";r=0;t=3600')
    # in shadow mode the same verdict is OK, with the headers and no retry-after
    shadow = DescriptorOutcome(code_of(v, True), v, SPECS)
    assert shadow.code == OK
    assert "retry-after" not in dict(response_headers([shadow]))
    assert "RateLimit" in dict(response_headers([shadow]))


def test_a_soft_limit_crossed_is_ok() -> None:
    v = verdict(Decision.ALLOW, Reason.SOFT_LIMIT_EXCEEDED, state("sms-daily", 0, 1000, 5000))
    assert code_of(v, False) == OK


def test_several_descriptors_list_a_shared_limit_once_with_the_least_left() -> None:
    a = verdict(Decision.ALLOW, Reason.OK, state("sms-daily", 10, 1000, 5000))
    b = verdict(Decision.ALLOW, Reason.OK, state("sms-daily", 9, 1000, 5000))
    headers = dict(response_headers([DescriptorOutcome(OK, a, SPECS), DescriptorOutcome(OK, b)]))
    assert headers["RateLimit"] == '"sms-daily";r=9;t=5'


def test_store_down_fail_closed_is_over_limit_retry_after_a_second() -> None:
    v = Verdict("r", Decision.DENY, Reason.STORE_UNAVAILABLE, "d", 1, degraded=True)
    o = DescriptorOutcome(code_of(v, False), v)
    assert o.code == OVER_LIMIT
    assert descriptor_status(o) == {"code": OVER_LIMIT}
    assert response_headers([o]) == [("retry-after", "1")]


def test_unknown_and_refused_descriptors_have_a_code_only() -> None:
    assert descriptor_status(DescriptorOutcome(OK)) == {"code": OK}
    assert response_headers([DescriptorOutcome(OK), DescriptorOutcome(OVER_LIMIT)]) == []


def test_counts_beyond_uint32_are_clamped() -> None:
    big = Limit("bytes", LimitKind.QUOTA, Scope.TENANT, False, amount=10**13, per="month")
    v = verdict(Decision.ALLOW, Reason.OK, state("bytes", 10**13 - 1, 10**13, 1000))
    s = descriptor_status(DescriptorOutcome(OK, v, {"bytes": big}))
    assert s["limit_remaining"] == 2**32 - 1
    assert s["current_limit"] == {
        "name": "bytes",
        "requests_per_unit": 2**32 - 1,
        "unit": rls_pb2.RateLimitResponse.RateLimit.MONTH,
    }


def test_bucket_actions() -> None:
    from envoy.service.rate_limit_quota.v3 import rlqs_pb2
    from envoy.type.v3 import ratelimit_strategy_pb2 as strategy

    bucket = {"tenant": "acme", "route": "sms"}
    a = rlqs_pb2.RateLimitQuotaResponse.BucketAction(
        **bucket_action(bucket, QuotaAnswer(5, 2000, 4000))
    )
    assert dict(a.bucket_id.bucket) == bucket
    q = a.quota_assignment_action
    assert q.assignment_time_to_live.seconds == 4
    tb = q.rate_limit_strategy.token_bucket
    assert (tb.max_tokens, tb.tokens_per_fill.value, tb.fill_interval.seconds) == (5, 5, 2)
    deny = rlqs_pb2.RateLimitQuotaResponse.BucketAction(
        **bucket_action(bucket, QuotaAnswer(0, 1000, 1500))
    )
    rule = deny.quota_assignment_action.rate_limit_strategy.blanket_rule
    assert rule == strategy.RateLimitStrategy.DENY_ALL
    assert deny.quota_assignment_action.assignment_time_to_live.nanos == 500_000_000
    allow = rlqs_pb2.RateLimitQuotaResponse.BucketAction(
        **bucket_action(bucket, QuotaAnswer(None, 1000, 2000))
    )
    rule = allow.quota_assignment_action.rate_limit_strategy.blanket_rule
    assert rule == strategy.RateLimitStrategy.ALLOW_ALL


def test_the_example_rlqs_config_is_a_valid_bootstrap_whose_buckets_are_mapped() -> None:
    from envoy.extensions.filters.http.rate_limit_quota.v3 import rate_limit_quota_pb2 as rlq
    from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2,
    )
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
    from envoy.type.matcher.v3 import http_inputs_pb2

    data = yaml.safe_load((ROOT / "examples" / "envoy" / "envoy-rlqs.yaml").read_text())
    boot = json_format.ParseDict(data, bootstrap_pb2.Bootstrap())
    hcm = http_connection_manager_pb2.HttpConnectionManager()
    assert boot.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    config = rlq.RateLimitQuotaFilterConfig()
    assert hcm.http_filters[0].typed_config.Unpack(config)
    assert config.domain == "cpaas-edge"
    assert config.rlqs_server.envoy_grpc.cluster_name == "chargepath"
    settings = rlq.RateLimitQuotaBucketSettings()
    assert config.bucket_matchers.on_no_match.action.typed_config.Unpack(settings)
    bucket = {}
    for key, value in settings.bucket_id_builder.bucket_id_builder.items():
        if value.HasField("string_value"):
            bucket[key] = value.string_value
        else:
            header = http_inputs_pb2.HttpRequestHeaderMatchInput()
            assert value.custom_value.typed_config.Unpack(header)
            bucket[key] = {"x-chargepath-tenant": "cpaas-demo", "x-api-key": "key-1"}[
                header.header_name
            ]
    p = Policy(load_policy_file(ROOT / "examples" / "plans.yaml"), 1)
    r = p.route_bucket(config.domain, bucket)
    assert r.matched and r.subject == Subject("cpaas-demo", "", "key-1")
    assert r.metric == "api.sms.send"


def test_a_weekly_quota_is_reported_in_weeks_with_its_window() -> None:
    weekly = Limit(
        "sms-weekly",
        LimitKind.QUOTA,
        Scope.TENANT,
        False,
        amount=700,
        period=Period.WEEK,
        per="week",
    )
    v = verdict(Decision.ALLOW, Reason.OK, state("sms-weekly", 3, 700, 86_400_000))
    o = DescriptorOutcome(OK, v, {"sms-weekly": weekly})
    status = rls_pb2.RateLimitResponse.DescriptorStatus(**descriptor_status(o))
    assert status.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.WEEK
    assert status.current_limit.requests_per_unit == 700
    assert dict(response_headers([o]))["RateLimit-Policy"] == '"sms-weekly";q=700;w=604800'
