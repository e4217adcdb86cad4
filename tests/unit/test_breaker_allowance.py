from chargepath.core.allowance import LocalAllowance
from chargepath.core.breaker import BreakerState, CircuitBreaker
from chargepath.core.model import LimitKind, Scope, Subject
from chargepath.core.policy import Limit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def test_breaker_opens_after_threshold_and_probes_after_cooldown() -> None:
    clock = FakeClock()
    b = CircuitBreaker(clock, failures=3, cooldown_ms=1000)
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state is BreakerState.OPEN
    assert not b.allow()
    clock.now += 999
    assert not b.allow()
    clock.now += 1
    assert b.allow()  # the one probe
    assert not b.allow()  # no second probe while the first is out
    b.failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.now += 1000
    assert b.allow()
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow()


def test_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(FakeClock(), failures=3)
    b.failure()
    b.failure()
    b.success()
    b.failure()
    b.failure()
    assert b.state is BreakerState.CLOSED


def test_a_timeout_alone_never_opens_the_breaker_it_asks_for_one_probe() -> None:
    """A store call's timeout is not evidence against the store (the gateway's loop may have
    been late): it asks for a probe, once while one runs; only a failed probe opens."""
    b = CircuitBreaker(FakeClock(), failures=2)
    assert b.suspect()  # the first timeout starts a probe
    for _ in range(10):
        assert not b.suspect()  # no second probe while it runs
    assert b.state is BreakerState.CLOSED and b.allow()
    b.success()  # the probe's PING was answered: the store is healthy
    b.probe_running = False
    assert b.state is BreakerState.CLOSED and b.openings == 0
    assert b.suspect()  # a later timeout may probe again


def test_a_failed_probe_opens_at_once_and_a_successful_one_closes() -> None:
    clock = FakeClock()
    b = CircuitBreaker(clock, failures=5, cooldown_ms=250)
    assert b.suspect()
    b.probe_failed()
    assert b.state is BreakerState.OPEN and not b.allow() and b.openings == 1
    b.probe_failed()  # still unanswered: open again, one opening
    assert b.openings == 1
    clock.now += 100
    b.success()  # the next probe was answered, before the cooldown ended
    assert b.state is BreakerState.CLOSED and b.allow()


RATE = Limit("burst", LimitKind.RATE, Scope.TENANT, False, capacity=10, scale=100, refill_per_ms=1)
QUOTA = Limit("monthly", LimitKind.QUOTA, Scope.TENANT, False, amount=1)


def test_local_allowance_is_bounded_by_the_plans_rate() -> None:
    clock = FakeClock()
    a = LocalAllowance(clock)
    s = Subject("acme")
    # capacity 10 units, refill 1 sub-unit/ms at 100 sub-units/unit = 10 units/s
    assert a.take(s, (RATE, QUOTA), 10) == 0
    assert a.take(s, (RATE, QUOTA), 1) == 100  # exact wait for one unit
    clock.now += 100
    assert a.take(s, (RATE, QUOTA), 1) == 0
    assert a.take(s, (RATE,), 11) == -1  # can never fit
    assert a.take(Subject("other"), (RATE,), 10) == 0  # per subject
