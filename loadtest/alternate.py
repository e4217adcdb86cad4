"""``python -m loadtest alternate``: several scenarios against one gateway, in alternating
rounds at one offered rate, and what each costs the gateway per usage against the first.

Each round runs every scenario once, each with its own workers, warm-up and measured phase; odd
rounds in the given order, even rounds in reverse (check, rls, rls, check, ...), so that a drift
of the machine's load during the run weighs on both sides alike. The figure is the gateway's CPU
time per usage answered (``--target-pid``), and its ratio to the first scenario's in the same
round: a paired ratio, which moves less than either figure on a machine shared with other work.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, NamedTuple

from rich.console import Console
from rich.table import Table

from loadtest.runner import Measurement


class Turn(NamedTuple):
    """One scenario of one round (rounds count from 1)."""

    round: int
    scenario: str


def turns(scenarios: Sequence[str], rounds: int) -> list[Turn]:
    """The order of the run: odd rounds in ``scenarios``' order, even rounds reversed."""
    out = []
    for r in range(1, rounds + 1):
        order = scenarios if r % 2 else list(reversed(scenarios))
        out += [Turn(r, s) for s in order]
    return out


def label(turn: Turn) -> str:
    return f"{turn.scenario} round {turn.round}"


def summary(played: Sequence[tuple[Turn, Measurement]], scenarios: Sequence[str]) -> dict[str, Any]:
    """Per scenario and round: the gateway's CPU µs per usage, p50 and p99 (ms, the scenario's
    only flow), achieved usages/s; and per round the CPU ratio of each scenario to the first
    (``scenarios[0]``). A figure that was not measured (no ``--target-pid``, a round cut short
    by an error) is None; a ratio with a missing side is None."""
    rounds = max((t.round for t, _ in played), default=0)
    per: dict[str, dict[str, list[float | None]]] = {
        s: {"cpu_us_per_usage": [], "p50_ms": [], "p99_ms": [], "achieved_rate": []}
        for s in scenarios
    }
    for s in scenarios:
        for r in range(1, rounds + 1):
            m = next((m for t, m in played if t == Turn(r, s)), None)
            phase = m.headline_phase if m is not None else None
            figures = per[s]
            figures["cpu_us_per_usage"].append(
                _round(phase.target_cpu_us_per_usage, 1) if phase else None
            )
            figures["p50_ms"].append(phase.flows[0].latency_ms["p50"] if phase else None)
            figures["p99_ms"].append(phase.flows[0].latency_ms["p99"] if phase else None)
            figures["achieved_rate"].append(_round(phase.achieved_rate, 1) if phase else None)
    base = scenarios[0]
    ratios = {
        s: [
            _ratio(cpu, base_cpu)
            for cpu, base_cpu in zip(
                per[s]["cpu_us_per_usage"], per[base]["cpu_us_per_usage"], strict=True
            )
        ]
        for s in scenarios[1:]
    }
    return {"baseline": base, "rounds": rounds, "scenarios": per, "cpu_ratio_to_baseline": ratios}


def print_summary(console: Console, doc: dict[str, Any]) -> None:
    rounds: int = doc["rounds"]
    base: str = doc["baseline"]
    table = Table(
        title="gateway CPU µs per usage, by round (same gateway, same offered rate); the ratio "
        f"is each scenario's to {base}'s of the same round",
        title_justify="left",
    )
    table.add_column("scenario")
    for r in range(1, rounds + 1):
        table.add_column(f"round {r}", justify="right")
    for col in ("min", "median", "max", "p50 ms (median)", "p99 ms (median)"):
        table.add_column(col, justify="right")
    for s, figures in doc["scenarios"].items():
        cpu = figures["cpu_us_per_usage"]
        table.add_row(
            s,
            *(_fmt(v, "{:,.1f}") for v in cpu),
            *_spread(cpu, "{:,.1f}"),
            _fmt(_median(figures["p50_ms"]), "{:,.2f}"),
            _fmt(_median(figures["p99_ms"]), "{:,.2f}"),
        )
    for s, ratios in doc["cpu_ratio_to_baseline"].items():
        table.add_row(
            f"{s} / {base}",
            *(_fmt(v, "{:.2f}") for v in ratios),
            *_spread(ratios, "{:.2f}"),
            "",
            "",
        )
    console.print(table)


def _spread(values: Sequence[float | None], fmt: str) -> tuple[str, str, str]:
    known = [v for v in values if v is not None]
    if not known:
        return ("-", "-", "-")
    return (fmt.format(min(known)), fmt.format(statistics.median(known)), fmt.format(max(known)))


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
