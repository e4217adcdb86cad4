"""Recording and merging: the parent's merge of the workers' encoded histograms must equal one
histogram of every value, and the counts must add up."""

from __future__ import annotations

import random

import pytest

from loadtest.stats import (
    DEGRADED_OFFSET,
    MIN_SAMPLES,
    PERCENTILES,
    FlowRecorder,
    FlowStats,
    Tally,
    merge,
    merge_by_flow,
    new_histogram,
    percentile_windows,
    summarize,
    window_bounds,
)

pytestmark = pytest.mark.unit

ALLOW, THROTTLE, DENY = 1, 2, 3


def record(rec: FlowRecorder, latencies_ms: list[float], at: float) -> None:
    for ms in latencies_ms:
        rec.scheduled()
        rec.sent()
        rec.answered(at - ms / 1000, at, [ALLOW])


def test_latency_is_measured_from_the_intended_send_time() -> None:
    rec = FlowRecorder("check", 1, start=100.0, duration=10.0)
    rec.sent()
    rec.answered(intended=100.25, now=100.2625, decisions=[ALLOW])
    m = merge([rec.snapshot()])
    assert m.histogram.get_total_count() == 1
    assert m.histogram.get_max_value() == pytest.approx(12_500, rel=1e-3)


def test_merged_histogram_equals_the_histogram_of_all_values() -> None:
    rng = random.Random(7)
    workers = [FlowRecorder("check", 1, start=0.0, duration=5.0) for _ in range(3)]
    reference = new_histogram()
    for rec in workers:
        for second in range(5):
            values = [rng.lognormvariate(0, 1) for _ in range(400)]
            record(rec, values, at=second + 0.5)
            for ms in values:
                reference.record_value(max(1, int(ms * 1000)))
    merged = merge([w.snapshot() for w in workers])
    assert merged.histogram.get_total_count() == reference.get_total_count() == 6000
    for q in (50, 90, 99, 99.9, 100):
        assert merged.histogram.get_value_at_percentile(q) == pytest.approx(
            reference.get_value_at_percentile(q), rel=2e-3
        )
    assert sorted(merged.seconds) == [0, 1, 2, 3, 4]
    assert all(s.histogram.get_total_count() == 1200 for s in merged.seconds.values())


def test_counts_add_up_across_workers() -> None:
    a = FlowRecorder("stream", 3, start=0.0, duration=1.0)
    b = FlowRecorder("stream", 3, start=0.0, duration=1.0)
    for rec in (a, b):
        rec.scheduled()
        rec.sent()
        rec.answered(0.1, 0.2, [ALLOW, THROTTLE, ALLOW])
    b.scheduled()
    b.sent()
    b.failed(0.3, "UNAVAILABLE")
    b.scheduled()
    b.dropped()
    m = merge([a.snapshot(), b.snapshot()])
    t = m.tally
    assert (t.scheduled_ops, t.sent_ops, t.ok_ops, t.error_ops, t.dropped_ops) == (4, 3, 2, 1, 1)
    assert t.ok_usages == 6
    assert t.decisions == {"ALLOW": 4, "THROTTLE": 2}
    assert t.errors == {"UNAVAILABLE": 1}
    assert m.seconds[0].error_ops == 1


def test_achieved_rate_counts_only_answers_inside_the_window() -> None:
    rec = FlowRecorder("check", 1, start=0.0, duration=2.0)
    record(rec, [1.0] * 100, at=1.0)
    record(rec, [1.0] * 60, at=2.5)  # drained after the window: counted, not achieved
    summary = summarize(merge([rec.snapshot()]), offered_rate=80.0, duration=2.0)
    assert summary.tally.ok_usages == 160
    assert summary.achieved_rate == 50.0
    assert [p["usages_per_s"] for p in summary.series] == [100.0, 60.0]


def test_degraded_verdicts_are_counted_per_second_across_workers() -> None:
    a = FlowRecorder("stream", 3, start=0.0, duration=3.0)
    b = FlowRecorder("stream", 3, start=0.0, duration=3.0)
    for rec in (a, b):
        rec.sent()
        rec.answered(0.5, 0.6, [1, DEGRADED_OFFSET + 1, DEGRADED_OFFSET + 3])
        rec.sent()
        rec.answered(2.0, 2.1, [1, 1, 1])
    summary = summarize(merge([a.snapshot(), b.snapshot()]), offered_rate=3.0, duration=3.0)
    assert [(p["t"], p["usages_per_s"], p["degraded"]) for p in summary.series] == [
        (0.0, 6.0, 4.0),
        (2.0, 6.0, 0.0),
    ]
    assert summary.tally.decisions == {"ALLOW": 8, "DEGRADED_ALLOW": 2, "DEGRADED_DENY": 2}


def test_merge_by_flow_keeps_flows_apart() -> None:
    def stats(flow: str, ok: int) -> FlowStats:
        return FlowStats(flow, 1, Tally(ok_ops=ok, ok_usages=ok), {})

    merged = merge_by_flow([[stats("check", 1), stats("stream", 2)], [stats("check", 3)]])
    assert [(m.flow, m.tally.ok_ops) for m in merged] == [("check", 4), ("stream", 2)]
    with pytest.raises(ValueError):
        merge([stats("check", 1), stats("stream", 1)])


def test_idle_hook_fires_when_the_last_operation_settles() -> None:
    rec = FlowRecorder("check", 1, start=0.0, duration=1.0)
    fired: list[int] = []
    rec.on_idle = lambda: fired.append(rec.in_flight)
    for _ in range(3):
        rec.sent()
    rec.answered(0.0, 0.1, [ALLOW])
    rec.failed(0.2, "DEADLINE_EXCEEDED")
    assert fired == []
    rec.incomplete(1)
    assert fired == [0]


# -- plotted series: windows of seconds with enough samples for each percentile ---------------


def test_a_percentile_needs_one_sample_above_it() -> None:
    """1 / (1 - q): p99 from 100 samples, p99.9 from 1,000, so neither is the maximum."""
    assert MIN_SAMPLES == {"p50": 2, "p90": 10, "p99": 100, "p99.9": 1_000, "max": 1}
    for name, q in PERCENTILES:
        assert MIN_SAMPLES[name] == round(1 / (1 - q / 100))


def test_a_second_with_enough_samples_is_its_own_window() -> None:
    counts = [(0, 150), (1, 100), (2, 3000)]
    assert window_bounds(counts, 100) == [(0, 1), (1, 2), (2, 3)]


def test_seconds_with_too_few_samples_are_merged_until_the_window_has_enough() -> None:
    counts = [(0, 40), (1, 40), (2, 40), (3, 500), (4, 99), (5, 1)]
    assert window_bounds(counts, 100) == [(0, 3), (3, 4), (4, 6)]


def test_a_short_remainder_joins_the_last_window() -> None:
    counts = [(0, 120), (1, 80), (2, 30), (3, 10)]
    assert window_bounds(counts, 100) == [(0, 1), (1, 4)]


def test_a_window_spans_seconds_without_answers() -> None:
    assert window_bounds([(0, 60), (5, 60)], 100) == [(0, 6)]


def test_no_window_when_the_phase_has_too_few_samples() -> None:
    assert window_bounds([(0, 400), (1, 500)], 1_000) == []
    assert window_bounds([], 1) == []


def test_at_50_messages_a_second_p99_and_p99_9_come_from_different_samples() -> None:
    """The issue: per second, p99 and p99.9 of 50 messages are both the slowest one. Per
    window they are read from 100 and 1,000 samples and differ from each other and from max."""
    rng = random.Random(11)
    rec = FlowRecorder("stream", 64, start=0.0, duration=40.0)
    for second in range(40):
        record(rec, [rng.lognormvariate(1.5, 0.6) for _ in range(50)], at=second + 0.5)
    flow = merge([rec.snapshot()])
    one_second = flow.seconds[7].histogram
    assert one_second.get_value_at_percentile(99) == one_second.get_value_at_percentile(99.9)

    windows = percentile_windows(flow.seconds)
    assert [(w.start, w.end) for w in windows["p50"]] == [(s, s + 1) for s in range(40)]
    assert [(w.start, w.end) for w in windows["p99"]] == [(s, s + 2) for s in range(0, 40, 2)]
    assert [(w.start, w.end, w.samples) for w in windows["p99.9"]] == [
        (0, 20, 1000),
        (20, 40, 1000),
    ]
    assert len(windows["max"]) == 40
    for w in windows["p99.9"]:
        hist = new_histogram()
        for sec in range(w.start, w.end):
            hist.add(flow.seconds[sec].histogram)
        assert w.ms == hist.get_value_at_percentile(99.9) / 1000
        assert w.ms < hist.get_max_value() / 1000
        p99 = hist.get_value_at_percentile(99) / 1000
        assert p99 < w.ms


def test_the_summary_carries_the_windows() -> None:
    rec = FlowRecorder("check", 1, start=0.0, duration=2.0)
    record(rec, [1.0] * 5, at=0.5)
    record(rec, [3.0] * 5, at=1.5)
    windows = summarize(merge([rec.snapshot()]), offered_rate=5, duration=2.0).windows
    assert [(w.start, w.end, w.samples) for w in windows["p50"]] == [(0, 1, 5), (1, 2, 5)]
    assert [round(w.ms) for w in windows["p50"]] == [1, 3]
    assert [(w.start, w.end, w.samples) for w in windows["p90"]] == [(0, 2, 10)]
    assert windows["p99"] == windows["p99.9"] == []
