"""The ``chargepath`` command: ``serve`` runs a gateway, ``check`` asks one for a verdict."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import uuid
from typing import TYPE_CHECKING, Any

from chargepath import __version__
from chargepath.settings import Settings

if TYPE_CHECKING:
    from chargepath.telemetry import Telemetry

log = logging.getLogger("chargepath")


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Without --redis-url it starts an embedded redis-server "
        "with its data and AOF under --data-dir. Flags override CHARGEPATH_* variables.",
    )
    p.add_argument("--plans", help="policy file (YAML) to publish at start")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 50051; 0 picks one)")
    p.add_argument(
        "--workers", type=int, help="gateway processes sharing the port (default: one per core)"
    )
    p.add_argument("--redis-url", help="use this Redis/Valkey instead of the embedded one")
    p.add_argument(
        "--redis-cluster",
        action="store_true",
        default=None,
        help="--redis-url is a Redis Cluster node",
    )
    p.add_argument("--redis-sentinel", help="Redis Sentinel instead: host:port,host:port,...")
    p.add_argument("--redis-master", help="with --redis-sentinel: the monitored master's name")
    p.add_argument("--redis-wait-replicas", type=int, help="WAIT for N replicas per decision batch")
    p.add_argument("--redis-wait-timeout-ms", type=int, help="WAIT's timeout (default 20)")
    p.add_argument("--data-dir", help="folder of the embedded Redis (default .chargepath)")
    p.add_argument("--store-timeout-ms", type=int, help="bound on every store call (default 50)")
    p.add_argument("--dedup-window-s", type=int, help="request id dedup window (default 600)")
    p.add_argument("--redis-fsync", choices=["everysec", "always"], help="embedded AOF fsync")
    p.add_argument(
        "--otel",
        choices=["none", "console", "otlp"],
        help="trace and metric exporter when OTEL_TRACES_EXPORTER/OTEL_METRICS_EXPORTER are unset",
    )
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--log-format", choices=["json", "text"])
    p.add_argument("--log-level")


def _check_parser(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="ask a running gateway for a verdict",
        description="Send one usage to a gateway and print its verdict.",
    )
    p.add_argument("--target", default="127.0.0.1:50051", help="gateway address")
    p.add_argument("--tenant", required=True)
    p.add_argument("--metric", required=True)
    p.add_argument("--amount", type=int, default=1)
    p.add_argument("--slice", default="")
    p.add_argument("--key", default="")
    p.add_argument("--report", action="store_true", help="MODE_REPORT (default MODE_ADMIT)")
    p.add_argument("--request-id", help="default: a new UUID")
    p.add_argument("--label", action="append", default=[], metavar="K=V")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chargepath", description=__doc__)
    parser.add_argument("--version", action="version", version=f"chargepath {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _check_parser(sub)
    from chargepath.cli_admin import COMMANDS, add_admin_parsers, run_admin
    from chargepath.cli_ledger import add_ledger_parser, run_ledger

    add_admin_parsers(sub)
    add_ledger_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command in COMMANDS:
        return run_admin(args)
    if args.command == "ledger":
        return run_ledger(args)
    return check(args)


def serve(args: argparse.Namespace) -> int:
    from chargepath import telemetry
    from chargepath.core.plans import PolicyError
    from chargepath.logs import configure_logging

    try:
        settings = Settings.from_env(
            plans=args.plans,
            host=args.host,
            port=args.port,
            workers=args.workers,
            redis_url=args.redis_url,
            redis_cluster=args.redis_cluster,
            redis_sentinel=args.redis_sentinel,
            redis_master=args.redis_master,
            redis_wait_replicas=args.redis_wait_replicas,
            redis_wait_timeout_ms=args.redis_wait_timeout_ms,
            data_dir=args.data_dir,
            store_timeout_ms=args.store_timeout_ms,
            dedup_window_s=args.dedup_window_s,
            redis_fsync=args.redis_fsync,
            log_format=args.log_format,
            log_level=args.log_level,
            otel=args.otel,
            metrics_port=args.metrics_port,
        )
    except ValueError as exc:
        print(f"chargepath: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    if settings.workers == 0:
        settings.workers = os.cpu_count() or 1
    try:
        if settings.workers > 1:
            from chargepath.supervisor import supervise

            return supervise(settings)
        otel = telemetry.setup(
            otel=settings.otel,
            metrics_port=settings.metrics_port,
            metrics_host=settings.metrics_host,
        )
        try:
            run_gateway(settings, otel.telemetry)
        finally:
            otel.shutdown()
    except (PolicyError, FileNotFoundError) as exc:
        print(f"chargepath: {exc}", file=sys.stderr)
        return 2
    return 0


def run_gateway(settings: Settings, telemetry: Telemetry) -> None:
    """One gateway process: serve until SIGTERM/SIGINT."""
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(_serve(settings, telemetry))


async def _serve(settings: Settings, telemetry: Telemetry) -> None:
    from chargepath.app import Gateway

    gateway = Gateway(settings, telemetry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gateway.start()
        await stop.wait()
    finally:
        await gateway.stop()


def check(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict
    from grpc_status import rpc_status

    from chargepath_protos.v1 import metering_pb2 as pb
    from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc

    labels = dict(item.split("=", 1) for item in args.label if "=" in item)
    usage = pb.Usage(
        request_id=args.request_id or str(uuid.uuid4()),
        subject=pb.Subject(tenant=args.tenant, slice=args.slice, key=args.key),
        metric=args.metric,
        amount=args.amount,
        mode=pb.MODE_REPORT if args.report else pb.MODE_ADMIT,
        labels=labels,
    )
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.MeteringServiceStub(channel)
        try:
            response = stub.Check(pb.CheckRequest(usage=usage), timeout=args.timeout)
        except grpc.RpcError as err:
            code = err.code()
            status = rpc_status.from_call(err)
            print(f"chargepath: {code.name}: {err.details()}", file=sys.stderr)
            if status is not None and args.json:
                print(json.dumps({"code": code.name, "message": status.message}))
            return 1
    v = response.verdict
    if args.json:
        print(json.dumps(MessageToDict(v, preserving_proto_field_name=True), indent=2))
        return 0
    _render(v)
    return 0 if v.decision == pb.DECISION_ALLOW else 3


def _render(v: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from chargepath.cli_admin import human_ms as human
    from chargepath_protos.v1 import metering_pb2 as pb

    colour = {pb.DECISION_ALLOW: "green", pb.DECISION_THROTTLE: "yellow"}.get(v.decision, "red")
    console = Console(width=None if sys.stdout.isatty() else 120)
    decision = pb.Decision.Name(v.decision).removeprefix("DECISION_")
    reason = pb.Reason.Name(v.reason).removeprefix("REASON_")
    flags = [f for f in ("recorded", "degraded", "replayed") if getattr(v, f)]
    console.print(f"[bold {colour}]{decision}[/] {reason}  " + " ".join(flags))
    if v.HasField("retry_after"):
        console.print(f"retry after {human(v.retry_after.ToMilliseconds())}")
    if v.message:
        console.print(v.message)
    console.print(
        f"policy v{v.policy_version}  decision {v.decision_id}  trace {v.trace_id or '-'}"
    )
    if v.limits:
        t = Table("limit", "kind", "scope", "remaining", "capacity", "reset after", "")
        for lim in v.limits:
            t.add_row(
                lim.name,
                pb.LimitKind.Name(lim.kind).removeprefix("LIMIT_KIND_").lower(),
                pb.Scope.Name(lim.scope).removeprefix("SCOPE_").lower(),
                str(lim.remaining),
                str(lim.capacity),
                human(lim.reset_after.ToMilliseconds()),
                "[red]exceeded[/]" if lim.exceeded else ("soft" if lim.soft else ""),
            )
        console.print(t)


if __name__ == "__main__":
    sys.exit(main())
