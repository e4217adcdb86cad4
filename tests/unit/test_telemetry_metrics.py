"""The metrics' shape: latency buckets in seconds, every metric there from the start, and the
cap on per-tenant labels (the busiest tenants keep theirs, the rest are ``other``)."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from chargepath import telemetry
from chargepath.core.model import Decision, Mode, Reason, Subject, Usage, Verdict
from chargepath.telemetry import (
    HISTOGRAMS,
    LATE_REPLY_OUTCOMES,
    LATENCY_BUCKETS_S,
    OTHER_TENANTS,
    PrometheusScrape,
    QuotaLevel,
    Telemetry,
    TenantCap,
    metric_views,
)

ALLOW = Verdict("r", Decision.ALLOW, Reason.OK, "d", 1)
THROTTLE = Verdict("r", Decision.THROTTLE, Reason.RATE_LIMITED, "d", 1)


def usage(tenant: str) -> Usage:
    return Usage("r", Subject(tenant), "api.sms.send", 1, Mode.ADMIT)


def decide(t: Telemetry, tenant: str, n: int, verdict: Verdict = ALLOW) -> None:
    t.count_decisions([usage(tenant)] * n, [verdict] * n, 0.001)


def collect(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Metric name -> its data points."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        m.name: list(m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


def tenant_counts(reader: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    return {
        (p.attributes["tenant"], p.attributes["decision"]): p.value
        for p in collect(reader)["chargepath.tenant.decisions"]
    }


def telemetry_with(reader: InMemoryMetricReader, top: int = 20) -> Telemetry:
    provider = MeterProvider(metric_readers=[reader], views=metric_views())
    return Telemetry(TracerProvider(), provider, tracing=False, top_tenants=top)


# -- latency buckets -----------------------------------------------------------------------


def test_latency_histograms_have_second_buckets_for_a_millisecond_path() -> None:
    reader = InMemoryMetricReader()
    t = telemetry_with(reader)
    t.count_decisions([usage("a")], [ALLOW], 0.0017)
    t.store_latency(0.0004)
    points = collect(reader)
    decision = points["chargepath.decision.duration"]
    store = points["chargepath.store.duration"]
    assert len(decision) == len(store) == 1
    for p in (decision[0], store[0]):
        assert isinstance(p, HistogramDataPoint)
        assert tuple(p.explicit_bounds) == LATENCY_BUCKETS_S
    # 1.7 ms lands in (1 ms, 2.5 ms], not in the first bucket as with the SDK's defaults
    assert decision[0].bucket_counts[LATENCY_BUCKETS_S.index(0.0025)] == 1
    assert store[0].bucket_counts[0] == 1
    assert LATENCY_BUCKETS_S[0] == 0.0005 and LATENCY_BUCKETS_S[-1] == 2.5


def test_the_instruments_advise_the_buckets_to_an_sdk_without_the_views() -> None:
    reader = InMemoryMetricReader()
    t = Telemetry(TracerProvider(), MeterProvider(metric_readers=[reader]), tracing=False)
    t.store_latency(0.003)
    (p,) = collect(reader)["chargepath.store.duration"]
    assert tuple(p.explicit_bounds) == LATENCY_BUCKETS_S


# -- present from the start ----------------------------------------------------------------


def test_every_metric_but_the_histograms_and_the_ledger_lag_is_there_before_any_event() -> None:
    reader = InMemoryMetricReader()
    t = telemetry_with(reader)
    t.labelled_tenants(["cpaas-demo"])  # what the quota job does first
    t.quota = {("cpaas-demo", "sms-monthly"): QuotaLevel(0, 1000, 3600.0)}
    points = collect(reader)
    for name in (
        "chargepath.decisions",
        "chargepath.decisions.degraded",
        "chargepath.tenant.decisions",
        "chargepath.store.errors",
        "chargepath.store.deadline_extended",
        "chargepath.store.late_replies",
        "chargepath.streams.open",
        "chargepath.quota.used",
        "chargepath.quota.limit",
        "chargepath.quota.reset",
    ):
        assert points.get(name), name
    for name in (
        "chargepath.decisions",
        "chargepath.tenant.decisions",
        "chargepath.store.errors",
        "chargepath.store.late_replies",
    ):
        assert {p.value for p in points[name]} == {0}, name
    assert {p.attributes["outcome"] for p in points["chargepath.store.late_replies"]} == set(
        LATE_REPLY_OUTCOMES
    )
    assert tenant_counts(reader) == {
        (tenant, d.name): 0 for tenant in ("cpaas-demo", OTHER_TENANTS) for d in Decision
    }


def test_the_prometheus_endpoint_serves_empty_histograms_that_the_first_record_continues() -> None:
    source = CollectorRegistry(auto_describe=False)
    provider = MeterProvider(
        metric_readers=[PrometheusMetricReader(registry=source)], views=metric_views()
    )
    t = Telemetry(TracerProvider(), provider, tracing=False)
    scrape = PrometheusScrape(source)

    def histogram_samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        prom_names = {name for name, _ in HISTOGRAMS.values()}
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in scrape.collect()
            if f.name in prom_names
            for s in f.samples
        }

    empty = histogram_samples()
    # every bucket, the count and the sum of both histograms, at zero
    assert len(empty) == 2 * (len(LATENCY_BUCKETS_S) + 3)
    assert set(empty.values()) == {0}
    t.count_decisions([usage("a")], [ALLOW], 0.002)
    t.store_latency(0.002)
    recorded = histogram_samples()
    # the same series (names, le and scope labels), now counting the measurement
    assert recorded.keys() == empty.keys()
    assert sum(recorded.values()) > 0
    provider.shutdown()


# -- the tenant cap --------------------------------------------------------------------------


def test_the_busiest_tenants_keep_their_label_and_the_rest_are_other() -> None:
    reader = InMemoryMetricReader()
    t = telemetry_with(reader, top=2)
    decide(t, "big", 50)
    decide(t, "mid", 20, THROTTLE)
    decide(t, "small", 3)
    decide(t, "tiny", 1)
    counts = tenant_counts(reader)
    assert {tenant for tenant, _ in counts} == {"big", "mid", OTHER_TENANTS}
    assert counts[("big", "ALLOW")] == 50
    assert counts[("mid", "THROTTLE")] == 20
    assert counts[(OTHER_TENANTS, "ALLOW")] == 4
    # nothing lost: the labels add up to every decision counted
    assert sum(counts.values()) == 74


def test_a_promoted_tenant_starts_at_zero_and_every_series_stays_monotone() -> None:
    reader = InMemoryMetricReader()
    t = telemetry_with(reader, top=1)
    decide(t, "a", 10)
    decide(t, "b", 5)
    first = tenant_counts(reader)
    assert first[("a", "ALLOW")] == 10 and first[(OTHER_TENANTS, "ALLOW")] == 5
    decide(t, "b", 20)  # b: 25, past a's 10 by more than the margin
    second = tenant_counts(reader)
    assert ("a", "ALLOW") not in second
    # b's own series counts from its promotion; what it did before stays in other, and a's
    # decisions from now on go to other too
    assert second[("b", "ALLOW")] == 0
    assert second[(OTHER_TENANTS, "ALLOW")] == 5 + 20
    decide(t, "a", 2)
    decide(t, "b", 3)
    third = tenant_counts(reader)
    assert third[("b", "ALLOW")] == 3
    assert third[(OTHER_TENANTS, "ALLOW")] == 25 + 2
    for key in third:
        assert third[key] >= second.get(key, 0)


def test_tenants_of_the_same_volume_do_not_trade_places() -> None:
    cap = TenantCap(top=1, margin=0.1)
    assert cap.rank({"a": {"ALLOW": 100}, "b": {"ALLOW": 100}}) == {"a"}
    assert cap.rank({"a": {"ALLOW": 100}, "b": {"ALLOW": 105}}) == {"a"}
    assert cap.rank({"a": {"ALLOW": 100}, "b": {"ALLOW": 111}}) == {"b"}


def test_policy_tenants_are_labelled_before_they_decide_and_the_no_tenant_count_never() -> None:
    cap = TenantCap(top=2)
    assert cap.rank({"": {"DENY": 1000}}, ["t2", "t1", "t3"]) == {"t1", "t2"}
    assert cap.split({"": {"DENY": 1000}}, ["ALLOW", "DENY"]) == {
        ("t1", "ALLOW"): 0,
        ("t1", "DENY"): 0,
        ("t2", "ALLOW"): 0,
        ("t2", "DENY"): 0,
        (OTHER_TENANTS, "ALLOW"): 0,
        (OTHER_TENANTS, "DENY"): 1000,
    }


def test_the_tenants_counted_one_by_one_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "MAX_COUNTED_TENANTS", 3)
    reader = InMemoryMetricReader()
    t = telemetry_with(reader, top=10)
    for i in range(10):
        decide(t, f"t{i}", 1)
    decide(t, "t0", 1)  # a tenant counted before the bound still counts as itself
    counts = tenant_counts(reader)
    assert {tenant for tenant, _ in counts} == {"t0", "t1", "t2", OTHER_TENANTS}
    assert counts[("t0", "ALLOW")] == 2
    assert counts[(OTHER_TENANTS, "ALLOW")] == 7


def test_ledger_lag_and_quota_follow_the_labels() -> None:
    reader = InMemoryMetricReader()
    t = telemetry_with(reader, top=1)
    decide(t, "big", 10)
    decide(t, "small", 1)
    t.ledger_lag = {("big", "billing"): 4, ("small", "billing"): 3, ("small2", "billing"): 2}
    t.quota = {
        ("big", "sms-monthly"): QuotaLevel(40, 100, 60.0),
        ("small", "sms-monthly"): QuotaLevel(1, 100, 60.0),
    }
    points = collect(reader)
    lag = {
        (p.attributes["tenant"], p.attributes["group"]): p.value
        for p in points["chargepath.ledger.lag"]
    }
    assert lag == {("big", "billing"): 4, (OTHER_TENANTS, "billing"): 5}
    used = {
        (p.attributes["tenant"], p.attributes["limit"]): p.value
        for p in points["chargepath.quota.used"]
    }
    limit = {
        (p.attributes["tenant"], p.attributes["limit"]): p.value
        for p in points["chargepath.quota.limit"]
    }
    # a quota is per tenant: only the labelled tenants' are exported, never summed into other
    assert used == {("big", "sms-monthly"): 40}
    assert limit == {("big", "sms-monthly"): 100}
