"""``chargepath check``: send one usage to a running gateway and print its verdict.

Exit status: 0 for ALLOW (or any verdict with ``--json``), 3 for THROTTLE or DENY, 1 when the
call itself fails (its gRPC status is printed), 2 for a malformed flag."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

import grpc
from grpc_status import rpc_status

from chargepath.cli import connection, render, values
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="ask a running gateway for a verdict",
        description="Send one usage to a gateway and print its verdict.",
    )
    connection.add_options(p)
    p.add_argument("--tenant", required=True)
    p.add_argument("--metric", required=True)
    p.add_argument("--amount", type=values.INT64, default=1)
    p.add_argument("--slice", default="")
    p.add_argument("--key", default="")
    p.add_argument("--report", action="store_true", help="MODE_REPORT (default MODE_ADMIT)")
    p.add_argument("--request-id", help="default: a new UUID")
    p.add_argument(
        "--label", action="append", default=[], metavar="K=V", type=values.label, help="repeatable"
    )
    p.add_argument("--timeout", type=values.seconds, default=5.0, help="deadline in seconds")
    p.add_argument(
        "--json", action="store_true", help="print the verdict as JSON (README: JSON output)"
    )


def run(args: argparse.Namespace) -> int:
    labels = dict(args.label)
    usage = pb.Usage(
        request_id=args.request_id or str(uuid.uuid4()),
        subject=pb.Subject(tenant=args.tenant, slice=args.slice, key=args.key),
        metric=args.metric,
        amount=args.amount,
        mode=pb.MODE_REPORT if args.report else pb.MODE_ADMIT,
        labels=labels,
    )
    try:
        channel = connection.open_channel(args)
    except connection.ConnectionOptionError as exc:
        print(f"chargepath: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = pb_grpc.MeteringServiceStub(channel)
        try:
            response = stub.Check(pb.CheckRequest(usage=usage), timeout=args.timeout)
        except grpc.RpcError as err:
            code = err.code()
            status = rpc_status.from_call(err)
            print(f"chargepath: {connection.describe_error(err, args)}", file=sys.stderr)
            if status is not None and args.json:
                print(json.dumps({"code": code.name, "message": status.message}))
            return 1
        v = response.verdict
        if args.json:
            print(json.dumps(render.plain(v), indent=2))
            return 0
        render.verdict(render.console(120), v, _unit(channel, args.metric, args.timeout))
    return 0 if v.decision == pb.DECISION_ALLOW else 3


def _unit(channel: grpc.Channel, metric: str, timeout: float) -> str:
    """The metric's catalog unit, when the key may read the policy (operators); else ""."""
    try:
        r = apb_grpc.AdminServiceStub(channel).GetPolicy(apb.GetPolicyRequest(), timeout=timeout)
        doc = json.loads(r.document) if r.document else {}
    except (grpc.RpcError, ValueError):
        return ""
    units = {m.get("name"): m.get("unit") or "" for m in doc.get("metrics") or ()}
    return units.get(metric, "")
