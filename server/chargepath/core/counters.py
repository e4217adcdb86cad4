"""How a limit's counter moves with time: the rules of a token bucket and of a period quota.

The store applies these rules in Redis, in Lua (``store/scripts/lib/bucket.lua`` and
``lib/quota.lua``, with ``lib/periods.lua``); this module states them once more in Python, as
their reference. The degraded-mode local allowance uses it, and one table of cases
(``tests/integration/test_counter_parity.py``) runs against the Lua, this reference and the
allowance, so the two languages cannot drift apart.

Units: a bucket's level is in sub-units (``Limit.scale`` per unit), times are milliseconds.
Every value stays below 2**53: Lua's numbers are doubles, and the rounding of a scale
conversion is the rounding of doubles on both sides (``level / old_scale * scale``).
"""

from __future__ import annotations

import math

#: A report may take a bucket into debt, down to this many sub-units below zero.
MAX_DEBT = 2**52


def converted_level(level: int, old_scale: int, scale: int) -> int:
    """A level kept in sub-units of ``old_scale``, in sub-units of ``scale`` (a plan change of
    the refill rate changes the scale): rounded down."""
    if old_scale == scale:
        return level
    return math.floor(level / old_scale * scale)


def refilled_level(
    level: int, at_ms: int, now_ms: int, capacity_sub: int, refill_per_ms: int
) -> int:
    """The level at ``now_ms`` of a bucket that held ``level`` at ``at_ms``: refilled by
    ``refill_per_ms`` per millisecond since (a clock that went back refills nothing), never
    above ``capacity_sub``. A capacity made smaller by a plan change clamps the level here."""
    return min(capacity_sub, level + max(0, now_ms - at_ms) * refill_per_ms)


def fill_wait_ms(need: int, level: int, refill_per_ms: int) -> int:
    """Milliseconds until a bucket at ``level`` holds ``need`` sub-units (0: it does)."""
    if level >= need:
        return 0
    return -(-(need - level) // refill_per_ms)


def debited_level(level: int, need: int) -> int:
    """``level`` less ``need`` sub-units; a report may take a bucket into debt, at most
    :data:`MAX_DEBT` sub-units."""
    return max(level - need, -MAX_DEBT)


def quota_used(stored_start: int | None, stored_used: int, start: int) -> int:
    """The units used in the period that starts at ``start``, of a counter that holds
    ``stored_used`` for the period that started at ``stored_start`` (None: never written).
    A counter of an earlier period counts nothing: a quota resets at its period's boundary."""
    return stored_used if stored_start == start else 0
