"""UTC period boundaries for quotas, in milliseconds since the Unix epoch.

The store's Lua script computes the same boundaries from Redis' clock (see decide.lua); this
module is the reference the tests hold it to, and what the CLI uses to render resets.
"""

from __future__ import annotations

import enum

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
#: Weeks are ISO weeks (Monday 00:00 UTC to the next Monday): 1970-01-01 was a Thursday, three
#: days into its week, so a week starts at ``t - (t + WEEK_OFFSET_MS) % WEEK_MS``.
WEEK_OFFSET_MS = 3 * DAY_MS


class Period(enum.IntEnum):
    """A quota's period; the codes are what the store's scripts receive."""

    HOUR = 1
    DAY = 2
    MONTH = 3
    WEEK = 4


def days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(z: int) -> tuple[int, int, int]:
    """The (year, month, day) of a day number since 1970-01-01."""
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return y + (m <= 2), m, d


def period_bounds(now_ms: int, period: Period) -> tuple[int, int]:
    """``(start, end)`` of the UTC period containing ``now_ms``; ``start <= now_ms < end``."""
    if period is Period.HOUR:
        start = now_ms - now_ms % HOUR_MS
        return start, start + HOUR_MS
    if period is Period.DAY:
        start = now_ms - now_ms % DAY_MS
        return start, start + DAY_MS
    if period is Period.WEEK:
        start = now_ms - (now_ms + WEEK_OFFSET_MS) % WEEK_MS
        return start, start + WEEK_MS
    y, m, _ = civil_from_days(now_ms // DAY_MS)
    start = days_from_civil(y, m, 1) * DAY_MS
    ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
    return start, days_from_civil(ny, nm, 1) * DAY_MS
