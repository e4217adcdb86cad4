"""Terminal output shared by the ``chargepath`` commands: verdicts, subject state, explained
decisions and decision lines as rich renderables, and durations in human units."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import metering_pb2 as pb


def console(piped_width: int) -> Console:
    """A console as wide as the terminal, or ``piped_width`` columns when stdout is not one
    (so that output read by scripts and tests does not depend on where it ran)."""
    return Console(width=None if sys.stdout.isatty() else piped_width)


def human_ms(ms: int) -> str:
    if ms < 10_000:
        return f"{ms} ms"
    secs = ms // 1000
    parts = [
        (secs // 86400, "d"),
        (secs % 86400 // 3600, "h"),
        (secs % 3600 // 60, "m"),
        (secs % 60, "s"),
    ]
    return " ".join(f"{n}{u}" for n, u in parts if n) or "0s"


def enum_name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def who(s: pb.Subject) -> str:
    return "/".join(x for x in (s.tenant, s.slice, s.key) if x)


def verdict(out: Console, v: pb.Verdict) -> None:
    """A verdict as ``chargepath check`` shows it: decision, flags, policy and its limits."""
    colour = {pb.DECISION_ALLOW: "green", pb.DECISION_THROTTLE: "yellow"}.get(v.decision, "red")
    decision = pb.Decision.Name(v.decision).removeprefix("DECISION_")
    reason = pb.Reason.Name(v.reason).removeprefix("REASON_")
    flags = [f for f in ("recorded", "degraded", "spooled", "replayed") if getattr(v, f)]
    out.print(f"[bold {colour}]{decision}[/] {reason}  " + " ".join(flags))
    if v.HasField("retry_after"):
        out.print(f"retry after {human_ms(v.retry_after.ToMilliseconds())}")
    if v.message:
        out.print(v.message)
    out.print(f"policy v{v.policy_version}  decision {v.decision_id}  trace {v.trace_id or '-'}")
    if v.limits:
        t = Table("limit", "kind", "scope", "remaining", "capacity", "reset after", "")
        for lim in v.limits:
            t.add_row(
                lim.name,
                pb.LimitKind.Name(lim.kind).removeprefix("LIMIT_KIND_").lower(),
                pb.Scope.Name(lim.scope).removeprefix("SCOPE_").lower(),
                str(lim.remaining),
                str(lim.capacity),
                human_ms(lim.reset_after.ToMilliseconds()),
                "[red]exceeded[/]" if lim.exceeded else ("soft" if lim.soft else ""),
            )
        out.print(t)


def decision_line(d: apb.DecisionRecord) -> str:
    """One decision on one line, in rich markup (``state``, ``explain`` and ``tail``)."""
    decision = enum_name(pb.Decision, d.decision, "DECISION_")
    colour = {"ALLOW": "green", "THROTTLE": "yellow"}.get(decision, "red")
    at = d.decided_at.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
    return (
        f"{at} [bold {colour}]{decision:8}[/] {enum_name(pb.Reason, d.reason, 'REASON_'):24} "
        f"{who(d.subject):32} {d.metric} {d.amount} "
        f"({enum_name(pb.Mode, d.mode, 'MODE_').lower()}) "
        f"v{d.policy_version} {d.decision_id}"
    )


def state(s: apb.GetStateResponse) -> Group:
    head = Text(
        f"policy v{s.policy_version}  plan {s.plan or '-'}"
        + (f"  slice plan {s.slice_plan}" if s.slice_plan else "")
        + "  failure policy "
        + enum_name(apb.FailureMode, s.failure_mode, "FAILURE_MODE_").lower()
        + f"  read at {s.read_at.ToDatetime().isoformat()}Z"
    )
    parts: list[Any] = [head]
    for sus in s.suspensions:
        parts.append(Text(f"SUSPENDED {who(sus.subject)}: {sus.reason}", style="bold red"))
    limits = Table(
        "limit",
        "plan",
        "kind",
        "scope",
        "metric",
        "remaining",
        "capacity",
        "refill",
        "used",
        "granted",
        "resets in",
        title="limits",
    )
    for lim in s.limits:
        kind = enum_name(pb.LimitKind, lim.kind, "LIMIT_KIND_").lower()
        limits.add_row(
            lim.name + (" (soft)" if lim.soft else ""),
            lim.plan,
            kind,
            enum_name(pb.Scope, lim.scope, "SCOPE_").lower(),
            lim.metric,
            str(lim.remaining),
            str(lim.capacity),
            f"{lim.refill}/{lim.per}" if kind == "rate" else f"per {lim.per}",
            str(lim.used) if kind == "quota" else "",
            str(lim.granted) if kind == "quota" else "",
            human_ms(lim.reset_after.ToMilliseconds()),
        )
    parts.append(limits)
    if s.grants:
        grants = Table("grant", "limit", "amount", "expires", "note", title="grants")
        for g in s.grants:
            expires = (
                g.expires_at.ToDatetime().isoformat() if g.HasField("expires_at") else "period end"
            )
            grants.add_row(g.grant_id, g.limit, str(g.amount), expires, g.note)
        parts.append(grants)
    if s.leases:
        leases = Table(
            "lease",
            "holder",
            "metric",
            "granted",
            "used",
            "available",
            "expires in",
            "holds",
            title="open leases",
        )
        for ls in s.leases:
            leases.add_row(
                ls.lease_id,
                ls.holder,
                ls.metric,
                str(ls.granted),
                str(ls.used),
                str(ls.available),
                human_ms(ls.expires_in.ToMilliseconds()),
                " ".join(f"{h.limit}:{h.units}" for h in ls.holds),
            )
        parts.append(leases)
    if s.recent:
        parts.append(Text("recent decisions", style="bold"))
        parts.extend(Text.from_markup(decision_line(d)) for d in s.recent)
    return Group(*parts)


def explanation(d: apb.DecisionRecord) -> Group:
    lines: list[Any] = [
        Text.from_markup(decision_line(d)),
        Text(
            f"request {d.request_id}  trace {d.trace_id or '-'}  at {d.decided_at.ToJsonString()}"
            + (
                f"  retry after {human_ms(d.retry_after.ToMilliseconds())}"
                if d.retry_after.ToMilliseconds()
                else ""
            )
        ),
    ]
    table = Table("limit", "kind", "remaining before", "remaining after", "capacity", "")
    for c in d.limits:
        table.add_row(
            c.name,
            enum_name(pb.LimitKind, c.kind, "LIMIT_KIND_").lower(),
            str(c.remaining_before),
            str(c.remaining_after),
            str(c.capacity),
            "[red]exceeded[/]" if c.exceeded else "",
        )
    lines.append(table)
    return Group(*lines)


def lease_explanation(d: apb.LeaseDecision) -> Group:
    """An answered lease ask (explain of a LeaseService decision id)."""
    decision = enum_name(pb.Decision, d.decision, "DECISION_")
    reason = enum_name(pb.Reason, d.reason, "REASON_")
    return Group(
        Text(f"lease ask {decision} {reason}  {who(d.subject)}  {d.metric}  v{d.policy_version}"),
        Text(
            f"request {d.request_id}  lease {d.lease_id or '-'}  holder {d.holder or '-'}  "
            f"trace {d.trace_id or '-'}  at {d.decided_at.ToJsonString()}"
        ),
        Text(
            f"requested {d.requested}  granted {d.granted}  used {d.used} (recorded "
            f"{d.recorded}, overage {d.overage})  refunded {d.refunded}"
        ),
    )
