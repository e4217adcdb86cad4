"""Admin commands of the ``chargepath`` CLI, over the gRPC AdminService of a running gateway:
``plans apply|list|show``, ``assign``, ``grant``, ``suspend``, ``resume``, ``failure-policy``,
``state``, ``explain`` and ``tail``."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.live import Live
from rich.table import Table

from chargepath.cli import connection, render
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import metering_pb2 as pb

COMMANDS = (
    "plans",
    "assign",
    "grant",
    "suspend",
    "resume",
    "failure-policy",
    "state",
    "explain",
    "tail",
)


def add_parsers(sub: Any) -> None:
    """Register the admin commands (:data:`COMMANDS`) on the ``chargepath`` subparsers."""

    def target(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        connection.add_options(p)
        p.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
        return p

    plans = sub.add_parser("plans", help="apply, list or show plans")
    psub = plans.add_subparsers(dest="plans_command", required=True)
    p = target(psub.add_parser("apply", help="publish a policy file (shows the diff first)"))
    p.add_argument("file")
    p.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")
    p.add_argument(
        "--prune",
        action="store_true",
        help="allow removing plans and tenants that are live but not in the file: shows them "
        "first and asks for confirmation",
    )
    p.add_argument("--yes", action="store_true", help="with --prune: do not ask")
    target(psub.add_parser("list", help="list the plans"))
    p = target(psub.add_parser("show", help="show one plan"))
    p.add_argument("name")

    p = target(sub.add_parser("assign", help="assign a plan to a tenant or a slice"))
    p.add_argument("tenant")
    p.add_argument("plan", help='plan name; "" removes the assignment')
    p.add_argument("--slice", default="")

    p = target(sub.add_parser("grant", help="top up a quota for its current period"))
    p.add_argument("--tenant", required=True)
    p.add_argument("--slice", default="")
    p.add_argument("--key", default="")
    p.add_argument("--limit", required=True, help="name of a quota limit")
    p.add_argument("--amount", type=int, required=True)
    p.add_argument("--expires", help="ISO 8601 time, or a duration from now: 30m, 2h, 1d")
    p.add_argument("--note", default="")

    for name, what in (("suspend", "DENY SUSPENDED at once"), ("resume", "lift a suspension")):
        p = target(sub.add_parser(name, help=f"{name} a tenant, slice or key: {what}"))
        p.add_argument("tenant")
        p.add_argument("--slice", default="")
        p.add_argument("--key", default="")
        if name == "suspend":
            p.add_argument("--reason", default="")

    p = target(sub.add_parser("failure-policy", help="set a tenant's failure policy"))
    p.add_argument("tenant")
    p.add_argument("mode", choices=["deny", "allow"])

    p = target(sub.add_parser("state", help="what decides for a subject, right now"))
    p.add_argument("tenant")
    p.add_argument("--slice", default="")
    p.add_argument("--key", default="")
    p.add_argument("--recent", type=int, default=10, help="how many recent decisions")
    p.add_argument("--watch", action="store_true", help="refresh every --interval seconds")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--json", action="store_true")

    p = target(sub.add_parser("explain", help="explain a decision by its id"))
    p.add_argument("decision_id")
    p.add_argument("--tenant", required=True)
    p.add_argument("--json", action="store_true")

    p = target(sub.add_parser("tail", help="follow a tenant's decisions and quota thresholds"))
    p.add_argument("--tenant", required=True)
    p.add_argument("--decision", action="append", default=[], choices=["ALLOW", "THROTTLE", "DENY"])
    p.add_argument("--reason", action="append", default=[], help="e.g. RATE_LIMITED")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run one admin command against ``--target``; returns the exit status."""
    out = render.console(140)
    try:
        channel = connection.open_channel(args)
    except connection.ConnectionOptionError as exc:
        print(f"chargepath: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = apb_grpc.AdminServiceStub(channel)
        try:
            return _dispatch(args, stub, out)
        except grpc.RpcError as err:
            print(f"chargepath: {connection.describe_error(err, args)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


def _dispatch(args: argparse.Namespace, stub: Any, console: Console) -> int:
    t = args.timeout
    cmd = args.command
    if cmd == "plans":
        if args.plans_command == "apply":
            return _apply(args, stub, console)
        if args.plans_command == "list":
            lr = stub.ListPlans(apb.ListPlansRequest(), timeout=t)
            table = Table("plan", "limits", "description", title=f"policy v{lr.policy_version}")
            for plan in lr.plans:
                table.add_row(
                    plan.name, ", ".join(lim.name for lim in plan.limits), plan.description
                )
            console.print(table)
            return 0
        gp = stub.GetPlan(apb.GetPlanRequest(name=args.name), timeout=t)
        data = MessageToDict(gp.plan, preserving_proto_field_name=True)
        print(yaml.safe_dump(data, sort_keys=False), end="")
        return 0
    if cmd == "assign":
        a = stub.AssignPlan(
            apb.AssignPlanRequest(tenant=args.tenant, slice=args.slice, plan=args.plan), timeout=t
        )
        console.print(f"policy version {a.policy_version}")
        return 0
    if cmd == "grant":
        req = apb.GrantRequest(
            subject=pb.Subject(tenant=args.tenant, slice=args.slice, key=args.key),
            limit=args.limit,
            amount=args.amount,
            note=args.note,
        )
        if args.expires:
            req.expires_at.CopyFrom(_parse_time(args.expires))
        g = stub.Grant(req, timeout=t)
        console.print(f"grant {g.grant_id}: capacity {g.capacity}, remaining {g.remaining}")
        return 0
    if cmd in ("suspend", "resume"):
        subject = pb.Subject(tenant=args.tenant, slice=args.slice, key=args.key)
        if cmd == "suspend":
            r2 = stub.Suspend(apb.SuspendRequest(subject=subject, reason=args.reason), timeout=t)
        else:
            r2 = stub.Resume(apb.ResumeRequest(subject=subject), timeout=t)
        console.print(f"policy version {r2.policy_version}")
        return 0
    if cmd == "failure-policy":
        mode = apb.FAILURE_MODE_DENY if args.mode == "deny" else apb.FAILURE_MODE_ALLOW
        f = stub.SetFailurePolicy(
            apb.SetFailurePolicyRequest(tenant=args.tenant, mode=mode), timeout=t
        )
        console.print(f"policy version {f.policy_version}")
        return 0
    if cmd == "state":
        req_s = apb.GetStateRequest(
            subject=pb.Subject(tenant=args.tenant, slice=args.slice, key=args.key),
            recent=args.recent,
        )
        if args.json:
            s = stub.GetState(req_s, timeout=t)
            print(json.dumps(MessageToDict(s, preserving_proto_field_name=True), indent=2))
            return 0
        if not args.watch:
            console.print(render.state(stub.GetState(req_s, timeout=t)))
            return 0
        with Live(console=console, auto_refresh=False) as live:
            while True:
                live.update(render.state(stub.GetState(req_s, timeout=t)), refresh=True)
                time.sleep(args.interval)
    if cmd == "explain":
        e = stub.ExplainDecision(
            apb.ExplainDecisionRequest(tenant=args.tenant, decision_id=args.decision_id), timeout=t
        )
        if e.HasField("lease"):  # a LeaseService decision id
            if args.json:
                print(
                    json.dumps(MessageToDict(e.lease, preserving_proto_field_name=True), indent=2)
                )
            else:
                console.print(render.lease_explanation(e.lease))
            return 0
        if args.json:
            print(json.dumps(MessageToDict(e.decision, preserving_proto_field_name=True), indent=2))
        else:
            console.print(render.explanation(e.decision))
        return 0
    # tail
    req_w = apb.WatchDecisionsRequest(
        tenant=args.tenant,
        decisions=[f"DECISION_{d}" for d in args.decision],
        reasons=[f"REASON_{r.upper().removeprefix('REASON_')}" for r in args.reason],
    )
    for event in stub.WatchDecisions(req_w):
        if args.json:
            print(json.dumps(MessageToDict(event, preserving_proto_field_name=True)), flush=True)
        elif event.HasField("threshold"):
            th = event.threshold
            console.print(
                f"[bold magenta]quota {th.limit} at {th.percent}%[/] ({th.used}/{th.capacity}) "
                f"{render.who(th.subject)}"
            )
        else:
            console.print(render.decision_line(event.decision))
    return 0


def _apply(args: argparse.Namespace, stub: Any, console: Console) -> int:
    """``plans apply``. Without ``--prune`` a file that leaves out live plans or tenants is
    refused by the gateway (the list is shown). With ``--prune`` a dry run shows the diff and
    what will be removed, the user confirms (or ``--yes``), and the file is applied only if
    the live policy is still the version that was previewed."""
    text = Path(args.file).read_text(encoding="utf-8")
    t = args.timeout
    try:
        r = stub.ApplyPolicy(
            apb.ApplyPolicyRequest(
                document=text, dry_run=args.dry_run or args.prune, prune=args.prune
            ),
            timeout=t,
        )
    except grpc.RpcError as err:
        removals = _prune_violations(err)
        if not removals:
            raise
        console.print("the file leaves out what is live:")
        for subject in removals:
            console.print(f"[red]- {subject}[/]", highlight=False)
        console.print(
            "nothing changed; to remove them: chargepath plans apply FILE --prune", highlight=False
        )
        return 1
    _print_diff(r, console)
    if args.dry_run or not r.diff:
        if args.dry_run and r.diff:
            console.print(f"dry run: live policy version {r.policy_version}, nothing changed")
        else:
            console.print(f"live policy version {r.policy_version}")
        return 0
    if args.prune:
        removals = [f"plan {n}" for n in r.removed_plans] + [
            f"tenant {n}" for n in r.removed_tenants
        ]
        if removals and not args.yes:
            if not sys.stdin.isatty():
                console.print(
                    "not removing without confirmation: pass --yes (stdin is no terminal)"
                )
                return 1
            answer = console.input(f"remove {', '.join(removals)}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                console.print("nothing changed")
                return 1
        r = stub.ApplyPolicy(
            apb.ApplyPolicyRequest(document=text, prune=True, expected_version=r.policy_version),
            timeout=t,
        )
    new = " (new)" if r.changed else ""
    console.print(f"live policy version {r.policy_version}{new}")
    return 0


def _print_diff(r: Any, console: Console) -> None:
    for line in r.diff:
        colour = {"+": "green", "-": "red"}.get(line[:1], "yellow")
        console.print(f"[{colour}]{line}[/]", highlight=False, markup=True)
    if not r.diff:
        console.print("no change")
    if r.removed_plans or r.removed_tenants:
        gone = [f"plan {n}" for n in r.removed_plans] + [f"tenant {n}" for n in r.removed_tenants]
        console.print(f"[bold red]removes {', '.join(gone)}[/]", highlight=False)


def _prune_violations(err: grpc.RpcError) -> list[str]:
    """The plans and tenants ("plans/<name>") of a FAILED_PRECONDITION that asks for prune."""
    if err.code() is not grpc.StatusCode.FAILED_PRECONDITION:
        return []
    status = rpc_status.from_call(err)
    out: list[str] = []
    for detail in status.details if status is not None else ():
        failure = error_details_pb2.PreconditionFailure()
        if detail.Unpack(failure):
            out += [
                v.subject.replace("s/", " ", 1) for v in failure.violations if v.type == "PRUNE"
            ]
    return out


def _parse_time(text: str) -> Timestamp:
    m = re.fullmatch(r"(\d+)([smhd])", text)
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        when = datetime.now(UTC) + timedelta(**{unit: int(m.group(1))})
    else:
        when = datetime.fromisoformat(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts
