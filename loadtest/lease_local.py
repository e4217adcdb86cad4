"""``python -m loadtest lease-local``: local lease decisions per second, against a bare loop.

The Python client's `Lease.try_acquire` decides without a round trip; this measures how many
decisions one core makes, while the lease's background renews and reports against a live
gateway, and sets it beside the ceiling of the same run: a bare Python loop making the same
number of calls of an empty function, on the same core. Rounds alternate (ceiling, lease,
ceiling, lease, ...) so that a noisy neighbour hurts both alike; the report gives each
round and the median of each.

The process pins itself to one CPU (``--cpu``, 0 by default; ``sched_setaffinity``, what
``taskset -c 0`` does) when the platform allows it, and the background thread (or task)
shares that core: its renewals are part of what is measured.

The gateway must serve a plan whose limits on the metric allow leases, e.g.::

    chargepath serve --plans loadtest/lease-plans.yaml --port 50051
    python -m loadtest lease-local --target 127.0.0.1:50051 \
        --api-key "$(cat .chargepath/operator.key)"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chargepath_client import AsyncClient, ChargepathError, Client, Lease

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_ROUNDS = 5
#: Calls per timed chunk: long enough that reading the clock costs nothing, short enough to
#: stop near the round's duration.
CHUNK = 100_000
#: The issue's target for local decisions on one core.
TARGET_PER_S = 1_000_000


@dataclass
class Round:
    """One round: the lease's calls and time, then the ceiling's, same number of calls."""

    calls: int
    lease_s: float
    allowed: int
    ceiling_s: float

    @property
    def lease_per_s(self) -> float:
        return self.calls / self.lease_s

    @property
    def ceiling_per_s(self) -> float:
        return self.calls / self.ceiling_s


@dataclass
class Result:
    client: str
    target: str
    tenant: str
    metric: str
    units: int
    cpu: int | None
    machine: dict[str, Any]
    rounds: list[Round] = field(default_factory=list)
    answers: int = 0
    spent: int = 0
    unreported_after_close: int = 0

    def summary(self) -> dict[str, float]:
        lease = statistics.median(r.lease_per_s for r in self.rounds)
        ceiling = statistics.median(r.ceiling_per_s for r in self.rounds)
        allowed = sum(r.allowed for r in self.rounds) / sum(r.calls for r in self.rounds)
        return {
            "lease_decisions_per_s": lease,
            "ceiling_calls_per_s": ceiling,
            "ratio": lease / ceiling,
            "allowed_share": allowed,
        }


def add_parser(sub: Any) -> None:
    """Register ``lease-local`` on the ``python -m loadtest`` subcommands."""
    p = sub.add_parser(
        "lease-local",
        help="Lease.try_acquire decisions per second on one core (background renewal against "
        "a live gateway), and the ratio to a bare loop of empty calls",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"gateway ({DEFAULT_TARGET})")
    p.add_argument(
        "--api-key",
        default=os.environ.get("CHARGEPATH_API_KEY"),
        help="API key (default $CHARGEPATH_API_KEY; empty: none)",
    )
    p.add_argument("--tls-ca", default=None, metavar="FILE", help="CA of the gateway (TLS)")
    p.add_argument("--tenant", default="lease-bench", help="tenant (lease-bench)")
    p.add_argument("--metric", default="api.sms.send", help="metric (api.sms.send)")
    p.add_argument("--key", default="", help="API key subject part (none)")
    p.add_argument("--units", type=int, default=1_000_000, help="units asked per grant (1000000)")
    p.add_argument("--client", choices=("sync", "async"), default="sync", help="sync (Lease)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of lease calls (10)")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="rounds (5)")
    p.add_argument("--cpu", type=int, default=0, help="the CPU to pin to (0); -1: no pinning")
    p.add_argument("--json", default="", metavar="FILE", help="write the result as JSON")
    p.add_argument(
        "--min-per-s",
        type=float,
        default=0.0,
        help="exit 1 if the median lease rate is below this (0: never)",
    )


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu_model": model or platform.processor(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "load_average_1m_at_start": round(load[0], 2),
    }


def pin(cpu: int) -> int | None:
    if cpu < 0 or not hasattr(os, "sched_setaffinity"):
        return None
    os.sched_setaffinity(0, {cpu})
    return cpu


def _empty() -> None:
    pass


def ceiling_loop(calls: int) -> float:
    """Seconds for `calls` calls of an empty function in a bare loop."""
    f = _empty
    started = time.perf_counter()
    for _ in range(calls):
        f()
    return time.perf_counter() - started


def lease_chunk(acquire: Callable[[], bool], calls: int) -> tuple[float, int]:
    """Seconds for `calls` calls of `acquire`, and how many it allowed."""
    allowed = 0
    started = time.perf_counter()
    for _ in range(calls):
        if acquire():
            allowed += 1
    return time.perf_counter() - started, allowed


def _measure_round(acquire: Callable[[], bool], seconds: float) -> Round:
    calls = 0
    spent_s = 0.0
    allowed = 0
    while spent_s < seconds:
        took, ok = lease_chunk(acquire, CHUNK)
        spent_s += took
        allowed += ok
        calls += CHUNK
    return Round(calls=calls, lease_s=spent_s, allowed=allowed, ceiling_s=ceiling_loop(calls))


def run_sync(args: argparse.Namespace, result: Result) -> None:
    with (
        Client(args.target, api_key=args.api_key, tls_ca=args.tls_ca) as client,
        client.lease(args.tenant, args.metric, units=args.units, key=args.key) as lease,
    ):
        _rounds(lease, args, result)
        result.spent = lease.spent
        answers = lease.answers
    result.answers = answers + 1  # the release
    result.unreported_after_close = lease.unreported


def run_async(args: argparse.Namespace, result: Result) -> None:
    async def main() -> None:
        async with (
            AsyncClient(args.target, api_key=args.api_key, tls_ca=args.tls_ca) as client,
            client.lease(args.tenant, args.metric, units=args.units, key=args.key) as lease,
        ):
            # The background task runs between chunks: the loop yields after each one.
            for _ in range(args.rounds):
                seconds = args.duration / args.rounds
                calls = 0
                spent_s = 0.0
                allowed = 0
                while spent_s < seconds:
                    took, ok = lease_chunk(lease.try_acquire, CHUNK)
                    spent_s += took
                    allowed += ok
                    calls += CHUNK
                    await asyncio.sleep(0)
                result.rounds.append(Round(calls, spent_s, allowed, ceiling_loop(calls)))
                _print_round(len(result.rounds), result.rounds[-1])
            result.spent = lease.spent
            answers = lease.answers
        result.answers = answers + 1
        result.unreported_after_close = lease.unreported

    asyncio.run(main())


def _rounds(lease: Lease, args: argparse.Namespace, result: Result) -> None:
    for _ in range(args.rounds):
        r = _measure_round(lease.try_acquire, args.duration / args.rounds)
        result.rounds.append(r)
        _print_round(len(result.rounds), r)


def _print_round(number: int, r: Round) -> None:
    print(
        f"round {number}: lease {r.lease_per_s:,.0f} decisions/s ({r.allowed:,} of "
        f"{r.calls:,} allowed), ceiling {r.ceiling_per_s:,.0f} calls/s, ratio "
        f"{r.lease_per_s / r.ceiling_per_s:.3f}",
        flush=True,
    )


def run(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.duration <= 0 or args.units < 1:
        print("lease-local: --rounds, --duration and --units must be positive", file=sys.stderr)
        return 2
    cpu = pin(args.cpu)
    result = Result(
        client=args.client,
        target=args.target,
        tenant=args.tenant,
        metric=args.metric,
        units=args.units,
        cpu=cpu,
        machine=machine(),
    )
    print(
        f"lease-local: {args.client} client, {args.tenant}/{args.metric}, {args.units:,} units "
        f"a grant, {args.rounds} rounds of {args.duration / args.rounds:g} s, "
        f"{'pinned to CPU ' + str(cpu) if cpu is not None else 'not pinned'}; "
        f"{result.machine['cpu_model']} ({result.machine['cpus']} CPUs), Python "
        f"{result.machine['python']}",
        flush=True,
    )
    args.api_key = args.api_key or None
    try:
        if args.client == "sync":
            run_sync(args, result)
        else:
            run_async(args, result)
    except ChargepathError as exc:
        print(f"lease-local: error: {exc}", file=sys.stderr)
        return 1
    summary = result.summary()
    print(
        f"median: {summary['lease_decisions_per_s']:,.0f} try_acquire decisions/s, ceiling "
        f"{summary['ceiling_calls_per_s']:,.0f} empty calls/s, ratio {summary['ratio']:.3f}; "
        f"allowed {summary['allowed_share']:.1%}; {result.answers} gateway answers "
        f"(open, renewals, reports, release); spent {result.spent:,}, unreported after "
        f"close {result.unreported_after_close}; target {TARGET_PER_S:,}/s: "
        f"{'met' if summary['lease_decisions_per_s'] >= TARGET_PER_S else 'NOT met'}",
        flush=True,
    )
    if args.json:
        document = {**asdict(result), "summary": summary}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    if result.unreported_after_close:
        print("lease-local: units left unreported after close", file=sys.stderr)
        return 1
    if args.min_per_s and summary["lease_decisions_per_s"] < args.min_per_s:
        return 1
    return 0
