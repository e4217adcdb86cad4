"""StoreClock: the offset of Redis' clock to the event loop's, as a lower bound, and the
deadline a batch carries (no I/O: loop times and Redis times are given)."""

from __future__ import annotations

import pytest

from chargepath.store.clock import DRIFT, MAX_AGE_MS, StoreClock

# Redis' clock is this far ahead of the loop's (ms): the offset the estimates must not exceed
TRUE_OFFSET = 1_700_000_000_000.0


def reply(clock: StoreClock, sent_s: float, ran_s: float, received_s: float) -> None:
    """A call sent at loop time ``sent_s``, run by Redis at ``ran_s``, read at ``received_s``."""
    clock.observe(sent_s, received_s, int(ran_s * 1000 + TRUE_OFFSET))


def test_no_deadline_before_the_first_reply() -> None:
    clock = StoreClock()
    assert clock.offset_ms(10.0) is None
    assert clock.deadline_ms(10.05) == 0


def test_the_estimate_is_a_lower_bound_and_the_tightest_reply_wins() -> None:
    clock = StoreClock()
    reply(clock, 10.000, 10.004, 10.020)  # a slow reply: 20 ms round trip
    loose = clock.offset_ms(10.020)
    assert loose is not None and TRUE_OFFSET - 17 <= loose <= TRUE_OFFSET
    reply(clock, 10.100, 10.1003, 10.1006)  # a fast one: 0.6 ms
    tight = clock.offset_ms(10.1006)
    assert tight is not None and TRUE_OFFSET - 1 <= tight <= TRUE_OFFSET
    # a later slow reply does not loosen it
    reply(clock, 10.200, 10.201, 10.230)
    again = clock.offset_ms(10.230)
    assert again is not None and again >= tight - 1


def test_the_deadline_is_never_later_on_redis_clock_than_the_gateways() -> None:
    clock = StoreClock()
    for i in range(50):
        t = 20.0 + i * 0.01
        reply(clock, t, t + 0.0002 * (i % 7), t + 0.0003 * (i % 7) + 0.0001)
    deadline_s = 20.55
    sent = clock.deadline_ms(deadline_s)
    assert sent <= deadline_s * 1000 + TRUE_OFFSET - 1  # rounded down, 1 ms earlier
    assert sent >= deadline_s * 1000 + TRUE_OFFSET - 3  # and not much earlier


def test_the_estimate_ages_by_the_drift_and_expires() -> None:
    clock = StoreClock()
    reply(clock, 30.0, 30.0, 30.0)
    fresh = clock.offset_ms(30.0)
    assert fresh is not None
    later = clock.offset_ms(30.0 + MAX_AGE_MS / 1000)
    assert later == pytest.approx(fresh - DRIFT * MAX_AGE_MS)
    assert clock.offset_ms(30.0 + MAX_AGE_MS / 1000 + 0.001) is None
    assert clock.deadline_ms(30.0 + MAX_AGE_MS / 1000 + 0.05) == 0


def test_a_clock_stepped_back_replaces_the_estimate() -> None:
    clock = StoreClock()
    reply(clock, 40.0, 40.0001, 40.0002)
    # Redis' clock steps back 2 s (a failover to a host behind): even the reply's upper bound
    # is below the estimate, which would now send deadlines 2 s too late
    clock.observe(40.1, 40.1002, int(40.1001 * 1000 + TRUE_OFFSET - 2000))
    stepped = clock.offset_ms(40.1002)
    assert stepped is not None and stepped <= TRUE_OFFSET - 2000


def test_an_encoded_deadline_is_positive_whole_milliseconds() -> None:
    clock = StoreClock()
    clock.observe(0.0, 0.001, 1)  # a Redis clock barely past its epoch, in a test
    assert clock.deadline_ms(0.0) == 1  # never 0, which would mean "no deadline"
    assert isinstance(clock.deadline_ms(0.5), int)
