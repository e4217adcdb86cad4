"""``python -m loadtest``: the commands, their options, and the end-of-run reports."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

from rich.console import Console
from rich.markup import escape

from loadtest import alternate, chaos, credentials, gogen, lease_local, processes, report
from loadtest.runner import (
    InterleavedTarget,
    Measurement,
    PhasePlan,
    WorkerError,
    WorkerPool,
    measure,
    measure_interleaved,
)
from loadtest.worker import FlowSpec, TargetSpec, WorkerSpec
from loadtest.workload import WorkloadError, load_workload, require_rls_route

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
DEFAULT_PLANS = REPO_DIR / "examples" / "plans.yaml"
DEFAULT_OUT = PACKAGE_DIR / "results"
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_RATE = 1000.0
SMOKE_RATE = 100.0
SMOKE_SECONDS = 10.0
REDACTED = "(redacted)"

Scenario = Literal["check", "stream", "mixed", "rls", "over-limit", "leased-hot"]
SCENARIOS: tuple[Scenario, ...] = ("check", "stream", "mixed", "rls", "over-limit", "leased-hot")
#: What the ceilings can run: they answer no RLS call.
CEILING_SCENARIOS: tuple[Scenario, ...] = ("check", "stream", "mixed", "over-limit", "leased-hot")
#: The plan files of ``over-limit`` and ``leased-hot`` unless ``--plans`` names another.
OVERLIMIT_PLANS = PACKAGE_DIR / "overlimit-plans.yaml"
LEASED_PLANS = PACKAGE_DIR / "leased-plans.yaml"
DEFAULT_ROUNDS = 3


class Target(NamedTuple):
    """One measurement of a run: what to load (``kind``: the gateway at ``address``, or a
    ceiling started for it) with which scenario; ``turn`` places it in an ``alternate`` run."""

    label: str
    kind: str
    address: str
    scenario: Scenario
    turn: alternate.Turn | None = None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    load = common.add_argument_group("load")
    load.add_argument(
        "--rate",
        type=float,
        default=None,
        help=f"offered usages per second, all workers together (default {DEFAULT_RATE:g}; "
        f"{SMOKE_RATE:g} with --smoke); the start rate of --find-max",
    )
    load.add_argument("--duration", type=float, default=30.0, help="seconds measured (30)")
    load.add_argument(
        "--warmup", type=float, default=2.0, help="seconds at the rate before measuring (2)"
    )
    load.add_argument(
        "--drain",
        type=float,
        default=5.0,
        help="seconds to wait for answers after a phase; the rest count as incomplete (5)",
    )
    load.add_argument("--procs", type=int, default=2, help="worker processes (2)")
    load.add_argument(
        "--connections", type=int, default=2, help="gRPC channels (TCP connections) per worker (2)"
    )
    load.add_argument(
        "--streams", type=int, default=4, help="StreamUsage streams, all workers together (4)"
    )
    load.add_argument("--batch", type=int, default=50, help="usages per stream message (50)")
    load.add_argument(
        "--check-share",
        type=float,
        default=0.5,
        help="mixed: the share of the usage rate sent as Check calls (0.5)",
    )
    load.add_argument(
        "--max-in-flight",
        type=int,
        default=20_000,
        help="outstanding operations per worker and flow; arrivals beyond are dropped (20000)",
    )
    load.add_argument(
        "--timeout", type=float, default=5.0, help="deadline of a Check call, seconds (5)"
    )
    load.add_argument(
        "--generator",
        choices=("python", "go"),
        default="python",
        help="what sends the Check calls to a gRPC target (the gateway, the echo ceiling): "
        "python (grpc.aio, in the worker) or go (clients/go/bin/chargepath-loadgen, built by "
        "scripts/setup-go.sh; much less CPU per call). Streams and the Redis ceiling are always "
        "python (default python)",
    )
    subjects = common.add_argument_group("subjects")
    subjects.add_argument(
        "--tenants",
        choices=("many", "hot"),
        default="many",
        help="many: usages spread over --keys keys and every slice; hot: one key, one slice",
    )
    subjects.add_argument("--keys", type=int, default=1000, help="distinct keys with many (1000)")
    subjects.add_argument(
        "--plans",
        type=Path,
        default=DEFAULT_PLANS,
        help="the plan file the gateway serves: tenants and slices come from it "
        "(examples/plans.yaml; loadtest/bench-plans.yaml has limits that never throttle)",
    )
    subjects.add_argument("--check-tenant", default="cpaas-demo")
    subjects.add_argument("--check-metric", default="api.sms.send")
    subjects.add_argument("--check-amount", type=int, default=1)
    subjects.add_argument("--stream-tenant", default="mvno-demo")
    subjects.add_argument("--stream-metric", default="slice.bytes")
    subjects.add_argument("--stream-amount", type=int, default=1500)
    subjects.add_argument(
        "--rls-domain",
        default="cpaas-edge",
        help="rls: the Envoy domain of the requests; the plan file's envoy section must map its "
        "descriptor [tenant, api_key, route] to --check-tenant, the key and --check-metric "
        "(cpaas-edge)",
    )
    subjects.add_argument(
        "--rls-route", default="sms-send", help="rls: the value of the route entry (sms-send)"
    )
    subjects.add_argument(
        "--view",
        choices=["full", "basic"],
        default="full",
        help="VerdictView of every request: full (every verdict lists its limits, the default) "
        "or basic (an ALLOW lists none)",
    )
    subjects.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="gRPC metadata sent with every call (repeatable), e.g. credentials",
    )
    security = common.add_argument_group("credentials (gRPC targets: gateway, echo ceiling)")
    credentials.add_arguments(security)
    search = common.add_argument_group("find-max")
    search.add_argument(
        "--find-max",
        action="store_true",
        help="raise the rate step by step from --rate; report the highest sustainable one",
    )
    search.add_argument("--step-seconds", type=float, default=10.0, help="seconds per step (10)")
    search.add_argument("--step-factor", type=float, default=1.5, help="rate factor per step (1.5)")
    search.add_argument("--max-steps", type=int, default=12, help="at most this many steps (12)")
    search.add_argument(
        "--step-retries",
        type=int,
        default=0,
        help="measure a rate that failed up to this many more times before the search ends "
        "there (0); the same rule for the gateway and the ceilings",
    )
    search.add_argument(
        "--p99-bound-ms", type=float, default=10.0, help="a step with a higher p99 fails (10)"
    )
    search.add_argument(
        "--min-ratio",
        type=float,
        default=0.95,
        help="a step achieving less than this share of the offered rate fails (0.95)",
    )
    output = common.add_argument_group("output")
    output.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="directory of the JSON and PNG reports"
    )
    output.add_argument("--name", help="file name stem of the reports (default: time-command)")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    output.add_argument(
        "--smoke",
        action="store_true",
        help=f"a {SMOKE_SECONDS:g}-second run at a low rate; fails (exit 1) unless decisions "
        "came back, without errors, and the reports were written",
    )

    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Open-loop load generator for the Chargepath gateway. Latency is measured "
        "from each request's intended send time, so a slow server cannot hide behind a slow "
        "client (no coordinated omission).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    target_help = f"gateway address (default {DEFAULT_TARGET})"
    scenario_help = {
        "check": "unary Check calls, MODE_ADMIT (a CPaaS API gateway)",
        "stream": "StreamUsage streams of batches, MODE_REPORT (a slice controller)",
        "mixed": "both at once, split by --check-share",
        "rls": "Envoy's ShouldRateLimit (RLS v3), one descriptor [tenant, api_key, route] per "
        "call: the admits of check, as Envoy asks them",
        "over-limit": "the Check calls of check, every one for one subject whose bucket is "
        "empty for an hour (loadtest/overlimit-plans.yaml, --tenants hot): what a gateway "
        "with --overlimit-cache answers without Redis",
        "leased-hot": "the Check calls of check, every one for one subject whose limits let "
        "the gateway hold a lease (loadtest/leased-plans.yaml, --tenants hot): answered from "
        "the lease, reported in the background",
    }
    pid_help = (
        "a process id of the gateway, to report its CPU time per usage (Linux /proc); repeat "
        "it for every process that serves (e.g. each worker): their CPU times add up"
    )
    for name in SCENARIOS:
        p = sub.add_parser(name, parents=[common], help=scenario_help[name])
        p.add_argument("--target", default=DEFAULT_TARGET, help=target_help)
        p.add_argument("--target-pid", type=int, action="append", default=[], help=pid_help)
    ceiling = sub.add_parser(
        "ceiling",
        parents=[common],
        help="what this machine can do without the gateway: Redis running the decision script, "
        "and a bare gRPC echo server",
    )
    compare = sub.add_parser(
        "compare",
        parents=[common],
        help="the ceilings and the gateway in one run, and the ratio gateway/ceiling",
    )
    for p in (ceiling, compare):
        p.add_argument("--scenario", choices=CEILING_SCENARIOS, default="check")
        p.add_argument(
            "--only", choices=("redis", "echo"), help="run only this ceiling (default: both)"
        )
        p.add_argument(
            "--echo-tls-cert",
            default="",
            metavar="FILE",
            help="serve the echo ceiling over TLS with this certificate chain (PEM, with "
            "--echo-tls-key), to measure TLS against the ceiling; the client side trusts "
            "--tls-ca",
        )
        p.add_argument(
            "--echo-tls-key", default="", metavar="FILE", help="the echo ceiling's private key"
        )
    compare.add_argument("--target", default=DEFAULT_TARGET, help=target_help)
    compare.add_argument("--target-pid", type=int, action="append", default=[], help=pid_help)
    compare.add_argument(
        "--interleave",
        action="store_true",
        help="with --find-max: run the ceilings' and the gateway's searches in lockstep (each "
        "one's step N, then each one's step N+1 in the reverse order), so that the steps "
        "compared run seconds apart, not minutes",
    )
    ceiling.set_defaults(target_pid=[], interleave=False)
    chaos.add_parser(sub)
    lease_local.add_parser(sub)
    redraw = sub.add_parser(
        "redraw",
        help="draw the PNGs of a report's JSON again, in the current layout (no load is sent)",
    )
    redraw.add_argument("report", type=Path, help="a JSON report this command wrote")
    redraw.add_argument(
        "--out", type=Path, default=None, help="folder of the PNGs (default: the JSON's)"
    )
    alternating = sub.add_parser(
        "alternate",
        parents=[common],
        help="several scenarios against one gateway in alternating rounds at one rate, with "
        "the gateway's CPU per usage (--target-pid) and its ratio to the first scenario's",
    )
    alternating.add_argument(
        "--scenarios",
        type=_scenario_list,
        default=("check", "rls"),
        metavar="A,B,...",
        help="the scenarios, comma-separated; ratios are to the first (check,rls)",
    )
    alternating.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help=f"rounds; each runs every scenario once, even rounds in reverse order "
        f"({DEFAULT_ROUNDS})",
    )
    alternating.add_argument("--target", default=DEFAULT_TARGET, help=target_help)
    alternating.add_argument("--target-pid", type=int, action="append", default=[], help=pid_help)
    return parser


def _scenario_list(text: str) -> tuple[Scenario, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or len(names) < 2 or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected two or more different scenarios of {', '.join(SCENARIOS)}"
        )
    return cast(tuple[Scenario, ...], names)


def scenarios_of(args: argparse.Namespace) -> tuple[Scenario, ...]:
    """The scenarios a command runs."""
    if args.command == "alternate":
        return tuple(args.scenarios)
    return (args.command if args.command in SCENARIOS else args.scenario,)


def flows_for(
    scenario: Scenario, args: argparse.Namespace, generator: Literal["python", "go"] = "python"
) -> tuple[FlowSpec, ...]:
    """The flows of ``scenario``; ``generator`` sends the check flow's calls."""
    check = FlowSpec("check", "check", 1.0, 1, generator=generator)
    stream = FlowSpec("stream", "stream", 1.0, args.batch, args.streams)
    if scenario in ("check", "over-limit", "leased-hot"):
        return (check,)
    if scenario == "rls":
        return (FlowSpec("rls", "rls", 1.0, 1),)
    if scenario == "stream":
        return (stream,)
    return (
        FlowSpec("check", "check", args.check_share, 1, generator=generator),
        FlowSpec("stream", "stream", 1.0 - args.check_share, args.batch, args.streams),
    )


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            parser.error(message)

    need(args.rate > 0, "--rate must be positive")
    need(args.duration > 0, "--duration must be positive")
    need(args.warmup >= 0 and args.drain >= 0, "--warmup and --drain must not be negative")
    need(args.procs >= 1 and args.connections >= 1, "--procs and --connections must be >= 1")
    need(1 <= args.batch <= 1000, "--batch must be between 1 and 1000 (the contract's bound)")
    need(0.0 <= args.check_share <= 1.0, "--check-share must be between 0 and 1")
    need(args.max_in_flight >= 1, "--max-in-flight must be >= 1")
    need(args.keys >= 1, "--keys must be >= 1")
    need(args.step_factor > 1, "--step-factor must be above 1")
    need(args.step_seconds > 0 and args.max_steps >= 1, "--step-seconds/--max-steps too small")
    need(args.step_retries >= 0, "--step-retries must not be negative")
    if getattr(args, "interleave", False):
        need(args.find_max, "--interleave runs find-max searches in lockstep: add --find-max")
    scenarios = scenarios_of(args)
    if {"stream", "mixed"} & set(scenarios):
        need(
            args.streams >= args.procs,
            f"--streams ({args.streams}) must be at least --procs ({args.procs}): every worker "
            "drives its own streams",
        )
    for item in args.metadata:
        need("=" in item, f"--metadata {item!r}: expected KEY=VALUE")
    for problem in credentials.from_args(args).problems():
        parser.error(problem)
    echo_tls = (getattr(args, "echo_tls_cert", ""), getattr(args, "echo_tls_key", ""))
    need(all(echo_tls) or not any(echo_tls), "--echo-tls-cert and --echo-tls-key go together")
    if args.command == "alternate":
        need(args.rounds >= 1, "--rounds must be >= 1")
        need(not args.find_max, "alternate measures every scenario at one rate: no --find-max")
    if args.generator == "go":
        for no_check in ("stream", "rls"):
            need(
                no_check not in scenarios,
                f"--generator go sends Check calls only: the {no_check} scenario has none",
            )
        try:
            gogen.require_binary()
        except gogen.GoGeneratorError as exc:
            parser.error(str(exc))


def _redacted(argv: list[str], api_key: str) -> list[str]:
    """``argv`` without the API key: reports are shared, keys are secrets. (By value, not by
    option name: argparse also takes an abbreviation such as ``--api``.)"""
    if not api_key:
        return argv
    return [arg.replace(api_key, REDACTED) for arg in argv]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@contextlib.contextmanager
def _target(
    kind: str, address: str, pids: Sequence[int], args: argparse.Namespace
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """The address (and process ids, when known) of what to load, started if it is ours."""
    if kind == "redis":
        with processes.redis_server() as (where, pid):
            yield where, (pid,)
    elif kind == "echo":
        with processes.echo_server(
            tls_cert=getattr(args, "echo_tls_cert", ""), tls_key=getattr(args, "echo_tls_key", "")
        ) as (where, pid):
            yield where, (pid,)
    else:
        yield address, tuple(pids)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "chaos":
        return chaos.run(args, list(argv if argv is not None else sys.argv[1:]))
    if args.command == "lease-local":
        return lease_local.run(args)
    if args.command == "redraw":
        for path in report.redraw(args.report, args.out):
            print(f"wrote {path}")
        return 0
    if args.rate is None:
        args.rate = SMOKE_RATE if args.smoke else DEFAULT_RATE
    scenarios = scenarios_of(args)
    if "over-limit" in scenarios:
        # one subject, its bucket empty after the first admit: every later Check is refused
        args.tenants = "hot"
        if args.plans == DEFAULT_PLANS:
            args.plans = OVERLIMIT_PLANS
    if "leased-hot" in scenarios:
        # one subject, its limits leased by the gateway: Checks answered from the lease
        args.tenants = "hot"
        if args.plans == DEFAULT_PLANS:
            args.plans = LEASED_PLANS
    targets = _targets(args)
    if args.smoke:
        args.duration = max(2.0, SMOKE_SECONDS / len(targets))
        args.warmup = 0.0
        args.find_max = False
    _validate(args, parser)
    try:
        workload = load_workload(
            args.plans,
            spread=args.tenants,
            keys=args.keys,
            check_tenant=args.check_tenant,
            check_metric=args.check_metric,
            check_amount=args.check_amount,
            stream_tenant=args.stream_tenant,
            stream_metric=args.stream_metric,
            stream_amount=args.stream_amount,
            view=args.view,
            rls_domain=args.rls_domain,
            rls_route=args.rls_route,
        )
        if "rls" in scenarios:
            require_rls_route(workload)
    except WorkloadError as exc:
        parser.error(str(exc))

    # Off a terminal (CI logs, tests) rich would wrap the tables at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=180)
    run_id = uuid.uuid4().hex[:10]
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    plan = PhasePlan(
        rate=args.rate,
        duration=args.duration,
        warmup_s=args.warmup,
        drain_s=args.drain,
        find_max=args.find_max,
        step_seconds=args.step_seconds,
        step_factor=args.step_factor,
        max_steps=args.max_steps,
        step_retries=args.step_retries,
        p99_bound_ms=args.p99_bound_ms,
        min_ratio=args.min_ratio,
    )
    metadata = tuple((k, v) for k, _, v in (item.partition("=") for item in args.metadata))
    measurements: list[Measurement] = []
    played: list[tuple[alternate.Turn, Measurement]] = []
    failure = None

    def worker_spec(kind: str, where: str, scenario: Scenario) -> WorkerSpec:
        return WorkerSpec(
            target=TargetSpec(
                kind="redis" if kind == "redis" else "grpc",
                address=where,
                connections=args.connections,
                timeout_s=args.timeout,
                metadata=metadata,
                credentials=credentials.from_args(args),
            ),
            flows=flows_for(scenario, args, "python" if kind == "redis" else args.generator),
            workload=workload,
            run_id=run_id,
            max_in_flight=args.max_in_flight,
        )

    try:
        if getattr(args, "interleave", False):
            with contextlib.ExitStack() as stack:
                live = []
                for label, kind, address, scenario, _ in targets:
                    where, pids = stack.enter_context(_target(kind, address, args.target_pid, args))
                    pool = stack.enter_context(
                        WorkerPool(worker_spec(kind, where, scenario), args.procs)
                    )
                    live.append(InterleavedTarget(pool, label, where, pids))
                measurements = measure_interleaved(
                    live, plan, console, show_progress=not args.quiet
                )
            for m in measurements:
                report.print_measurement(console, m)
            targets = []
        for label, kind, address, scenario, turn in targets:
            with _target(kind, address, args.target_pid, args) as (where, pids):
                spec = worker_spec(kind, where, scenario)
                with WorkerPool(spec, args.procs) as pool:
                    m = measure(
                        pool,
                        label,
                        where,
                        plan,
                        console,
                        show_progress=not args.quiet,
                        target_pids=pids,
                    )
            measurements.append(m)
            if turn is not None:
                played.append((turn, m))
            report.print_measurement(console, m)
    except (WorkerError, TimeoutError, RuntimeError) as exc:
        failure = str(exc)
        console.print(f"[red]error: {escape(failure)}[/red]")
        if not measurements:
            return 1

    document: dict[str, Any] = {
        "tool": "chargepath-loadtest",
        "command": args.command,
        "scenario": ",".join(scenarios),
        "argv": _redacted(list(argv if argv is not None else sys.argv[1:]), args.api_key),
        "run_id": run_id,
        "started_at": started_at,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "error": failure,
        "machine": {
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": {
            k: str(v) if isinstance(v, Path) else REDACTED if k == "api_key" and v else v
            for k, v in vars(args).items()
        },
        "measurements": [report.measurement_json(m) for m in measurements],
    }
    gateway = next((m for m in measurements if m.label == "gateway"), None)
    ceilings = [m for m in measurements if m.label != "gateway"]
    if gateway is not None and ceilings:
        rows = report.comparison_rows(gateway, ceilings)
        report.print_comparison(console, rows, args.find_max)
        document["comparison"] = rows
    if args.command == "alternate":
        document["alternation"] = alternate.summary(played, scenarios)
        alternate.print_summary(console, document["alternation"])

    stem = args.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{args.command}-{'-'.join(scenarios)}"
    written = [args.out / f"{stem}.json"]
    report.write_json(written[0], document)
    run = report.RunInfo(scenario, started_at, platform.node(), os.cpu_count())
    for m in measurements:
        written.append(args.out / f"{stem}-{_slug(m.label)}.png")
        report.plot(written[-1], m, run)
    for path in written:
        console.print(f"wrote {path}")

    if failure is not None:
        return 1
    if args.smoke:
        return _smoke_verdict(console, measurements, written)
    return 0


def _targets(args: argparse.Namespace) -> list[Target]:
    """What to measure, in order: ceilings first, then the gateway; for ``alternate``, the
    gateway once per scenario and round."""
    if args.command == "alternate":
        return [
            Target(alternate.label(turn), "grpc", args.target, cast(Scenario, turn.scenario), turn)
            for turn in alternate.turns(args.scenarios, args.rounds)
        ]
    (scenario,) = scenarios_of(args)
    targets: list[Target] = []
    if args.command in ("ceiling", "compare"):
        if args.only in (None, "redis"):
            targets.append(Target("redis ceiling", "redis", "", scenario))
        if args.only in (None, "echo"):
            targets.append(Target("echo ceiling", "echo", "", scenario))
    if args.command != "ceiling":
        targets.append(Target("gateway", "grpc", args.target, scenario))
    return targets


def _smoke_verdict(console: Console, measurements: list[Measurement], written: list[Path]) -> int:
    problems = [f"{p} was not written" for p in written if not p.is_file()]
    for m in measurements:
        decided = sum(p.decided_usages for p in m.phases)
        errors = sum(p.error_ops for p in m.phases)
        if decided == 0:
            problems.append(f"{m.label}: no decision came back")
        if errors:
            problems.append(f"{m.label}: {errors} operations failed")
    for problem in problems:
        console.print(f"[red]smoke: {problem}[/red]")
    if not problems:
        console.print("[green]smoke: ok[/green]")
    return 1 if problems else 0
