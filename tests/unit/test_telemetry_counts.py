"""The decision counters: counted in the process, read by the SDK when a reader collects."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from chargepath.core.model import Decision, Mode, Reason, Subject, Usage, Verdict
from chargepath.telemetry import OUTCOMES, Telemetry


def points(reader: InMemoryMetricReader) -> dict[tuple[str, tuple[tuple[str, object], ...]], int]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        (m.name, tuple(sorted(p.attributes.items()))): p.value  # type: ignore[union-attr]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name.startswith("chargepath.decisions")
        for p in m.data.data_points  # type: ignore[union-attr]
    }


def verdict(decision: Decision, reason: Reason, *, degraded: bool = False) -> Verdict:
    return Verdict("r", decision, reason, "d", 1, degraded=degraded)


def usage(tenant: str = "t1") -> Usage:
    return Usage("r", Subject(tenant), "api.sms.send", 1, Mode.ADMIT)


def test_counts_are_cumulative_sums_by_decision_reason_and_degraded() -> None:
    reader = InMemoryMetricReader()
    t = Telemetry(TracerProvider(), MeterProvider(metric_readers=[reader]), tracing=False)
    # every known outcome is there before any decision, at zero
    before = points(reader)
    zeros = {
        (
            "chargepath.decisions",
            (("decision", d.name), ("degraded", degraded), ("reason", r.name)),
        ): 0
        for d, r, degraded in OUTCOMES
    }
    degraded_zeros = {
        ("chargepath.decisions.degraded", (("reason", r.name),)): 0
        for _, r, degraded in OUTCOMES
        if degraded
    }
    assert before == zeros | degraded_zeros
    verdicts = [
        verdict(Decision.ALLOW, Reason.OK),
        verdict(Decision.ALLOW, Reason.OK),
        verdict(Decision.THROTTLE, Reason.RATE_LIMITED),
        verdict(Decision.DENY, Reason.STORE_UNAVAILABLE, degraded=True),
        verdict(Decision.ALLOW, Reason.STORE_UNAVAILABLE, degraded=True),
    ]
    # two tenants: the totals are summed over them
    t.count_decisions(
        [usage("t1"), usage("t2"), usage("t1"), usage("t2"), usage("t1")], verdicts, 0.002
    )
    t.count_invalid()
    first = {k: v for k, v in points(reader).items() if v}
    assert first == {
        ("chargepath.decisions", (("decision", "ALLOW"), ("degraded", False), ("reason", "OK"))): 2,
        (
            "chargepath.decisions",
            (("decision", "THROTTLE"), ("degraded", False), ("reason", "RATE_LIMITED")),
        ): 1,
        (
            "chargepath.decisions",
            (("decision", "DENY"), ("degraded", True), ("reason", "STORE_UNAVAILABLE")),
        ): 1,
        (
            "chargepath.decisions",
            (("decision", "ALLOW"), ("degraded", True), ("reason", "STORE_UNAVAILABLE")),
        ): 1,
        (
            "chargepath.decisions",
            (("decision", "DENY"), ("degraded", False), ("reason", "INVALID_USAGE")),
        ): 1,
        ("chargepath.decisions.degraded", (("reason", "STORE_UNAVAILABLE"),)): 2,
    }
    # a later collection gives the running totals, not what changed since the last one
    t.count_decisions([usage("t3")], [verdict(Decision.ALLOW, Reason.OK)], 0.001)
    second = {k: v for k, v in points(reader).items() if v}
    key = ("chargepath.decisions", (("decision", "ALLOW"), ("degraded", False), ("reason", "OK")))
    assert second[key] == 3
    assert {k: v for k, v in second.items() if k != key} == {
        k: v for k, v in first.items() if k != key
    }


def test_the_spool_is_exported_from_its_snapshot_when_a_reader_collects() -> None:
    from chargepath.store.spool import SpoolStats

    reader = InMemoryMetricReader()
    t = Telemetry(TracerProvider(), MeterProvider(metric_readers=[reader]), tracing=False)
    stats = SpoolStats(depth=3, bytes=900, oldest_age_ms=4200, appended=5, refused=1)
    t.observe_spool(lambda: stats)
    data = reader.get_metrics_data()
    assert data is not None
    got = {
        (m.name, tuple(sorted(p.attributes.items()))): p.value  # type: ignore[union-attr]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name.startswith("chargepath.spool")
        for p in m.data.data_points  # type: ignore[union-attr]
    }
    assert got[("chargepath.spool.depth", ())] == 3
    assert got[("chargepath.spool.size", ())] == 900
    assert got[("chargepath.spool.oldest_age", ())] == 4.2
    assert got[("chargepath.spool.usages", (("outcome", "appended"),))] == 5
    assert got[("chargepath.spool.usages", (("outcome", "refused"),))] == 1
    assert got[("chargepath.spool.usages", (("outcome", "replayed"),))] == 0
    assert got[("chargepath.spool.commits", ())] == 0
    stats = SpoolStats(depth=0, replayed=3)  # read again at the next collection
    data = reader.get_metrics_data()
    assert data is not None
    depth = [
        p.value  # type: ignore[union-attr]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "chargepath.spool.depth"
        for p in m.data.data_points  # type: ignore[union-attr]
    ]
    assert depth == [0]
