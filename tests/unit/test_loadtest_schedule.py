"""The open-loop schedule: arrival times depend only on the start, the rate and the index."""

from __future__ import annotations

import pytest

from loadtest.schedule import Schedule
from loadtest.worker import lanes_of

pytestmark = pytest.mark.unit


def test_one_worker_sends_rate_times_duration_evenly_spaced() -> None:
    s = Schedule(start=100.0, rate=1000.0, duration=2.0)
    assert s.total == 2000
    assert s.time_of(0) == 100.0
    assert s.time_of(1) == pytest.approx(100.001)
    assert s.time_of(1999) == pytest.approx(101.999)


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_workers_together_send_exactly_the_flow_interleaved(workers: int) -> None:
    rate, duration = 250.0, 1.3
    parts = [Schedule(5.0, rate, duration, w, workers) for w in range(workers)]
    times = sorted(p.time_of(i) for p in parts for i in range(p.total))
    assert sum(p.total for p in parts) == parts[0].flow_total == 325
    assert times == pytest.approx([5.0 + k / rate for k in range(325)])
    assert max(p.total for p in parts) - min(p.total for p in parts) <= 1


def test_fractional_rate_counts_arrivals_inside_the_window() -> None:
    # 0.5/s for 3 s: arrivals at 0 s and 2 s; the next would be at 4 s, outside.
    s = Schedule(0.0, 0.5, 3.0)
    assert s.total == 2
    assert [s.time_of(i) for i in range(s.total)] == [0.0, 2.0]


def test_due_counts_arrivals_at_or_before_now_and_stops_at_the_end() -> None:
    w0 = Schedule(10.0, 100.0, 1.0, worker=0, workers=2)
    w1 = Schedule(10.0, 100.0, 1.0, worker=1, workers=2)
    assert w0.due(9.999) == 0
    assert w0.due(10.0) == 1  # k = 0 is due at the start
    assert w1.due(10.0) == 0  # k = 1 is due 10 ms later
    assert w1.due(10.01) == 1
    assert w0.due(10.5) == 26  # k = 0, 2, ..., 50
    assert w1.due(10.5) == 25  # k = 1, 3, ..., 49
    assert w0.due(1e9) == w0.total == 50
    assert w1.due(1e9) == w1.total == 50


def test_due_never_lags_intended_times() -> None:
    # Whatever `now` the pacing loop wakes at, every arrival with time <= now is due and no
    # later one: a late loop fires the backlog with its original intended times.
    s = Schedule(0.0, 333.0, 2.0, worker=1, workers=3)
    for step in range(0, 2100, 7):
        now = step / 1000
        n = s.due(now)
        assert all(s.time_of(i) <= now + 1e-9 for i in range(n))
        if n < s.total:
            assert s.time_of(n) > now


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0.0, "duration": 1.0},
        {"rate": 10.0, "duration": -1.0},
        {"rate": 10.0, "duration": 1.0, "worker": 2, "workers": 2},
    ],
)
def test_rejects_impossible_schedules(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Schedule(start=0.0, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("streams", "workers"), [(4, 2), (5, 2), (7, 3), (3, 3)])
def test_streams_are_shared_out_among_workers(streams: int, workers: int) -> None:
    lanes = [lanes_of(w, workers, streams) for w in range(workers)]
    assert sum(lanes) == streams
    assert min(lanes) >= 1 and max(lanes) - min(lanes) <= 1
