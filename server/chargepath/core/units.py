"""The units a metric may be counted in (a metric's ``unit:`` in a plan file).

A metric counts whole units of one kind: a count (requests, messages...), bytes or a
duration. The kind and the size of a unit in its kind's base (one, a byte, a millisecond) let
an interface show an amount in human units (``1.5 MB``, ``2 h 5 min``) without guessing from
the name. The list is closed so that a typo or an ambiguous abbreviation (``MB``: 10^6 or 2^20
bytes?) is refused when the plan is written, not discovered on an invoice; a unit of one's own
is written ``x-<name>`` and counts like ``unit``.
"""

from __future__ import annotations

import difflib
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


class UnitKind(enum.Enum):
    """What a unit measures; each kind has a base the sizes are given in."""

    COUNT = "count"  # base: one
    BYTES = "bytes"  # base: a byte
    DURATION = "duration"  # base: a millisecond


@dataclass(frozen=True, slots=True)
class Unit:
    """A unit of a metric: its name, its kind and how many of its kind's base one of it is
    (a ``kilobyte`` is 1,000 bytes, a ``minute`` 60,000 milliseconds)."""

    name: str
    kind: UnitKind
    base: int = 1


#: The default unit of a metric that names none.
DEFAULT_UNIT = "unit"

#: Every unit by name, in the order they are listed to people. Byte multiples are decimal (SI):
#: a kilobyte is 1,000 bytes.
UNITS: Mapping[str, Unit] = MappingProxyType(
    {
        u.name: u
        for u in (
            Unit("unit", UnitKind.COUNT),
            Unit("request", UnitKind.COUNT),
            Unit("call", UnitKind.COUNT),
            Unit("message", UnitKind.COUNT),
            Unit("event", UnitKind.COUNT),
            Unit("session", UnitKind.COUNT),
            Unit("byte", UnitKind.BYTES),
            Unit("kilobyte", UnitKind.BYTES, 1_000),
            Unit("megabyte", UnitKind.BYTES, 1_000_000),
            Unit("gigabyte", UnitKind.BYTES, 1_000_000_000),
            Unit("millisecond", UnitKind.DURATION),
            Unit("second", UnitKind.DURATION, 1_000),
            Unit("minute", UnitKind.DURATION, 60_000),
            Unit("hour", UnitKind.DURATION, 3_600_000),
        )
    }
)

#: A unit of one's own: ``x-`` then 1 to 32 characters of [a-z0-9_.-]; it counts (kind COUNT).
CUSTOM_UNIT_RE = re.compile(r"x-[a-z0-9][a-z0-9_.-]{0,31}")

# Spellings people write for a listed unit (compared lower-cased).
_ABBREVIATIONS = {
    "b": "byte",
    "kb": "kilobyte",
    "mb": "megabyte",
    "gb": "gigabyte",
    "ms": "millisecond",
    "msec": "millisecond",
    "s": "second",
    "sec": "second",
    "min": "minute",
    "h": "hour",
    "hr": "hour",
    "req": "request",
    "msg": "message",
    "sms": "message",
    "count": "unit",
    "1": "unit",
}


def unit_of(name: str) -> Unit | None:
    """The unit called ``name`` (a custom ``x-`` unit counts), or None if there is none."""
    unit = UNITS.get(name)
    if unit is None and CUSTOM_UNIT_RE.fullmatch(name):
        return Unit(name, UnitKind.COUNT)
    return unit


def suggestion(name: str) -> str | None:
    """The listed unit that ``name`` most likely means: an abbreviation (``MB``), a plural
    (``bytes``), another case (``Byte``) or a near spelling (``mesage``); None if none."""
    low = name.strip().lower()
    if low in UNITS:
        return low
    if low in _ABBREVIATIONS:
        return _ABBREVIATIONS[low]
    if low.endswith("s") and low[:-1] in UNITS:
        return low[:-1]
    if low.endswith("s") and low[:-1] in _ABBREVIATIONS:
        return _ABBREVIATIONS[low[:-1]]
    close = difflib.get_close_matches(low, list(UNITS), n=1, cutoff=0.75)
    return close[0] if close else None


def accepted() -> str:
    """The accepted units for people, by kind: ``count: unit, request...; bytes: ...``."""
    by_kind = {
        kind.value: ", ".join(u.name for u in UNITS.values() if u.kind is kind) for kind in UnitKind
    }
    listed = "; ".join(f"{kind}: {names}" for kind, names in by_kind.items())
    return f"{listed}; or x-<name> for a count of your own"


def unit_problem(name: str) -> str | None:
    """Why ``name`` is not a unit (with a suggestion and the accepted units), or None."""
    if unit_of(name) is not None:
        return None
    hint = suggestion(name)
    did = f"did you mean {hint!r}? " if hint is not None else ""
    return f"unknown unit {name[:64]!r}: {did}accepted units are {accepted()}"
