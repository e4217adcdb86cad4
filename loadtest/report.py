"""The end of a run: a table on the terminal, a JSON file and a PNG per measurement."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; before pyplot is imported

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loadtest.runner import Measurement
from loadtest.stats import FlowSummary, PhaseSummary

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


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def plot(path: Path, m: Measurement) -> None:
    """Latency percentiles (log scale) and throughput over time, phases end to end."""
    fig, (lat_ax, tput_ax) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    offset = 0.0
    styles = {"p50": "-", "p90": "--", "p99": "-.", "p99.9": ":"}
    colours: dict[str, str] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labelled: set[str] = set()
    for i, phase in enumerate(m.phases):
        if i > 0:
            for ax in (lat_ax, tput_ax):
                ax.axvline(offset, color="grey", linewidth=0.6, linestyle=":")
        if len(m.phases) > 1:
            tput_ax.annotate(
                f"{phase.label}\n{phase.offered_rate:,.0f}/s",
                (offset, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                va="top",
            )
        for flow in phase.flows:
            colour = colours.setdefault(flow.flow, palette[len(colours) % len(palette)])
            _plot_flow(lat_ax, tput_ax, flow, offset, phase.duration, colour, styles, labelled)
        # Answers drained after the window are plotted after it: the next phase starts later.
        last = max((p["t"] or 0.0 for f in phase.flows for p in f.series), default=0.0)
        offset += max(phase.duration, last + 1.0)
    lat_ax.set_yscale("log")
    lat_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    lat_ax.set_ylabel("latency from intended send (ms)")
    lat_ax.grid(True, which="both", alpha=0.3)
    lat_ax.legend(fontsize=7, ncol=4, loc="upper left")
    tput_ax.set_ylabel("usages answered per second")
    tput_ax.set_xlabel("seconds")
    tput_ax.grid(True, alpha=0.3)
    tput_ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{m.label} — {m.target}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_flow(
    lat_ax: Any,
    tput_ax: Any,
    flow: FlowSummary,
    offset: float,
    duration: float,
    colour: str,
    styles: dict[str, str],
    labelled: set[str],
) -> None:
    # Seconds by completion time; answers drained after the window appear past its end.
    points = flow.series
    if not points:
        return
    starts = [offset + float(p["t"] or 0.0) for p in points]
    for q, style in styles.items():
        label = f"{flow.flow} {q}"
        lat_ax.plot(
            [x + 0.5 for x in starts],
            [float("nan") if p[q] is None else p[q] for p in points],
            linestyle=style,
            marker="." if len(points) < 30 else None,
            color=colour,
            label=None if label in labelled else label,
        )
        labelled.add(label)
    label = f"{flow.flow} answered"
    # One step per second of completions, drawn over the whole second.
    tput_ax.stairs(
        [p["usages_per_s"] or 0.0 for p in points],
        [*starts, starts[-1] + 1.0],
        baseline=None,
        color=colour,
        label=None if label in labelled else label,
    )
    labelled.add(label)
    offered = f"{flow.flow} offered"
    tput_ax.hlines(
        flow.offered_rate,
        offset,
        offset + duration,
        colors=colour,
        linestyles="dashed",
        linewidth=0.8,
        label=None if offered in labelled else offered,
    )
    labelled.add(offered)
