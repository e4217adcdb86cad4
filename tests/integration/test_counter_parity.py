"""One suite for every implementation of the counter rules: the Lua libraries the scripts are
assembled from (run on the session's redis-server through small test-only EVAL wrappers
assembled from the same files), the Python reference (chargepath.core.counters and
core.periods), and the degraded-mode local allowance where the rule applies to it (buckets:
refill, scale conversion, the wait for an amount; it keeps no quotas).

Every backend answers the same table of cases: fixed ones at the edges (month ends, leap years
including 2024-02-29, 2100 which is not one, ISO weeks that span two years, a refill rate
changed by a plan) and seeded random ones over several centuries (1970-2400) and rate shapes.
Periods are also held to Python's datetime, which computes them independently (weeks with
``isocalendar``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import pytest
import redis

from chargepath.core.allowance import LocalAllowance
from chargepath.core.counters import (
    MAX_DEBT,
    converted_level,
    debited_level,
    fill_wait_ms,
    quota_used,
    refilled_level,
)
from chargepath.core.model import LimitKind, Scope, Subject
from chargepath.core.periods import Period, period_bounds
from chargepath.core.plans import LimitSpec
from chargepath.core.policy import Limit
from chargepath.store.protocol import assemble

SEED = 20261129
RNG_CASES = 400


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def rate(capacity: int, refill: int, per: str) -> Limit:
    spec = LimitSpec.model_validate(
        {"name": "r", "metric": "m", "rate": {"capacity": capacity, "refill": refill, "per": per}}
    )
    return Limit.from_spec(spec)


# -- the table of cases ------------------------------------------------------------------------


def _period_instants() -> list[int]:
    edges = [
        datetime(2024, 2, 29, 23, 59, 59, 999000, UTC),  # the leap day's last ms
        datetime(2024, 3, 1, tzinfo=UTC),
        datetime(2024, 2, 28, 12, tzinfo=UTC),
        datetime(2023, 2, 28, 23, 59, 59, 999000, UTC),
        datetime(2100, 2, 28, 23, 59, 59, 999000, UTC),  # 2100 is not a leap year
        datetime(2100, 3, 1, tzinfo=UTC),
        datetime(2000, 2, 29, 6, tzinfo=UTC),  # 2000 is one
        datetime(2026, 12, 31, 23, 59, 59, 999000, UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2399, 12, 31, 23, tzinfo=UTC),
    ]
    out = [ms(d) for d in edges]
    # every month end of 2023-2029 and 2096-2104, its last ms and its first
    for year in [*range(2023, 2030), *range(2096, 2105)]:
        for month in range(1, 13):
            start = datetime(year, month, 1, tzinfo=UTC)
            out += [ms(start), ms(start) - 1]
    # the turn of the year, where an ISO week spans two years (its Monday in December, or the
    # year's first days in the last week of the year before): every midnight from Dec 28 to
    # Jan 4, its last ms and its first, over 1970-2400 (with 2000, 2100 and a 53-week 2026)
    for year in sorted({*range(1971, 2400, 23), 2000, 2020, 2021, 2026, 2027, 2100, 2399}):
        for day in range(8):
            midnight = datetime(year - 1, 12, 28, tzinfo=UTC) + timedelta(days=day)
            out += [ms(midnight), ms(midnight) - 1]
    rng = random.Random(SEED)
    top = ms(datetime(2400, 1, 1, tzinfo=UTC))
    out += [rng.randrange(0, top) for _ in range(RNG_CASES)]
    return out


PERIOD_INSTANTS = _period_instants()


@dataclass(frozen=True)
class BucketCase:
    """A full bucket of ``old``: ``taken`` units are taken, it refills for ``refilled_ms``
    (under ``old``) until T0, then ``elapsed_ms`` later it is read under ``new`` (a plan
    change when they differ), and ``ask`` units are asked for."""

    old: Limit
    taken: int
    refilled_ms: int
    new: Limit
    elapsed_ms: int
    ask: int


T0 = ms(datetime(2027, 5, 17, 8, 30, tzinfo=UTC))


def _bucket_cases() -> list[BucketCase]:
    second = rate(10, 1, "second")  # scale 1000, 1 sub-unit per ms
    thirds = rate(10, 3, "second")  # scale 1000, 3 per ms
    fast = rate(1000, 1000, "second")  # scale 1, 1 per ms
    hourly = rate(5, 7, "hour")  # scale 3,600,000 / 1, 7 per ms
    small = rate(3, 1, "second")
    cases = [
        BucketCase(second, 10, 0, second, 0, 1),  # empty: a whole second to wait
        BucketCase(second, 10, 0, second, 999, 1),  # a ms short
        BucketCase(second, 10, 0, second, 1000, 1),
        BucketCase(second, 4, 0, second, -50, 1),  # the clock went back: no refill
        BucketCase(second, 0, 0, second, 10**9, 10),  # full stays full
        BucketCase(second, 5, 0, thirds, 100, 4),  # faster refill, same scale
        BucketCase(second, 7, 500, fast, 0, 5),  # 3.5 units: scale 1000 -> 1 rounds down
        BucketCase(fast, 999, 0, second, 0, 1),
        BucketCase(thirds, 3, 7, hourly, 10, 1),  # scale 1000 -> 3,600,000
        BucketCase(hourly, 4, 1234, thirds, 0, 2),  # and back: rounds down
        BucketCase(second, 2, 0, small, 0, 3),  # a smaller capacity clamps the level
        BucketCase(fast, 100, 0, small, 10, 4),  # more than the capacity: never fits
    ]
    rng = random.Random(SEED)
    pers = ["second", "minute", "hour"]

    def any_rate() -> Limit:
        return rate(rng.randint(1, 10**6), rng.randint(1, 10**6), rng.choice(pers))

    for _ in range(RNG_CASES):
        old = any_rate()
        new = old if rng.random() < 0.3 else any_rate()
        cases.append(
            BucketCase(
                old,
                rng.randint(0, old.capacity),
                rng.choice([0, rng.randint(1, 10**6)]),
                new,
                rng.choice([0, 1, rng.randint(-1000, 0), rng.randint(0, 10**7)]),
                rng.randint(1, new.capacity + 1),
            )
        )
    return cases


BUCKET_CASES = _bucket_cases()


@dataclass(frozen=True)
class QuotaCase:
    """A quota counter that holds ``used`` units for the period that started at
    ``stored_start`` (None: never written), read at ``now``."""

    period: Period
    stored_start: int | None
    used: int
    now: int


def _quota_cases() -> list[QuotaCase]:
    feb = ms(datetime(2024, 2, 1, tzinfo=UTC))
    mar = ms(datetime(2024, 3, 1, tzinfo=UTC))
    week53 = ms(datetime(2026, 12, 28, tzinfo=UTC))
    cases = [
        QuotaCase(Period.MONTH, feb, 700, mar - 1),  # the leap day's last ms: kept
        QuotaCase(Period.MONTH, feb, 700, mar),  # the boundary: reset
        QuotaCase(Period.MONTH, None, 0, mar),
        QuotaCase(Period.DAY, mar - 86_400_000, 5, mar - 1),
        QuotaCase(Period.DAY, mar - 86_400_000, 5, mar),
        QuotaCase(Period.HOUR, mar, 9, mar + 3_599_999),
        QuotaCase(Period.HOUR, mar, 9, mar + 3_600_000),
        # the ISO week 2026-W53, Monday 2026-12-28 to Sunday 2027-01-03 (its last ms: kept)
        QuotaCase(Period.WEEK, week53, 3, ms(datetime(2027, 1, 4, tzinfo=UTC)) - 1),
        QuotaCase(Period.WEEK, week53, 3, ms(datetime(2027, 1, 4, tzinfo=UTC))),
    ]
    rng = random.Random(SEED)
    for now in rng.sample(PERIOD_INSTANTS, 200):
        p = rng.choice(list(Period))
        start, end = period_bounds(now, p)
        earlier = period_bounds(start - 1, p)[0]
        stored = rng.choice([start, earlier, None])
        cases.append(QuotaCase(p, stored, rng.randint(0, 10**12), rng.choice([now, end - 1, end])))
    return cases


QUOTA_CASES = _quota_cases()


# -- the backends ------------------------------------------------------------------------------


class CounterRules(Protocol):
    """One implementation of the counter rules. A method that does not apply raises
    :class:`NotApplicable`."""

    def period_bounds(self, instants: list[int], period: Period) -> list[tuple[int, int]]: ...

    def bucket_levels(self, cases: list[BucketCase]) -> list[int]:
        """The level (sub-units of ``new``) at t0 + elapsed of each case's bucket."""
        ...

    def bucket_waits(self, cases: list[BucketCase]) -> list[int]:
        """The ms until ``ask`` units fit (-1: never, more than the capacity)."""
        ...

    def quota_reads(self, cases: list[QuotaCase]) -> list[tuple[int, int]]:
        """(used units now, ms until the reset) of each case."""
        ...

    def debits(self, levels: list[tuple[int, int]]) -> list[int]:
        """``level`` less ``need``, at most MAX_DEBT into debt, for each (level, need)."""
        ...


class NotApplicable(Exception):
    pass


def stored_level(c: BucketCase) -> int:
    """The level at T0, in sub-units of ``old``: the stored state every read starts from."""
    o = c.old
    taken = o.capacity_sub - c.taken * o.scale
    return refilled_level(taken, T0 - c.refilled_ms, T0, o.capacity_sub, o.refill_per_ms)


class PythonReference:
    def period_bounds(self, instants: list[int], period: Period) -> list[tuple[int, int]]:
        return [period_bounds(t, period) for t in instants]

    def bucket_levels(self, cases: list[BucketCase]) -> list[int]:
        return [
            refilled_level(
                converted_level(stored_level(c), c.old.scale, c.new.scale),
                T0,
                T0 + c.elapsed_ms,
                c.new.capacity_sub,
                c.new.refill_per_ms,
            )
            for c in cases
        ]

    def bucket_waits(self, cases: list[BucketCase]) -> list[int]:
        return [
            -1
            if c.ask * c.new.scale > c.new.capacity_sub
            else fill_wait_ms(c.ask * c.new.scale, level, c.new.refill_per_ms)
            for c, level in zip(cases, self.bucket_levels(cases), strict=True)
        ]

    def quota_reads(self, cases: list[QuotaCase]) -> list[tuple[int, int]]:
        out = []
        for c in cases:
            start, end = period_bounds(c.now, c.period)
            out.append((quota_used(c.stored_start, c.used, start), end - c.now))
        return out

    def debits(self, levels: list[tuple[int, int]]) -> list[int]:
        return [debited_level(level, need) for level, need in levels]


class LuaLibraries:
    """The libraries of store/scripts/lib, assembled into test-only scripts (as every real
    script is), run on a real redis-server."""

    PERIODS = """
-- #include lib/periods.lua
local out = {}
for i = 2, #ARGV do
  local s, e = period_bounds(tonumber(ARGV[i]), tonumber(ARGV[1]))
  out[#out + 1] = s
  out[#out + 1] = e
end
return out
"""
    # per case: stored level, its time, its scale, now, then the new spec's capacity_sub,
    # scale, refill_per_ms, and the amount asked for, in sub-units
    BUCKETS = """
-- #include lib/bucket.lua
local out = {}
for i = 1, #ARGV, 8 do
  local a = {}
  for j = 0, 7 do a[j] = tonumber(ARGV[i + j]) end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'l', ARGV[i], 't', ARGV[i + 1], 's', ARGV[i + 2])
  local spec = {capacity_sub = a[4], scale = a[5], refill_per_ms = a[6]}
  local level = bucket_read(KEYS[1], spec, a[3])
  local wait = -1
  if a[7] <= spec.capacity_sub then wait = bucket_wait(a[7], level, spec.refill_per_ms) end
  out[#out + 1] = level
  out[#out + 1] = wait
end
redis.call('DEL', KEYS[1])
return out
"""
    QUOTAS = """
-- #include lib/quota.lua
local out = {}
for i = 1, #ARGV, 4 do
  redis.call('DEL', KEYS[1])
  if ARGV[i + 1] ~= '' then redis.call('HSET', KEYS[1], 'p', ARGV[i + 1], 'u', ARGV[i + 2]) end
  local now = tonumber(ARGV[i + 3])
  local start, finish, used = quota_read(KEYS[1], tonumber(ARGV[i]), now)
  out[#out + 1] = used
  out[#out + 1] = finish - now
end
redis.call('DEL', KEYS[1])
return out
"""
    DEBITS = """
-- #include lib/bucket.lua
local out = {}
for i = 1, #ARGV, 2 do out[#out + 1] = bucket_debit(tonumber(ARGV[i]), tonumber(ARGV[i + 1])) end
return out
"""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def _eval(self, source: str, args: list[int | str], keys: tuple[str, ...] = ()) -> list[int]:
        out = []
        # a few hundred cases per call: a script's arguments are bounded only by memory
        step = 800
        per = {self.BUCKETS: 8, self.QUOTAS: 4, self.DEBITS: 2}.get(source, 1)
        head: list[int | str] = []
        if source == self.PERIODS:
            head, args = args[:1], args[1:]
        for i in range(0, len(args), step * per):
            reply = self.client.eval(
                assemble(source), len(keys), *keys, *head, *args[i : i + step * per]
            )
            out += [int(x) for x in reply]
        return out

    def period_bounds(self, instants: list[int], period: Period) -> list[tuple[int, int]]:
        flat = self._eval(self.PERIODS, [int(period), *instants])
        return list(zip(flat[::2], flat[1::2], strict=True))

    def _buckets(self, cases: list[BucketCase]) -> list[int]:
        args: list[int | str] = []
        for c in cases:
            n = c.new
            args += [stored_level(c), T0, c.old.scale, T0 + c.elapsed_ms]
            args += [n.capacity_sub, n.scale, n.refill_per_ms, c.ask * n.scale]
        return self._eval(self.BUCKETS, args, ("parity:bucket",))

    def bucket_levels(self, cases: list[BucketCase]) -> list[int]:
        return self._buckets(cases)[::2]

    def bucket_waits(self, cases: list[BucketCase]) -> list[int]:
        return self._buckets(cases)[1::2]

    def quota_reads(self, cases: list[QuotaCase]) -> list[tuple[int, int]]:
        args: list[int | str] = []
        for c in cases:
            stored = "" if c.stored_start is None else c.stored_start
            args += [int(c.period), stored, c.used, c.now]
        flat = self._eval(self.QUOTAS, args, ("parity:quota",))
        return list(zip(flat[::2], flat[1::2], strict=True))

    def debits(self, levels: list[tuple[int, int]]) -> list[int]:
        return self._eval(self.DEBITS, [x for pair in levels for x in pair])


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


class Allowance:
    """The degraded-mode local allowance: its buckets follow the same rules."""

    def period_bounds(self, instants: list[int], period: Period) -> list[tuple[int, int]]:
        raise NotApplicable("the local allowance keeps no quotas: it has no periods")

    def quota_reads(self, cases: list[QuotaCase]) -> list[tuple[int, int]]:
        raise NotApplicable("the local allowance keeps no quotas")

    def debits(self, levels: list[tuple[int, int]]) -> list[int]:
        raise NotApplicable("the local allowance admits only: its buckets never go into debt")

    def _run(self, c: BucketCase) -> tuple[int, int]:
        clock = Clock()
        allowance = LocalAllowance(clock)
        subject = Subject("t")
        # the same limit name: a plan change of the limit, not another limit
        old = Limit("r", LimitKind.RATE, Scope.TENANT, False, c.old.capacity, c.old.scale,
                    c.old.refill_per_ms)  # fmt: skip
        new = Limit("r", LimitKind.RATE, Scope.TENANT, False, c.new.capacity, c.new.scale,
                    c.new.refill_per_ms)  # fmt: skip
        clock.now = T0 - c.refilled_ms
        assert allowance.take(subject, (old,), c.taken) == 0
        clock.now = T0
        allowance.level(subject, old)
        clock.now = T0 + c.elapsed_ms
        level = allowance.level(subject, new)
        wait = allowance.take(subject, (new,), c.ask)
        return level, wait

    def bucket_levels(self, cases: list[BucketCase]) -> list[int]:
        return [self._run(c)[0] for c in cases]

    def bucket_waits(self, cases: list[BucketCase]) -> list[int]:
        return [self._run(c)[1] for c in cases]


@pytest.fixture(params=["lua", "python", "allowance"])
def rules(request: pytest.FixtureRequest) -> Iterator[CounterRules]:
    if request.param == "python":
        yield PythonReference()
    elif request.param == "allowance":
        yield Allowance()
    else:
        yield LuaLibraries(request.getfixturevalue("raw_redis"))


# -- the suite ---------------------------------------------------------------------------------


@pytest.mark.parametrize("period", list(Period), ids=lambda p: p.name.lower())
def test_period_bounds(rules: CounterRules, period: Period) -> None:
    try:
        got = rules.period_bounds(PERIOD_INSTANTS, period)
    except NotApplicable as exc:
        pytest.skip(str(exc))
    for at, (start, end) in zip(PERIOD_INSTANTS, got, strict=True):
        d = datetime.fromtimestamp(at / 1000, UTC)
        if period is Period.HOUR:
            first = d.replace(minute=0, second=0, microsecond=0)
            nxt = first + timedelta(hours=1)
        elif period is Period.DAY:
            first = d.replace(hour=0, minute=0, second=0, microsecond=0)
            nxt = first + timedelta(days=1)
        elif period is Period.WEEK:
            iso = d.isocalendar()
            first = datetime.fromisocalendar(iso.year, iso.week, 1).replace(tzinfo=UTC)
            nxt = first + timedelta(weeks=1)
        else:
            first = d.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            nxt = first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1)
        assert (start, end) == (ms(first), ms(nxt)), d.isoformat()


def test_bucket_refill_and_scale_conversion(rules: CounterRules) -> None:
    try:
        got = rules.bucket_levels(BUCKET_CASES)
    except NotApplicable as exc:
        pytest.skip(str(exc))
    want = PythonReference().bucket_levels(BUCKET_CASES)
    assert got == want
    # the fixed cases, by hand: empty after 999 ms at 1 sub-unit/ms; 3 units (scale 1000)
    # are 3 units (scale 1); the clamp to a capacity of 3 units
    assert got[1] == 999 and got[6] == 3 and got[10] == 3000


def test_the_wait_for_an_amount(rules: CounterRules) -> None:
    try:
        got = rules.bucket_waits(BUCKET_CASES)
    except NotApplicable as exc:
        pytest.skip(str(exc))
    assert got == PythonReference().bucket_waits(BUCKET_CASES)
    assert got[:3] == [1000, 1, 0]
    assert got[11] == -1


def test_quota_resets_at_the_period_boundary(rules: CounterRules) -> None:
    try:
        got = rules.quota_reads(QUOTA_CASES)
    except NotApplicable as exc:
        pytest.skip(str(exc))
    assert got == PythonReference().quota_reads(QUOTA_CASES)
    day = 86_400_000
    assert got[:9] == [
        (700, 1),
        (0, 31 * day),
        (0, 31 * day),
        (5, 1),
        (0, day),
        (9, 1),
        (0, 3_600_000),
        (3, 1),
        (0, 7 * day),
    ]


def test_a_report_takes_a_bucket_into_debt_down_to_the_floor(rules: CounterRules) -> None:
    rng = random.Random(SEED)
    levels = [(5, 3), (5, 8), (-MAX_DEBT + 10, 100), (-MAX_DEBT, 1), (0, 0)]
    levels += [(rng.randint(-(2**51), 2**51), rng.randint(0, 2**51)) for _ in range(100)]
    try:
        got = rules.debits(levels)
    except NotApplicable as exc:
        pytest.skip(str(exc))
    assert got == PythonReference().debits(levels)
    assert got[:5] == [2, -3, -MAX_DEBT, -MAX_DEBT, 0]
