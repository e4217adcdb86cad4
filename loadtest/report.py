"""The end of a run: a table on the terminal, a JSON file and a PNG per measurement."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; before pyplot is imported

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loadtest.runner import Measurement
from loadtest.stats import MIN_SAMPLES, FlowSummary, PhaseSummary, Tally, Window

LATENCY_COLUMNS = ("p50", "p90", "p99", "p99.9", "max")
OUTCOMES = ("ALLOW", "THROTTLE", "DENY")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def measurement_table(m: Measurement) -> Table:
    """One row per flow and phase."""
    table = Table(
        title=f"{m.label} — {m.target}",
        title_justify="left",
        caption="latency in ms per operation (a call, a stream message, a Redis batch) from its "
        "intended send time; rates in usages/s; unanswered = dropped by the generator + "
        "incomplete after the drain",
        caption_justify="left",
    )
    table.add_column("phase")
    table.add_column("flow")
    for col in LATENCY_COLUMNS:
        table.add_column(col, justify="right")
    table.add_column("offered", justify="right")
    table.add_column("achieved", justify="right")
    for outcome in OUTCOMES:
        table.add_column(outcome, justify="right")
    table.add_column("degraded", justify="right")
    table.add_column("errors", justify="right")
    table.add_column("unanswered", justify="right")
    with_cpu = any(p.target_cpu_s is not None for p in m.phases)
    if with_cpu:
        table.caption = (
            f"{table.caption}; target CPU = CPU time of the target process(es) per usage"
        )
        table.add_column("target CPU µs/usage", justify="right")
        table.add_column("usages per CPU-s", justify="right")
    for phase in m.phases:
        for i, flow in enumerate(phase.flows):
            t = flow.tally
            errors = ", ".join(f"{k}={v}" for k, v in sorted(t.errors.items())) or "0"
            cpu = []
            if with_cpu:
                first = i == 0
                cpu = [
                    _us(phase.target_cpu_us_per_usage) if first else "",
                    _rate(phase.target_usages_per_cpu_s) if first else "",
                ]
            table.add_row(
                f"{phase.label} @ {_rate(phase.offered_rate)}",
                f"{flow.flow} x{flow.usages_per_op}" if flow.usages_per_op > 1 else flow.flow,
                *(_ms(flow.latency_ms[c]) for c in LATENCY_COLUMNS),
                _rate(flow.offered_rate),
                _rate(flow.achieved_rate),
                *(f"{t.decisions.get(o, 0):,}" for o in OUTCOMES),
                f"{sum(n for k, n in t.decisions.items() if k.startswith('DEGRADED')):,}",
                errors,
                f"{t.dropped_ops + t.incomplete_ops:,}",
                *cpu,
            )
    return table


def print_measurement(console: Console, m: Measurement) -> None:
    console.print(measurement_table(m))
    samples: dict[str, str] = {}
    for phase in m.phases:
        for flow in phase.flows:
            for code, text in flow.tally.error_samples.items():
                samples.setdefault(f"{flow.flow} {code}", text)
    for what, text in samples.items():
        console.print(f"[red]first {escape(what)}:[/red] {escape(text)}", highlight=False)
    if m.steps:
        if m.best_rate is None:
            console.print(
                f"[red]{m.label}: not even the first step ({_rate(m.steps[0][0].offered_rate)}"
                "/s) was sustained; lower --rate[/red]"
            )
        else:
            more = " (the search ran out of steps: the real maximum is higher)"
            console.print(
                f"[bold]{m.label}: highest sustainable rate {_rate(m.best_rate)} usages/s"
                f"{more if m.search_exhausted else ''}"
            )


def comparison_rows(gateway: Measurement, ceilings: list[Measurement]) -> list[dict[str, Any]]:
    """Gateway / ceiling ratios, one row per ceiling and flow: of the headline rates (the
    highest sustained rate of a search, else the achieved rate; all flows together); and, at
    the gateway's headline phase and the ceiling's phase at the same offered rate, of the
    flow's p50 and p99 latency and of the target's CPU time per usage (when the gateway's
    process id was given)."""
    rows = []
    g_phase = gateway.headline_phase
    for c in ceilings:
        c_phase = _same_rate(c, g_phase) or c.headline_phase
        for spec in gateway.flows:
            row: dict[str, Any] = {
                "ceiling": c.label,
                "flow": spec.name,
                "gateway_rate": gateway.headline_rate,
                "ceiling_rate": c.headline_rate,
                "rate_ratio": _ratio(gateway.headline_rate, c.headline_rate),
            }
            for q in ("p50", "p99"):
                g = _latency(g_phase, spec.name, q)
                cv = _latency(c_phase, spec.name, q)
                row[f"gateway_{q}_ms"] = g
                row[f"ceiling_{q}_ms"] = cv
                row[f"{q}_ratio"] = _ratio(g, cv)
            g_cpu = g_phase.target_cpu_us_per_usage if g_phase else None
            c_cpu = c_phase.target_cpu_us_per_usage if c_phase else None
            row["gateway_cpu_us_per_usage"] = g_cpu
            row["ceiling_cpu_us_per_usage"] = c_cpu
            row["cpu_ratio"] = _ratio(g_cpu, c_cpu)
            rows.append(row)
    return rows


def print_comparison(console: Console, rows: list[dict[str, Any]], find_max: bool) -> None:
    what = "highest sustainable rate" if find_max else "achieved rate"
    table = Table(
        title=f"gateway / ceiling: {what} (usages/s, all flows); latency (ms) and target CPU "
        "per usage at the gateway's rate",
        title_justify="left",
    )
    for col in ("ceiling", "flow", "gateway/s", "ceiling/s", "rate ratio"):
        table.add_column(col, justify="right")
    for col in ("gateway p50", "ceiling p50", "p50 ratio", "gateway p99", "ceiling p99"):
        table.add_column(col, justify="right")
    table.add_column("p99 ratio", justify="right")
    table.add_column("CPU µs/usage ratio", justify="right")
    for r in rows:
        table.add_row(
            r["ceiling"],
            r["flow"],
            _rate(r["gateway_rate"]),
            _rate(r["ceiling_rate"]),
            _fmt_ratio(r["rate_ratio"]),
            _ms(r["gateway_p50_ms"]),
            _ms(r["ceiling_p50_ms"]),
            _fmt_ratio(r["p50_ratio"]),
            _ms(r["gateway_p99_ms"]),
            _ms(r["ceiling_p99_ms"]),
            _fmt_ratio(r["p99_ratio"]),
            _fmt_ratio(r["cpu_ratio"]),
        )
    console.print(table)


def _same_rate(m: Measurement, phase: PhaseSummary | None) -> PhaseSummary | None:
    if phase is None:
        return None
    return next((p for p in m.phases if p.offered_rate == phase.offered_rate), None)


def _latency(phase: PhaseSummary | None, flow: str, q: str) -> float | None:
    if phase is None:
        return None
    return next((f.latency_ms[q] for f in phase.flows if f.flow == flow), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def measurement_json(m: Measurement) -> dict[str, Any]:
    return {
        "label": m.label,
        "target": m.target,
        "flows": [dataclasses.asdict(f) for f in m.flows],
        "phases": [
            {
                "label": p.label,
                "offered_rate": p.offered_rate,
                "achieved_rate": p.achieved_rate,
                "duration_s": p.duration,
                "worst_p99_ms": p.worst_p99_ms,
                "decided_usages": p.decided_usages,
                "error_ops": p.error_ops,
                "target_cpu_s": p.target_cpu_s,
                "target_cpu_us_per_usage": p.target_cpu_us_per_usage,
                "target_usages_per_cpu_s": p.target_usages_per_cpu_s,
                "flows": [dataclasses.asdict(f) for f in p.flows],
            }
            for p in m.phases
        ],
        "find_max": (
            {
                "best_rate": m.best_rate,
                "search_exhausted": m.search_exhausted,
                "steps": [{**dataclasses.asdict(s), **dataclasses.asdict(j)} for s, j in m.steps],
            }
            if m.steps
            else None
        ),
    }


def measurement_from_json(doc: dict[str, Any]) -> Measurement:
    """The :class:`Measurement` that :func:`measurement_json` wrote: what a figure needs to be
    drawn again from a report's JSON."""
    from loadtest.findmax import Judgement, StepOutcome
    from loadtest.worker import FlowSpec

    def flow(f: dict[str, Any]) -> FlowSummary:
        return FlowSummary(
            flow=f["flow"],
            usages_per_op=f["usages_per_op"],
            offered_rate=f["offered_rate"],
            achieved_rate=f["achieved_rate"],
            latency_ms=f["latency_ms"],
            tally=Tally(**f["tally"]),
            series=f["series"],
            windows={q: [Window(**w) for w in ws] for q, ws in f["windows"].items()},
        )

    def fields_of(cls: Any, raw: dict[str, Any]) -> dict[str, Any]:
        return {fd.name: raw[fd.name] for fd in dataclasses.fields(cls) if fd.name in raw}

    search = doc.get("find_max") or {}
    return Measurement(
        label=doc["label"],
        target=doc["target"],
        flows=tuple(FlowSpec(**f) for f in doc["flows"]),
        phases=[
            PhaseSummary(
                label=p["label"],
                offered_rate=p["offered_rate"],
                duration=p["duration_s"],
                flows=[flow(f) for f in p["flows"]],
                target_cpu_s=p.get("target_cpu_s"),
            )
            for p in doc["phases"]
        ],
        steps=[
            (StepOutcome(**fields_of(StepOutcome, st)), Judgement(**fields_of(Judgement, st)))
            for st in search.get("steps", [])
        ],
        best_rate=search.get("best_rate"),
        search_exhausted=bool(search.get("search_exhausted", False)),
    )


def redraw(report_path: Path, out: Path | None = None) -> list[Path]:
    """Draw the PNGs of a report's JSON again (one per measurement, named as when it was
    written: ``<stem>-<target>.png``), in ``out`` or beside the JSON; the paths written."""
    doc = json.loads(report_path.read_text(encoding="utf-8"))
    machine = doc.get("machine") or {}
    run = RunInfo(
        doc.get("scenario", ""),
        doc.get("started_at", ""),
        machine.get("host", "?"),
        machine.get("cpus"),
    )
    folder = out if out is not None else report_path.parent
    written = []
    for m in doc["measurements"]:
        measurement = measurement_from_json(m)
        slug = re.sub(r"[^a-z0-9]+", "-", measurement.label.lower()).strip("-")
        path = folder / f"{report_path.stem}-{slug}.png"
        plot(path, measurement, run)
        written.append(path)
    return written


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What a figure's title says about the run beyond the measurement: the scenario, when it
    started (``%Y-%m-%dT%H:%M:%S%z``, as ``started_at`` in the JSON) and the machine."""

    scenario: str
    started_at: str
    host: str
    cpus: int | None


# One colour per percentile, the same in every figure (Okabe-Ito: told apart with the common
# colour-vision deficiencies).
PERCENTILE_COLOURS = {
    "p50": "#0072B2",
    "p90": "#009E73",
    "p99": "#E69F00",
    "p99.9": "#D55E00",
    "max": "#CC79A7",
}
# Flows of one figure (the throughput panel); neutral, so as not to read as a percentile.
FLOW_COLOURS = ("#222222", "#8C8C8C", "#6B4E16")


def plot_title(m: Measurement, run: RunInfo) -> str:
    """Two lines: what was loaded at which rate; when, and on which machine."""
    rates = [p.offered_rate for p in m.phases]
    if m.steps:
        best = (
            f"highest sustained {_rate(m.best_rate)}/s"
            if m.best_rate is not None
            else "none sustained"
        )
        if len(rates) == 1:
            steps = f"1 step at {_rate(rates[0])} usages/s"
        else:
            steps = f"{len(rates)} steps of {_rate(rates[0])} to {_rate(rates[-1])} usages/s"
        what = f"find-max, {steps}, {best}"
    elif rates:
        what = f"{_rate(rates[0])} usages/s offered"
    else:
        what = "no phase measured"
    if run.cpus is None:
        cores = "cores unknown"
    else:
        cores = f"{run.cpus} core{'' if run.cpus == 1 else 's'}"
    machine = f"{run.host}, {cores}"
    return f"{run.scenario} · {m.label} ({m.target}) · {what}\n{_when(run.started_at)} · {machine}"


def _when(started_at: str) -> str:
    try:
        t = datetime.strptime(started_at, "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return started_at
    return t.strftime("%Y-%m-%d %H:%M UTC%z")


def window_steps(windows: Sequence[Window], offset: float) -> tuple[list[float], list[float]]:
    """A step line that draws each window's value across its seconds (shifted by ``offset``),
    broken (NaN) where a window does not start where the previous one ended."""
    xs: list[float] = []
    ys: list[float] = []
    for w in windows:
        if xs and offset + w.start != xs[-1]:
            xs.append(xs[-1])
            ys.append(math.nan)
        xs += [offset + w.start, offset + w.end]
        ys += [w.ms, w.ms]
    return xs, ys


def percentile_label(name: str) -> str:
    """The legend entry of a percentile, with the rule its points follow."""
    n = MIN_SAMPLES[name]
    return f"{name}, per second" if n <= 1 else f"{name}, ≥ {n:,} samples a point"


def plot(path: Path, m: Measurement, run: RunInfo) -> None:
    """Write the figure of ``m`` as a PNG (see ``render``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render(m, run))


def render(m: Measurement, run: RunInfo) -> bytes:
    """The PNG of ``figure(m, run)``."""
    fig = figure(m, run)
    try:
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=110)
    finally:
        plt.close(fig)
    return out.getvalue()


def figure(m: Measurement, run: RunInfo) -> Figure:
    """The figure of one measurement (the caller closes it): per flow, the latency percentiles
    over time on a linear axis in ms (one colour per percentile, each over windows with enough
    samples); below, the usages answered per second against the offered rate, from 0. Phases
    (steps) end to end."""
    flow_names = list(dict.fromkeys(f.flow for p in m.phases for f in p.flows))
    rows = max(1, len(flow_names))
    fig, axes = plt.subplots(
        rows + 1,
        1,
        figsize=(12.5, 2.9 * rows + 3.6),
        sharex=True,
        height_ratios=[1.35] * rows + [1.0],
        squeeze=False,
        layout="constrained",
    )
    lat_axes = {name: axes[i][0] for i, name in enumerate(flow_names)}
    tput_ax = axes[-1][0]
    # Per flow, the percentiles some phase had too few samples to draw at all.
    undrawn: dict[str, set[str]] = {name: set() for name in flow_names}
    offset = 0.0
    top = 0.0
    for i, phase in enumerate(m.phases):
        if i > 0:
            for row in axes:
                row[0].axvline(offset, color="grey", linewidth=0.6, linestyle=":")
        if len(m.phases) > 1:
            tput_ax.annotate(
                f"{phase.label}\n{phase.offered_rate:,.0f}/s",
                (offset, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -2),
                textcoords="offset points",
                fontsize=7,
                va="top",
            )
        for flow in phase.flows:
            lat_ax = lat_axes[flow.flow]
            for name, colour in PERCENTILE_COLOURS.items():
                windows = flow.windows.get(name, [])
                if not windows:
                    undrawn[flow.flow].add(name)
                xs, ys = window_steps(windows, offset)
                lat_ax.plot(xs, ys, color=colour, linewidth=1.3, label=name)
            colour = FLOW_COLOURS[flow_names.index(flow.flow) % len(FLOW_COLOURS)]
            top = max(top, _plot_throughput(tput_ax, flow, offset, phase.duration, colour))
        # Answers drained after the window are plotted after it: the next phase starts later.
        last = max((p["t"] or 0.0 for f in phase.flows for p in f.series), default=0.0)
        offset += max(phase.duration, last + 1.0)
    where = "a step" if len(m.phases) > 1 else "the run"
    for name, ax in lat_axes.items():
        per_op = next((f.usages_per_op for p in m.phases for f in p.flows if f.flow == name), 1)
        op = "operation" if per_op == 1 else f"operation of {per_op} usages"
        title = f"{name}: latency of an {op}, from its intended send time"
        missing = [q for q in PERCENTILE_COLOURS if q in undrawn[name]]
        if missing:
            few = ", ".join(f"{q} (< {MIN_SAMPLES[q]:,})" for q in missing)
            title += f"; not drawn where {where} had too few samples: {few}"
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel("latency (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    tput_ax.set_title("throughput", fontsize=9, loc="left")
    tput_ax.set_ylabel("usages/s")
    tput_ax.set_xlabel("time since the start of the measurement (s)")
    # From 0: the steps of a batched flow (64 usages a message) are small next to its rate.
    tput_ax.set_ylim(0, top * 1.2 if top > 0 else 1.0)
    tput_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    tput_ax.grid(True, alpha=0.3)
    fig.suptitle(plot_title(m, run), fontsize=10)
    # One legend for the percentiles of every panel (their colours are the same in each), and
    # one for the throughput lines; to the right of the axes, so that they hide no data.
    axes[0][0].legend(
        [Line2D([], [], color=c, linewidth=2) for c in PERCENTILE_COLOURS.values()],
        [percentile_label(q) for q in PERCENTILE_COLOURS],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        title="latency",
        title_fontsize=8,
    )
    handles, labels = tput_ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    tput_ax.legend(
        list(unique.values()),
        list(unique),
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        title="usages/s",
        title_fontsize=8,
    )
    return fig


def _plot_throughput(
    ax: Any, flow: FlowSummary, offset: float, duration: float, colour: str
) -> float:
    """One step per second of completions, drawn over the whole second, and the offered rate;
    returns the highest value drawn."""
    edges, answered = answered_per_second(flow.series, offset)
    if answered:
        ax.stairs(answered, edges, baseline=None, color=colour, label=f"{flow.flow} answered")
    _, degraded = answered_per_second(flow.series, offset, field="degraded")
    if any(degraded):
        ax.stairs(
            degraded,
            edges,
            baseline=None,
            color=colour,
            linestyle="dotted",
            linewidth=1.6,
            label=f"{flow.flow} degraded",
        )
    ax.hlines(
        flow.offered_rate,
        offset,
        offset + duration,
        colors=colour,
        linestyles="dashed",
        linewidth=0.8,
        label=f"{flow.flow} offered",
    )
    return max([flow.offered_rate, *answered])


def answered_per_second(
    series: Sequence[dict[str, float | None]], offset: float, *, field: str = "usages_per_s"
) -> tuple[list[float], list[float]]:
    """Edges (shifted by ``offset``) and usages answered (or ``field``: ``degraded``) of every
    second from the first to the last of ``series``; a second missing from it answered
    nothing, and is drawn as 0."""
    by_second = {int(p["t"] or 0.0): p.get(field) or 0.0 for p in series}
    if not by_second:
        return [], []
    seconds = range(min(by_second), max(by_second) + 1)
    edges = [offset + sec for sec in seconds]
    return [*edges, edges[-1] + 1.0], [by_second.get(sec, 0.0) for sec in seconds]
