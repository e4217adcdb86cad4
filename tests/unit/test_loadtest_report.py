"""The load test's figure: its title, the step lines of windowed percentiles, and a PNG
rendered from a synthetic measurement (linear axes, one colour per percentile, throughput
from 0)."""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from loadtest.findmax import Judgement, StepOutcome
from loadtest.report import (
    PERCENTILE_COLOURS,
    RunInfo,
    answered_per_second,
    figure,
    measurement_from_json,
    measurement_json,
    plot,
    plot_title,
    redraw,
    render,
    window_steps,
    write_json,
)
from loadtest.runner import Measurement
from loadtest.stats import (
    FlowRecorder,
    FlowSummary,
    PhaseSummary,
    Window,
    latency_ms,
    merge,
    percentile_windows,
)
from loadtest.worker import FlowSpec

pytestmark = pytest.mark.unit

ALLOW = 1
RUN = RunInfo("mixed", "2026-11-26T14:03:09+0000", "bench-vm", 2)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def phase(label: str, rate: float, seconds: int, seed: int) -> PhaseSummary:
    """A phase of a mixed run: checks at ``rate * 0.2``/s, stream messages of 64 usages."""
    rng = random.Random(seed)
    flows = []
    for name, per_op, ops_per_s, median_ms in (
        ("check", 1, int(rate * 0.2), 2.0),
        ("stream", 64, max(1, int(rate * 0.8 / 64)), 8.0),
    ):
        rec = FlowRecorder(name, per_op, start=0.0, duration=float(seconds))
        for sec in range(seconds):
            for _ in range(ops_per_s):
                ms = median_ms * rng.lognormvariate(0, 0.4)
                rec.sent()
                rec.answered(sec + 0.5 - ms / 1000, sec + 0.5, [ALLOW] * per_op)
        merged = merge([rec.snapshot()])
        # What summarize() gives, less the per-second percentiles of the table (slow to compute
        # and not drawn).
        flows.append(
            FlowSummary(
                flow=name,
                usages_per_op=per_op,
                offered_rate=rate * (0.2 if name == "check" else 0.8),
                achieved_rate=ops_per_s * per_op,
                latency_ms=latency_ms(merged.histogram),
                tally=merged.tally,
                series=[
                    {"t": float(sec), "usages_per_s": float(s.ok_usages)}
                    for sec, s in merged.seconds.items()
                ],
                windows=percentile_windows(merged.seconds),
            )
        )
    return PhaseSummary(label, rate, float(seconds), flows)


def measurement(*phases: PhaseSummary) -> Measurement:
    specs = (FlowSpec("check", "check", 0.2), FlowSpec("stream", "stream", 0.8, batch=64))
    return Measurement("gateway", "127.0.0.1:50071", specs, list(phases))


def test_title_names_scenario_rate_date_and_machine() -> None:
    title = plot_title(measurement(phase("run", 4000, 2, seed=1)), RUN)
    assert title == (
        "mixed · gateway (127.0.0.1:50071) · 4,000 usages/s offered\n"
        "2026-11-26 14:03 UTC+0000 · bench-vm, 2 cores"
    )


def test_title_of_a_search_gives_its_steps_and_best_rate() -> None:
    m = measurement(phase("step 1", 1000, 1, seed=1), phase("step 2", 1500, 1, seed=2))
    m.steps = [
        (StepOutcome(1000, 1000, 3.0), Judgement(True, "ok")),
        (StepOutcome(1500, 1200, 40.0), Judgement(False, "p99 40 ms")),
    ]
    m.best_rate = 1000
    first_line, second_line = plot_title(m, RunInfo("check", "x", "h", 1)).split("\n")
    assert first_line.endswith(
        "find-max, 2 steps of 1,000 to 1,500 usages/s, highest sustained 1,000/s"
    )
    assert second_line == "x · h, 1 core"
    m.best_rate = None
    assert "none sustained" in plot_title(m, RunInfo("check", "x", "h", None))
    del m.phases[1:], m.steps[1:]
    assert "find-max, 1 step at 1,000 usages/s, none sustained" in plot_title(m, RUN)
    assert plot_title(m, RunInfo("check", "x", "h", None)).endswith("h, cores unknown")


def test_window_steps_draw_each_window_across_its_seconds() -> None:
    windows = [Window(0, 1, 150, 2.0), Window(1, 4, 120, 3.0), Window(6, 7, 200, 5.0)]
    xs, ys = window_steps(windows, offset=10.0)
    assert xs == [10.0, 11.0, 11.0, 14.0, 14.0, 16.0, 17.0]
    assert ys[:4] == [2.0, 2.0, 3.0, 3.0]
    assert math.isnan(ys[4])  # seconds 4 and 5 had no answer: the line breaks
    assert ys[5:] == [5.0, 5.0]
    assert window_steps([], 0.0) == ([], [])


def test_a_second_without_answers_is_drawn_as_zero_throughput() -> None:
    series: list[dict[str, float | None]] = [
        {"t": 0.0, "usages_per_s": 640.0},
        {"t": 1.0, "usages_per_s": 704.0},
        {"t": 4.0, "usages_per_s": 64.0},  # a stall, then the drain
    ]
    edges, answered = answered_per_second(series, offset=10.0)
    assert edges == [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]
    assert answered == [640.0, 704.0, 0.0, 0.0, 64.0]
    assert answered_per_second([], 0.0) == ([], [])


def test_figure_has_linear_axes_one_colour_per_percentile_and_throughput_from_zero() -> None:
    fig = figure(
        measurement(phase("step 1", 3200, 12, seed=3), phase("step 2", 4800, 12, seed=4)), RUN
    )
    try:
        *latency_axes, throughput = fig.axes
        assert len(latency_axes) == 2  # one per flow
        for ax in latency_axes:
            assert ax.get_yscale() == "linear"
            assert "(ms)" in ax.get_ylabel()
            assert ax.get_ylim()[0] == 0
            lines = [line for line in ax.get_lines() if line.get_label() in PERCENTILE_COLOURS]
            assert {line.get_label() for line in lines} == set(PERCENTILE_COLOURS)
            for line in lines:
                assert line.get_color() == PERCENTILE_COLOURS[line.get_label()]
        percentiles = latency_axes[0].get_legend()
        flows = throughput.get_legend()
        colours = {
            text.get_text().split(",")[0]: handle.get_color()
            for text, handle in zip(
                percentiles.get_texts(), percentiles.legend_handles, strict=True
            )
        }
        assert colours == PERCENTILE_COLOURS
        assert len(set(colours.values())) == 5
        assert [t.get_text() for t in flows.get_texts()] == [
            "check answered",
            "check offered",
            "stream answered",
            "stream offered",
        ]
        # 40 stream messages a second: too few for a p99.9 in a 12-second step.
        assert "too few samples: p99.9 (< 1,000)" in latency_axes[1].get_title(loc="left")
        assert "too few" not in latency_axes[0].get_title(loc="left")
        assert throughput.get_yscale() == "linear"
        assert throughput.get_ylabel() == "usages/s"
        assert "(s)" in throughput.get_xlabel()
        assert throughput.get_ylim()[0] == 0
        assert throughput.get_ylim()[1] >= 4800 * 0.8
        assert fig.get_suptitle().startswith("mixed · gateway")
    finally:
        plt.close(fig)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_render_gives_a_png_of_the_figure() -> None:
    data = render(measurement(phase("run", 2000, 10, seed=5)), RUN)
    assert png_size(data) == (1375, 1034)  # 12.5 x 9.4 inches at 110 dpi: two flows, throughput
    assert len(data) > 40_000  # lines, labels and a legend, not a blank canvas


def test_plot_writes_the_png(tmp_path: Path) -> None:
    path = tmp_path / "figures" / "run-gateway.png"
    plot(path, measurement(phase("run", 1000, 5, seed=6)), RUN)
    assert path.is_file()
    assert png_size(path.read_bytes())[0] == 1375
    assert path.stat().st_size > 40_000


def test_a_report_json_redraws_the_same_figure(tmp_path: Path) -> None:
    """The JSON beside a PNG is enough to draw it again (``python -m loadtest redraw``)."""
    m = measurement(phase("step 1", 1000, 4, seed=7), phase("step 2", 1500, 4, seed=8))
    m.steps = [
        (StepOutcome(1000, 1000, 3.0), Judgement(True, "ok")),
        (StepOutcome(1500, 1200, 40.0, degraded=3), Judgement(False, "p99 40 ms")),
    ]
    m.best_rate = 1000
    doc = {
        "scenario": RUN.scenario,
        "started_at": RUN.started_at,
        "machine": {"host": RUN.host, "cpus": RUN.cpus},
        "measurements": [measurement_json(m)],
    }
    report = tmp_path / "run.json"
    write_json(report, json.loads(json.dumps(doc)))
    assert measurement_from_json(json.loads(report.read_text())["measurements"][0]) == m
    (png,) = redraw(report, tmp_path / "again")
    assert png == tmp_path / "again" / "run-gateway.png"
    assert png.read_bytes() == render(m, RUN)
