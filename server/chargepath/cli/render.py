"""Output shared by the ``chargepath`` commands, in one vocabulary: decisions and reasons
spelled as in the contract without its prefix (``ALLOW``, ``THROTTLE``, ``DENY``,
``RATE_LIMITED``); amounts in the metric's unit (bytes as B, KiB, MiB, GiB; other units as
counts with thousands separators); durations in human units (850 ms, 1.5 s, 2 min, 3 h).

For people: verdicts, subject state, explained decisions and decision lines as rich
renderables. For scripts: :func:`plain`, the JSON shape of every ``--json`` (README
"JSON output")."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from datetime import UTC
from typing import Any

from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from rich.console import Console, Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import metering_pb2 as pb


def console(piped_width: int) -> Console:
    """A console as wide as the terminal, or ``piped_width`` columns when stdout is not one
    (so that output read by scripts and tests does not depend on where it ran); ``COLUMNS``
    sets the width either way."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return Console(width=int(columns))
    return Console(width=None if sys.stdout.isatty() else piped_width)


def _one_decimal(x: float) -> str:
    text = f"{x:.1f}"
    return text.removesuffix(".0")


def human_ms(ms: int) -> str:
    """A duration for people: ``850 ms``, ``1.5 s``, ``2 min``, ``3 h``, ``2.5 d``."""
    sign, ms = ("-", -ms) if ms < 0 else ("", ms)
    if ms < 1000:
        return f"{sign}{ms} ms"
    for size, unit in ((86_400_000, "d"), (3_600_000, "h"), (60_000, "min")):
        if ms >= size:
            return f"{sign}{_one_decimal(ms / size)} {unit}"
    return f"{sign}{_one_decimal(ms / 1000)} s"


_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
#: Catalog units whose amounts are bytes (shown as B, KiB, MiB...).
BYTE_UNITS = frozenset({"byte", "bytes", "b", "octet", "octets"})


def human_bytes(n: int) -> str:
    """Bytes in IEC units with one decimal: ``512 B``, ``1.5 KiB``, ``45.5 TiB``."""
    sign, n = ("-", -n) if n < 0 else ("", n)
    value, unit = float(n), 0
    while value >= 1024 and unit < len(_BYTE_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{sign}{n} B"
    return f"{sign}{_one_decimal(value)} {_BYTE_UNITS[unit]}"


def amount(n: int, unit: str = "") -> str:
    """An amount of a metric in its catalog unit: bytes in IEC units, anything else as a
    count with thousands separators (``1,234,567``)."""
    if unit.lower() in BYTE_UNITS:
        return human_bytes(n)
    return f"{n:,}"


def unit_of(metric: str, units: Mapping[str, str]) -> str:
    """The unit of ``metric`` (a name, or a pattern with ``*``) in the catalog ``units``; ""
    when unknown or when the metrics a pattern matches have different units."""
    if "*" not in metric:
        return units.get(metric, "")
    rx = re.compile(".*".join(re.escape(part) for part in metric.split("*")))
    found = {u for name, u in units.items() if rx.fullmatch(name)}
    return found.pop() if len(found) == 1 else ""


def enum_name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def _enum_prefix(enum: EnumDescriptor) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def enum_word(enum: EnumDescriptor, number: int) -> str | int:
    """An enum value's name without its type's prefix (``DECISION_ALLOW`` -> ``ALLOW``);
    the number itself when this CLI does not know it."""
    value = enum.values_by_number.get(number)
    if value is None:
        return number
    return value.name.removeprefix(_enum_prefix(enum))


def plain(message: Message) -> dict[str, Any]:
    """A protobuf message as the CLI's JSON: every field present (defaults included), enums as
    names without their prefix (``"ALLOW"``, ``"RATE_LIMITED"``, ``"TENANT"``), 64-bit
    integers as JSON numbers, a ``google.protobuf.Duration`` field ``x`` as ``x_ms`` (integer
    milliseconds, 0 when unset) and a ``Timestamp`` as an ISO 8601 UTC string (null when
    unset); a message field that is unset is null, bytes are hex."""
    return _plain_message(message, message.DESCRIPTOR)


def _plain_message(message: Any, descriptor: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # upb's descriptors are typed as optional everywhere: Any, with the shape checked by tests
    for f in descriptor.fields:
        value = getattr(message, f.name)
        if f.type != FieldDescriptor.TYPE_MESSAGE:
            plain_field = (
                [_plain_value(v, f) for v in value] if _is_repeated(f) else _plain_value(value, f)
            )
            out[f.name] = plain_field
            continue
        if f.message_type.GetOptions().map_entry:
            vf = f.message_type.fields_by_name["value"]
            out[f.name] = {k: _plain_value(v, vf) for k, v in value.items()}
            continue
        duration = f.message_type.full_name == "google.protobuf.Duration"
        key = f"{f.name}_ms" if duration else f.name
        if _is_repeated(f):
            out[key] = [_plain_value(v, f) for v in value]
        elif duration or message.HasField(f.name):
            out[key] = _plain_value(value, f)  # an unset duration is 0 ms
        else:
            out[key] = None
    return out


def _is_repeated(f: Any) -> bool:
    return bool(f.is_repeated)


def _plain_value(value: Any, f: Any) -> Any:
    if f.type == FieldDescriptor.TYPE_ENUM:
        return enum_word(f.enum_type, value)
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        if f.message_type.full_name == "google.protobuf.Timestamp":
            when = value.ToDatetime(tzinfo=UTC)
            return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if f.message_type.full_name == "google.protobuf.Duration":
            return value.ToMilliseconds()
        return _plain_message(value, f.message_type)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return value.hex()
    return value


def who(s: pb.Subject) -> str:
    return "/".join(x for x in (s.tenant, s.slice, s.key) if x)


def verdict(out: Console, v: pb.Verdict, unit: str = "") -> None:
    """A verdict as ``chargepath check`` shows it: decision, flags, policy and its limits
    (amounts in ``unit``, the metric's catalog unit, when known)."""
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
        for column in t.columns[3:5]:
            column.justify = "right"
        for lim in v.limits:
            t.add_row(
                lim.name,
                pb.LimitKind.Name(lim.kind).removeprefix("LIMIT_KIND_").lower(),
                pb.Scope.Name(lim.scope).removeprefix("SCOPE_").lower(),
                amount(lim.remaining, unit),
                amount(lim.capacity, unit),
                human_ms(lim.reset_after.ToMilliseconds()),
                "[red]exceeded[/]" if lim.exceeded else ("soft" if lim.soft else ""),
            )
        out.print(t)


def decision_line(d: apb.DecisionRecord, unit: str = "") -> str:
    """One decision on one line, in rich markup (``state``, ``explain`` and ``tail``)."""
    decision = enum_name(pb.Decision, d.decision, "DECISION_")
    colour = {"ALLOW": "green", "THROTTLE": "yellow"}.get(decision, "red")
    at = d.decided_at.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
    return (
        f"{at} [bold {colour}]{decision:8}[/] {enum_name(pb.Reason, d.reason, 'REASON_'):24} "
        f"{who(d.subject):32} {d.metric} {amount(d.amount, unit)} "
        f"({enum_name(pb.Mode, d.mode, 'MODE_').lower()}) "
        f"v{d.policy_version} {d.decision_id}"
    )


def state(
    s: apb.GetStateResponse, units: Mapping[str, str] | None = None, width: int = 140
) -> Group:
    """What ``chargepath state`` shows on a console ``width`` columns wide. ``units``: the
    catalog (metric -> unit), for amounts in human units. Numbers are never cut: the limits
    are one table when its numbers fit whole, else one small block per limit."""
    units = units or {}
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
    rows: list[list[str]] = []
    for lim in s.limits:
        kind = enum_name(pb.LimitKind, lim.kind, "LIMIT_KIND_").lower()
        unit = unit_of(lim.metric, units)
        rows.append(
            [
                lim.name + (" (soft)" if lim.soft else ""),
                lim.plan,
                kind,
                enum_name(pb.Scope, lim.scope, "SCOPE_").lower(),
                lim.metric,
                amount(lim.remaining, unit),
                amount(lim.capacity, unit),
                f"{amount(lim.refill, unit)}/{lim.per}" if kind == "rate" else f"per {lim.per}",
                amount(lim.used, unit) if kind == "quota" else "",
                amount(lim.granted, unit) if kind == "quota" else "",
                human_ms(lim.reset_after.ToMilliseconds()),
            ]
        )
    parts.append(_limits_table(rows, width))
    if s.grants:
        grants = Table("grant", "limit", "amount", "expires", "note", title="grants")
        for g in s.grants:
            expires = (
                g.expires_at.ToDatetime().isoformat() if g.HasField("expires_at") else "period end"
            )
            grants.add_row(g.grant_id, g.limit, f"{g.amount:,}", expires, g.note)
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
        parts.extend(Text.from_markup(decision_line(d, units.get(d.metric, ""))) for d in s.recent)
    return Group(*parts)


_LIMIT_HEADERS: tuple[str, ...] = ("limit", "plan", "kind", "scope", "metric")
_LIMIT_HEADERS += ("remaining", "capacity", "refill", "used", "granted", "resets in")
_NUMBERS_FROM = 5  # the columns from here on hold numbers


def _limits_table(rows: list[list[str]], width: int) -> Any:
    widest = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(_LIMIT_HEADERS)]
    # text columns may fold down to 8 columns; numbers keep their whole width; 3 per border
    needed = sum(min(w, 8) for w in widest[:_NUMBERS_FROM]) + sum(widest[_NUMBERS_FROM:])
    needed += 3 * len(widest) + 1
    if needed <= width:
        table = Table(title="limits")
        for i, header in enumerate(_LIMIT_HEADERS):
            if i >= _NUMBERS_FROM:
                table.add_column(header, justify="right", no_wrap=True, min_width=widest[i])
            else:
                table.add_column(header, overflow="fold")
        for row in rows:
            table.add_row(*row)
        return table
    blocks: list[Any] = [Text("limits", style="bold")]
    for row in rows:
        blocks.append(Text(f"{row[0]}  {row[2]} {row[3]} {row[4]}  plan {row[1]}", style="bold"))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim")
        grid.add_column(justify="right", no_wrap=True)
        for header, value in zip(_LIMIT_HEADERS[_NUMBERS_FROM:], row[_NUMBERS_FROM:], strict=True):
            if value:
                grid.add_row(header, value)
        blocks.append(Padding(grid, (0, 0, 0, 2)))
    return Group(*blocks)


def explanation(d: apb.DecisionRecord, unit: str = "") -> Group:
    lines: list[Any] = [
        Text.from_markup(decision_line(d, unit)),
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
            amount(c.remaining_before, unit),
            amount(c.remaining_after, unit),
            amount(c.capacity, unit),
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
