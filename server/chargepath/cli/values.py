"""The typed values of the CLI's flags, and the one shape their errors take.

Each parser here is an argparse ``type=``: it returns the value or raises
``argparse.ArgumentTypeError`` with the reason, which the CLI's parser prints as one line that
names the flag (``chargepath grant: --expires: expected ...``) with exit status 2. A value that
can only be checked after parsing raises :class:`UsageError` naming the flag itself."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

_DURATION: Final = re.compile(r"(\d+)([smhd])")
_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


class UsageError(Exception):
    """A flag or argument the command cannot use: one line that names it, exit status 2."""


def duration_s(text: str) -> int:
    """Whole seconds of ``30s``, ``15m``, ``2h`` or ``30d``."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 30s, 15m, 2h or 30d, got {text!r}"
        )
    return int(m.group(1)) * _SECONDS[m.group(2)]


def time_or_duration(text: str) -> Timestamp:
    """A time: a duration from now (``2h``) or ISO 8601 (UTC when it has no offset)."""
    if _DURATION.fullmatch(text.strip()):
        when = datetime.now(UTC) + timedelta(seconds=duration_s(text))
    else:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a duration from now (30m, 2h, 1d) or an ISO 8601 time, got {text!r}"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def label(text: str) -> tuple[str, str]:
    """``KEY=VALUE``; the key is not empty (the gateway bounds both)."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def seconds(text: str) -> float:
    """A positive, finite number of seconds (``--timeout``, ``--interval``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def integer(low: int, high: int) -> Callable[[str], int]:
    """An integer between ``low`` and ``high`` inclusive."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


#: A whole number protobuf's int64 holds (the gateway checks the field's own bounds).
INT64: Final = integer(-(2**63), 2**63 - 1)


def one_of(names: list[str], what: str) -> Callable[[str], str]:
    """One of ``names``, in any case, returned as spelled in ``names`` (upper case for
    decisions and reasons: ``allow`` and ``DECISION_ALLOW`` both give ``ALLOW``)."""
    by_key = {n.upper(): n for n in names}

    def parse(text: str) -> str:
        key = text.strip().upper()
        for prefix in (f"{what.upper()}_",):
            key = key.removeprefix(prefix)
        if key not in by_key:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; one of {', '.join(names)}")
        return by_key[key]

    parse.__name__ = what
    return parse
