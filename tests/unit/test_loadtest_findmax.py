"""The find-max search: geometric steps, stopped by the p99 bound or by the achieved rate."""

from __future__ import annotations

import pytest

from loadtest.findmax import RateSearch, StepOutcome, judge

pytestmark = pytest.mark.unit


def run(search: RateSearch, capacity: float, p99_at: float = 2.0) -> list[float]:
    """Drive the search against a fake system that answers everything up to ``capacity``."""
    rates = []
    while (rate := search.next_rate()) is not None:
        rates.append(rate)
        achieved = min(rate, capacity)
        p99 = p99_at if rate <= capacity else 500.0
        search.record(StepOutcome(rate, achieved, p99))
    return rates


def test_steps_grow_by_the_factor_until_the_first_failure() -> None:
    search = RateSearch(start_rate=1000, factor=1.5, p99_bound_ms=10)
    rates = run(search, capacity=4000)
    assert rates == pytest.approx([1000, 1500, 2250, 3375, 5062.5])
    assert search.best is not None and search.best.offered_rate == pytest.approx(3375)
    assert [j.sustained for _, j in search.steps] == [True, True, True, True, False]
    assert search.next_rate() is None
    assert not search.limited_by_max_steps


def test_a_step_fails_when_p99_exceeds_the_bound_even_if_everything_is_answered() -> None:
    search = RateSearch(start_rate=100, factor=2, p99_bound_ms=5)
    search.record(StepOutcome(100, 100, 4.9))
    j = search.record(StepOutcome(200, 200, 5.1))
    assert not j.sustained and "p99" in j.reason
    assert search.best == StepOutcome(100, 100, 4.9)


def test_a_step_fails_below_the_achieved_ratio() -> None:
    assert judge(StepOutcome(1000, 950, 1.0), p99_bound_ms=10, min_ratio=0.95).sustained
    j = judge(StepOutcome(1000, 949, 1.0), p99_bound_ms=10, min_ratio=0.95)
    assert not j.sustained and "achieved" in j.reason
    assert judge(StepOutcome(1000, 1000, 10.0), p99_bound_ms=10, min_ratio=0.95).sustained
    assert not judge(StepOutcome(1000, 0, None), p99_bound_ms=10, min_ratio=0.95).sustained


def test_no_sustainable_rate_when_the_first_step_fails() -> None:
    search = RateSearch(start_rate=10_000, factor=1.5, p99_bound_ms=10)
    assert run(search, capacity=100) == [10_000]
    assert search.best is None


def test_the_search_stops_after_max_steps_and_says_the_maximum_is_higher() -> None:
    search = RateSearch(start_rate=10, factor=2, p99_bound_ms=10, max_steps=3)
    assert run(search, capacity=1e9) == [10, 20, 40]
    assert search.best is not None and search.best.offered_rate == 40
    assert search.limited_by_max_steps
    with pytest.raises(RuntimeError):
        search.record(StepOutcome(80, 80, 1.0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"start_rate": 0, "factor": 1.5},
        {"start_rate": 10, "factor": 1.0},
        {"start_rate": 10, "factor": 1.5, "min_ratio": 0.0},
        {"start_rate": 10, "factor": 1.5, "max_steps": 0},
    ],
)
def test_rejects_searches_that_cannot_make_progress(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RateSearch(p99_bound_ms=10, **kwargs)  # type: ignore[arg-type]


def test_a_step_with_degraded_verdicts_is_not_sustained() -> None:
    from loadtest.findmax import StepOutcome, judge

    j = judge(StepOutcome(1000, 1000, 2.0, degraded=3), p99_bound_ms=10, min_ratio=0.95)
    assert not j.sustained and "3 degraded" in j.reason
    assert judge(StepOutcome(1000, 1000, 2.0), p99_bound_ms=10, min_ratio=0.95).sustained


def test_with_retries_a_blip_does_not_end_the_search_but_a_real_limit_does() -> None:
    search = RateSearch(start_rate=100, factor=2, p99_bound_ms=5, retries=1)
    assert search.record(StepOutcome(100, 100, 2.0)).sustained
    assert not search.record(StepOutcome(200, 200, 9.0)).sustained  # a blip at 200/s
    assert search.next_rate() == 200  # measured again, not the end
    assert search.record(StepOutcome(200, 200, 3.0)).sustained
    assert search.next_rate() == 400
    assert not search.record(StepOutcome(400, 400, 8.0)).sustained
    assert not search.record(StepOutcome(400, 390, 8.5)).sustained  # fails twice: the limit
    assert search.next_rate() is None
    assert search.best == StepOutcome(200, 200, 3.0)
    assert len(search.steps) == 5  # every attempt is kept for the report


def test_retries_count_against_max_steps_and_must_not_be_negative() -> None:
    search = RateSearch(start_rate=100, factor=2, p99_bound_ms=5, retries=3, max_steps=2)
    search.record(StepOutcome(100, 100, 9.0))
    search.record(StepOutcome(100, 100, 9.0))
    assert search.next_rate() is None and search.best is None
    with pytest.raises(ValueError, match="retries"):
        RateSearch(start_rate=100, factor=2, p99_bound_ms=5, retries=-1)
