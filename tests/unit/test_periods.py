from datetime import UTC, datetime, timedelta

import pytest

from chargepath.core.periods import Period, civil_from_days, days_from_civil, period_bounds


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


@pytest.mark.parametrize("day", range(-800, 80_000, 1999))
def test_civil_round_trip_matches_datetime(day: int) -> None:
    d = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=day)
    assert civil_from_days(day) == (d.year, d.month, d.day)
    assert days_from_civil(d.year, d.month, d.day) == day


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        (
            datetime(2027, 2, 28, 23, 59, 59, 999000, UTC),
            datetime(2027, 2, 1, tzinfo=UTC),
            datetime(2027, 3, 1, tzinfo=UTC),
        ),
        (
            datetime(2028, 2, 29, 12, tzinfo=UTC),
            datetime(2028, 2, 1, tzinfo=UTC),
            datetime(2028, 3, 1, tzinfo=UTC),
        ),
        (
            datetime(2026, 12, 31, 23, 0, tzinfo=UTC),
            datetime(2026, 12, 1, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        (
            datetime(2027, 1, 1, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
            datetime(2027, 2, 1, tzinfo=UTC),
        ),
    ],
)
def test_month_bounds(now: datetime, start: datetime, end: datetime) -> None:
    assert period_bounds(ms(now), Period.MONTH) == (ms(start), ms(end))


def test_hour_and_day_bounds() -> None:
    now = ms(datetime(2026, 11, 26, 13, 45, 10, tzinfo=UTC))
    assert period_bounds(now, Period.HOUR) == (
        ms(datetime(2026, 11, 26, 13, tzinfo=UTC)),
        ms(datetime(2026, 11, 26, 14, tzinfo=UTC)),
    )
    assert period_bounds(now, Period.DAY) == (
        ms(datetime(2026, 11, 26, tzinfo=UTC)),
        ms(datetime(2026, 11, 27, tzinfo=UTC)),
    )


@pytest.mark.parametrize(
    ("now", "monday"),
    [
        (datetime(1970, 1, 1, tzinfo=UTC), datetime(1969, 12, 29, tzinfo=UTC)),  # a Thursday
        (datetime(2026, 12, 7, tzinfo=UTC), datetime(2026, 12, 7, tzinfo=UTC)),  # a Monday
        (datetime(2026, 12, 13, 23, 59, 59, 999000, UTC), datetime(2026, 12, 7, tzinfo=UTC)),
        # ISO weeks across a new year: 2026-W53 ends on Sunday 2027-01-03, 2021-01-01 is in
        # 2020-W53, 2024-12-31 is in 2025-W01
        (datetime(2027, 1, 3, 12, tzinfo=UTC), datetime(2026, 12, 28, tzinfo=UTC)),
        (datetime(2027, 1, 4, tzinfo=UTC), datetime(2027, 1, 4, tzinfo=UTC)),
        (datetime(2021, 1, 1, tzinfo=UTC), datetime(2020, 12, 28, tzinfo=UTC)),
        (datetime(2024, 12, 31, 8, tzinfo=UTC), datetime(2024, 12, 30, tzinfo=UTC)),
    ],
)
def test_week_bounds_are_iso_weeks_from_monday(now: datetime, monday: datetime) -> None:
    start, end = period_bounds(ms(now), Period.WEEK)
    assert (start, end) == (ms(monday), ms(monday + timedelta(days=7)))
    iso = now.isocalendar()
    assert start == ms(datetime.fromisocalendar(iso.year, iso.week, 1).replace(tzinfo=UTC))
