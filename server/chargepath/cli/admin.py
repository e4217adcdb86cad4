"""Admin commands of the ``chargepath`` CLI, over the gRPC AdminService of a running gateway:
``plans apply|list|show``, ``assign``, ``grant``, ``suspend``, ``resume``, ``failure-policy``,
``state``, ``explain`` and ``tail``."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import fnmatch
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from chargepath.cli import connection, render, values
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


DECISIONS = ["ALLOW", "THROTTLE", "DENY"]
REASONS = [
    name.removeprefix("REASON_") for name, _ in pb.Reason.items() if name != "REASON_UNSPECIFIED"
]


def add_parsers(sub: Any) -> None:
    """Register the admin commands (:data:`COMMANDS`) on the ``chargepath`` subparsers."""

    def target(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        connection.add_options(p)
        p.add_argument("--timeout", type=values.seconds, default=10.0, help="deadline in seconds")
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
    p = target(
        psub.add_parser(
            "show",
            help="print the live policy as a plan file (plans apply takes it back unchanged)",
            description="Print the live policy as a plan file: `chargepath plans show > f.yaml "
            "&& chargepath plans apply f.yaml` changes nothing. With NAME, only that plan and "
            "the metrics it counts (a valid plan file too).",
        )
    )
    p.add_argument("name", nargs="?", help="one plan (default: the whole policy)")

    p = target(
        sub.add_parser(
            "assign",
            help="assign a plan to a tenant or a slice",
            description="Assign a plan to a tenant of the policy (or one of its slices). A "
            "tenant the policy does not have is refused, with the closest name, unless "
            "--create says to add it.",
        )
    )
    p.add_argument("tenant")
    p.add_argument("plan", help='plan name; "" removes the assignment')
    p.add_argument("--slice", default="")
    p.add_argument("--create", action="store_true", help="add the tenant if the policy lacks it")

    p = target(sub.add_parser("grant", help="top up a quota for its current period"))
    p.add_argument("--tenant", required=True)
    p.add_argument("--slice", default="")
    p.add_argument("--key", default="")
    p.add_argument("--limit", required=True, help="name of a quota limit")
    p.add_argument("--amount", type=values.INT64, required=True)
    p.add_argument(
        "--expires",
        type=values.time_or_duration,
        help="ISO 8601 time, or a duration from now: 30m, 2h, 1d",
    )
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
    p.add_argument(
        "--recent", type=values.integer(0, 100), default=10, help="how many recent decisions"
    )
    p.add_argument(
        "--watch",
        action="store_true",
        help="refresh every --interval seconds; rides out a gateway restart (says reconnecting)",
    )
    p.add_argument("--interval", type=values.seconds, default=1.0)
    p.add_argument("--json", action="store_true", help="print the state as JSON")

    p = target(
        sub.add_parser(
            "explain",
            help="explain a decision by its id",
            description="Explain a decision by its id (at least for the dedup window).",
        )
    )
    p.add_argument("decision_id")
    p.add_argument("--tenant", default="", help="the decision's tenant (optional)")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")

    p = target(sub.add_parser("tail", help="follow a tenant's decisions and quota thresholds"))
    p.add_argument("--tenant", required=True)
    p.add_argument(
        "--decision",
        action="append",
        default=[],
        type=values.one_of(DECISIONS, "decision"),
        help="only these decisions: ALLOW, THROTTLE or DENY (repeatable)",
    )
    p.add_argument(
        "--reason",
        action="append",
        default=[],
        type=values.one_of(REASONS, "reason"),
        help="only these reasons, e.g. RATE_LIMITED (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")


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
        return _show(args, stub)
    if cmd == "assign":
        return _assign(args, stub, console)
    if cmd == "grant":
        req = apb.GrantRequest(
            subject=pb.Subject(tenant=args.tenant, slice=args.slice, key=args.key),
            limit=args.limit,
            amount=args.amount,
            note=args.note,
        )
        if args.expires is not None:
            req.expires_at.CopyFrom(args.expires)
        g = stub.Grant(req, timeout=t)
        console.print(
            f"grant {g.grant_id}: capacity {g.capacity:,}, remaining {g.remaining:,}",
            highlight=False,
        )
        return 0
    if cmd in ("suspend", "resume"):
        subject = pb.Subject(tenant=args.tenant, slice=args.slice, key=args.key)
        if cmd == "suspend":
            r2 = stub.Suspend(apb.SuspendRequest(subject=subject, reason=args.reason), timeout=t)
        else:
            try:
                r2 = stub.Resume(apb.ResumeRequest(subject=subject), timeout=t)
            except grpc.RpcError as err:
                if err.code() is not grpc.StatusCode.NOT_FOUND or not _active(stub, subject, t):
                    raise
                # nothing to lift: resuming twice is not an error
                console.print(f"{render.who(subject)} is already active", highlight=False)
                return 0
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
        return _state(args, stub, console)
    if cmd == "explain":
        e = stub.ExplainDecision(
            apb.ExplainDecisionRequest(tenant=args.tenant, decision_id=args.decision_id), timeout=t
        )
        if e.HasField("lease"):  # a LeaseService decision id
            if args.json:
                print(json.dumps(render.plain(e.lease), indent=2))
            else:
                console.print(render.lease_explanation(e.lease))
            return 0
        if args.json:
            print(json.dumps(render.plain(e.decision), indent=2))
        else:
            units = _units(stub, t)
            console.print(render.explanation(e.decision, units.get(e.decision.metric, "")))
        return 0
    return _tail(args, stub, console)


def _tail(args: argparse.Namespace, stub: Any, console: Console) -> int:
    req_w = apb.WatchDecisionsRequest(
        tenant=args.tenant,
        decisions=[f"DECISION_{d}" for d in args.decision],
        reasons=[f"REASON_{r}" for r in args.reason],
    )
    units = {} if args.json else _units(stub, args.timeout)
    for event in stub.WatchDecisions(req_w):
        if args.json:
            print(json.dumps(render.plain(event)), flush=True)
        elif event.HasField("threshold"):
            th = event.threshold
            console.print(
                f"[bold magenta]quota {th.limit} at {th.percent}%[/] ({th.used:,}/{th.capacity:,}) "
                f"{render.who(th.subject)}"
            )
        else:
            d = event.decision
            console.print(render.decision_line(d, units.get(d.metric, "")), highlight=False)
    return 0


def _active(stub: Any, subject: pb.Subject, timeout: float) -> bool:
    """True when ``subject`` exists and has no suspension of its own (Resume said NOT_FOUND
    because there was nothing to lift, not because the tenant is unknown)."""
    try:
        s = stub.GetState(apb.GetStateRequest(subject=subject, recent=1), timeout=timeout)
    except grpc.RpcError:
        return False
    own = (subject.tenant, subject.slice, subject.key)
    return all((x.subject.tenant, x.subject.slice, x.subject.key) != own for x in s.suspensions)


def _units(stub: Any, timeout: float) -> dict[str, str]:
    """The catalog's unit of each metric, for amounts in human units; empty when the caller
    may not read the policy (a viewer key sees plain counts)."""
    try:
        r = stub.GetPolicy(apb.GetPolicyRequest(), timeout=timeout)
    except grpc.RpcError as err:
        if err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED):
            return {}
        raise
    doc = json.loads(r.document) if r.document else {}
    return {m["name"]: m.get("unit") or "" for m in doc.get("metrics") or ()}


def _state(args: argparse.Namespace, stub: Any, console: Console) -> int:
    t = args.timeout
    req = apb.GetStateRequest(
        subject=pb.Subject(tenant=args.tenant, slice=args.slice, key=args.key),
        recent=args.recent,
    )
    if args.json:
        print(json.dumps(render.plain(stub.GetState(req, timeout=t)), indent=2))
        return 0
    if not args.watch:
        state = stub.GetState(req, timeout=t)
        console.print(render.state(state, _units(stub, t), console.width))
        return 0
    return _watch(args, stub, console, req)


#: While the gateway is away, ``state --watch`` keeps trying at this pace (seconds).
RECONNECT_EVERY = 0.5
_AWAY = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


def _watch(args: argparse.Namespace, stub: Any, console: Console, req: Any) -> int:
    """``state --watch``: refresh until interrupted. When the gateway goes away (restart,
    network), say "reconnecting" (under the last state, on a terminal) and carry on when it is
    back; any other error (the subject is gone, the key revoked) ends the watch. On a terminal
    the view is redrawn in place; into a pipe each refresh is printed after the last."""
    t = min(args.timeout, max(args.interval, 1.0))
    units: dict[str, str] | None = None
    last: Any = None
    away = False
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None

    def show(renderable: Any) -> None:
        if live is not None:
            live.update(renderable, refresh=True)
        else:
            console.print(renderable)
            console.file.flush()

    with live if live is not None else contextlib.nullcontext():
        while True:
            try:
                if units is None:
                    units = _units(stub, t)
                last = render.state(stub.GetState(req, timeout=t), units, console.width)
            except grpc.RpcError as err:
                if err.code() not in _AWAY:
                    raise
                if not away or live is not None:
                    since = datetime.now(UTC).strftime("%H:%M:%S")
                    note = Text(
                        f"reconnecting to {args.target} ({err.code().name}, since {since})",
                        style="bold yellow",
                    )
                    show(Group(note, last) if live is not None and last is not None else note)
                away = True
                time.sleep(RECONNECT_EVERY)
                continue
            if away and live is None:
                console.print(Text(f"reconnected to {args.target}", style="bold green"))
            away = False
            show(last)
            time.sleep(args.interval)


def _show(args: argparse.Namespace, stub: Any) -> int:
    """``plans show [NAME]``: the live policy as a plan file (YAML), or one plan of it with the
    metrics it counts. Built from GetPolicy's canonical document, so apply takes it back
    unchanged."""
    r = stub.GetPolicy(apb.GetPolicyRequest(), timeout=args.timeout)
    doc = json.loads(r.document) if r.document else {}
    if args.name is not None:
        plan = next((p for p in doc.get("plans") or () if p.get("name") == args.name), None)
        if plan is None:
            names = [p.get("name", "") for p in doc.get("plans") or ()]
            raise values.UsageError(f"name: unknown plan {args.name!r}{_close(args.name, names)}")
        patterns = [lim.get("metric", "") for lim in plan.get("limits") or ()]
        metrics = [
            m
            for m in doc.get("metrics") or ()
            if any(fnmatch.fnmatchcase(m.get("name", ""), pat) for pat in patterns)
        ]
        doc = {"metrics": metrics, "plans": [plan]}
    header = f"# chargepath plans show: policy version {r.policy_version}\n"
    print(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), end="")
    return 0


def _close(name: str, names: list[str]) -> str:
    match = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _assign(args: argparse.Namespace, stub: Any, console: Console) -> int:
    """``assign``: refuses a tenant the policy lacks (a typo must not create a tenant) unless
    ``--create``."""
    t = args.timeout
    if not args.create:
        r = stub.GetPolicy(apb.GetPolicyRequest(), timeout=t)
        doc = json.loads(r.document) if r.document else {}
        tenants = [x.get("name", "") for x in doc.get("tenants") or ()]
        if args.tenant not in tenants:
            raise values.UsageError(
                f"tenant: {args.tenant!r} is not in the policy{_close(args.tenant, tenants)} "
                "(--create adds a new tenant)"
            )
    a = stub.AssignPlan(
        apb.AssignPlanRequest(tenant=args.tenant, slice=args.slice, plan=args.plan), timeout=t
    )
    console.print(f"policy version {a.policy_version}")
    return 0


def _apply(args: argparse.Namespace, stub: Any, console: Console) -> int:
    """``plans apply``. Without ``--prune`` a file that leaves out live plans or tenants is
    refused by the gateway (the list is shown). With ``--prune`` a dry run shows the diff and
    what will be removed, the user confirms (or ``--yes``), and the file is applied only if
    the live policy is still the version that was previewed. A file that does not validate
    is refused here, every issue on a line of its own (``file:line: field: reason``), exit 1,
    without a call."""
    # pydantic loads only for this command
    from chargepath.core.plans import PolicyError
    from chargepath.policy_files import load_policy_file, refusal_lines

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except OSError as exc:
        raise values.UsageError(f"plans apply: {args.file}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise values.UsageError(f"plans apply: {args.file}: not UTF-8 text") from None
    try:
        load_policy_file(args.file)
    except PolicyError as exc:
        lines = refusal_lines(exc, "plans apply")
        print("chargepath: " + "\n".join(lines), file=sys.stderr)
        return 1
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
