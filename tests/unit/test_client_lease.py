"""The client's lease state machine (`chargepath_client._lease.BaseLease`), without I/O.

A fake clock and an in-memory model of the gateway's lease rules stand in for the network:
what is proven here is the client's bookkeeping (what it allows locally, what it reports,
when it renews, rotates, freezes and releases). The claims against a real gateway (renewal,
reporting, release, expiry, exactness) are in tests/e2e/test_client_lease.py.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import grpc
import pytest

from chargepath_client import InvalidUsage, LeaseAnswer, RetryPolicy
from chargepath_client._lease import (
    DONE,
    MIN_PAUSE,
    AskKind,
    BaseLease,
    PlannedAsk,
)
from chargepath_protos.v1 import lease_pb2
from chargepath_protos.v1 import metering_pb2 as pb

pytestmark = pytest.mark.unit

VALIDITY = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class WakeCountingLease(BaseLease):
    __slots__ = ("wakes",)

    def _wake(self) -> None:
        self.wakes += 1


def make_lease(clock: Clock, units: int = 100, **options: object) -> WakeCountingLease:
    lease = WakeCountingLease(
        "cpaas-demo",
        "api.sms.send",
        units=units,
        key="key-1",
        retry=RetryPolicy(),
        attempt_timeout=2.0,
        clock=clock,
        **options,  # type: ignore[arg-type]
    )
    lease.wakes = 0
    return lease


@dataclass
class FakeLease:
    granted: int = 0
    used: int = 0
    expires_at: float = 0.0
    closed: bool = False


@dataclass
class FakeGateway:
    """The lease rules of lease.proto over one pool of units: a grant takes from the pool,
    a report records `used` (beyond the grant: overage), release and expiry refund what was
    granted and not used. Renewals extend the validity."""

    clock: Clock
    pool: int
    renew_below_pct: int = 20
    leases: dict[str, FakeLease] = field(default_factory=dict)
    answers: dict[str, lease_pb2.LeaseAnswer] = field(default_factory=dict)
    recorded: int = 0
    overage: int = 0
    granted_total: int = 0

    def expire(self) -> None:
        for lease in self.leases.values():
            if not lease.closed and self.clock.now >= lease.expires_at:
                self._end(lease)

    def _end(self, lease: FakeLease) -> int:
        lease.closed = True
        refund = max(0, lease.granted - lease.used)
        self.pool += refund
        return refund

    def ask(self, ask: lease_pb2.LeaseAsk) -> LeaseAnswer:
        if ask.request_id in self.answers:
            stored = lease_pb2.LeaseAnswer()
            stored.CopyFrom(self.answers[ask.request_id])
            stored.replayed = True
            return LeaseAnswer.from_pb(stored)
        self.expire()
        answer = lease_pb2.LeaseAnswer(request_id=ask.request_id, decision=pb.DECISION_ALLOW)
        if ask.lease_id:
            lease = self.leases[ask.lease_id]
            if lease.closed:
                self.overage += ask.used
                answer.reason = pb.REASON_LEASE_EXPIRED
                answer.closed = True
                answer.overage = ask.used
                self.answers[ask.request_id] = answer
                return LeaseAnswer.from_pb(answer)
            within = max(0, min(ask.used, lease.granted - lease.used))
            lease.used += ask.used
            self.recorded += within
            self.overage += ask.used - within
            answer.recorded, answer.overage = within, ask.used - within
            lease_id = ask.lease_id
            if ask.release:
                answer.refunded = self._end(lease)
                answer.closed = True
        else:
            if min(ask.requested, self.pool) == 0:  # no lease is opened
                answer.decision = pb.DECISION_THROTTLE
                answer.reason = pb.REASON_RATE_LIMITED
                answer.retry_after.FromMilliseconds(250)
                answer.final_units = True
                self.answers[ask.request_id] = answer
                return LeaseAnswer.from_pb(answer)
            lease_id = f"lease-{len(self.leases) + 1}"
            lease = FakeLease()
            self.leases[lease_id] = lease
        answer.lease_id = lease_id
        if ask.requested and not lease.closed:
            grant = min(ask.requested, self.pool)
            if grant == 0:
                answer.decision = pb.DECISION_THROTTLE
                answer.reason = pb.REASON_RATE_LIMITED
                answer.retry_after.FromMilliseconds(250)
            self.pool -= grant
            lease.granted += grant
            self.granted_total += grant
            answer.granted = grant
            answer.final_units = self.pool == 0
            if grant:
                answer.renew_below = -(-grant * self.renew_below_pct // 100)
                lease.expires_at = self.clock.now + VALIDITY
        if not lease.closed:
            answer.available = max(0, lease.granted - lease.used)
            answer.valid_for.FromMilliseconds(
                round(max(0.0, lease.expires_at - self.clock.now) * 1000)
            )
        self.answers[ask.request_id] = answer
        return LeaseAnswer.from_pb(answer)


def step(lease: BaseLease, gateway: FakeGateway) -> object:
    """One turn of the background: plan, and send what it plans (answered at once)."""
    planned = lease.plan(gateway.clock.now)
    if isinstance(planned, PlannedAsk):
        lease.applied(planned, gateway.ask(planned.request), gateway.clock.now, gateway.clock.now)
    return planned


def settle(lease: BaseLease, gateway: FakeGateway, limit: int = 50) -> None:
    """Run the background until it has nothing to send now."""
    for _ in range(limit):
        if not isinstance(step(lease, gateway), PlannedAsk):
            return
    raise AssertionError("the lease kept asking")


def spend(lease: BaseLease, n: int) -> int:
    return sum(lease.try_acquire() for _ in range(n))


def test_nothing_is_allowed_before_the_first_grant() -> None:
    lease = make_lease(Clock())
    assert lease.try_acquire() is False
    planned = lease.plan(0.0)
    assert isinstance(planned, PlannedAsk) and planned.kind is AskKind.OPEN
    ask = planned.request
    assert (ask.requested, ask.used, ask.lease_id, ask.release) == (100, 0, "", False)
    subject = (ask.subject.tenant, ask.subject.key, ask.metric)
    assert subject == ("cpaas-demo", "key-1", "api.sms.send")


def test_a_grant_is_spent_locally_and_renewed_at_the_threshold() -> None:
    clock = Clock()
    gateway = FakeGateway(clock, pool=1000)
    lease = make_lease(clock)
    settle(lease, gateway)
    assert (lease.lease_id, lease.available, lease.final) == ("lease-1", 100, False)

    assert spend(lease, 79) == 79 and lease.wakes == 0
    assert lease.try_acquire() is True  # available falls to renew_below (20): wake once
    assert lease.wakes == 1
    assert spend(lease, 5) == 5 and lease.wakes == 1
    planned = lease.plan(clock.now)
    assert isinstance(planned, PlannedAsk) and planned.kind is AskKind.RENEW
    assert (planned.request.used, planned.request.requested) == (85, 100)
    assert planned.request.lease_id == "lease-1"
    # Spent while the renewal is in flight: still within the first grant.
    assert spend(lease, 20) == 15
    lease.applied(planned, gateway.ask(planned.request), clock.now, clock.now)
    assert lease.available == 100  # 200 granted, 100 spent
    assert lease.unreported == 15
    assert gateway.recorded == 85


def test_a_request_larger_than_what_is_left_asks_for_more() -> None:
    clock = Clock()
    gateway = FakeGateway(clock, pool=1000)
    lease = make_lease(clock)
    settle(lease, gateway)
    assert lease.try_acquire(101) is False
    assert lease.wakes == 1
    planned = lease.plan(clock.now)
    assert isinstance(planned, PlannedAsk) and planned.kind is AskKind.RENEW
    lease.applied(planned, gateway.ask(planned.request), clock.now, clock.now)
    assert lease.try_acquire(101) is True


def test_a_throttled_renewal_waits_for_retry_after() -> None:
    clock = Clock()
    gateway = FakeGateway(clock, pool=100)
    lease = make_lease(clock)
    settle(lease, gateway)
    assert lease.final is True  # the pool is empty after this grant
    assert spend(lease, 100) == 100
    planned = step(lease, gateway)
    assert isinstance(planned, PlannedAsk) and planned.kind is AskKind.RENEW
    assert lease.last_answer is not None and lease.last_answer.retry_after == 0.25
    assert lease.try_acquire() is False
    wait = lease.plan(clock.now)
    assert wait == pytest.approx(0.25)
    gateway.pool += 50  # e.g. the bucket refilled
    clock.now += 0.25
    settle(lease, gateway)
    assert lease.available == 50 and spend(lease, 60) == 50


def test_units_spent_when_the_lease_expired_are_reported_and_a_new_lease_is_opened() -> None:
    clock = Clock()
    gateway = FakeGateway(clock, pool=1000)
    lease = make_lease(clock)
    settle(lease, gateway)
    assert spend(lease, 10) == 10
    planned = lease.plan(clock.now)
    assert isinstance(planned, PlannedAsk) is False  # nothing to do: below the threshold
    # The gateway expires the lease (its clock went further than ours said).
    gateway.leases["lease-1"].expires_at = clock.now
    renew = lease._ask(AskKind.REPORT, lease._current, 10)
    assert spend(lease, 5) == 5  # spent while the report is in flight
    lease.applied(renew, gateway.ask(renew.request), clock.now, clock.now)
    assert lease.lease_id == "" and lease.try_acquire() is False
    release = lease.plan(clock.now)
    assert isinstance(release, PlannedAsk) and release.kind is AskKind.RELEASE
    assert (release.request.lease_id, release.request.used) == ("lease-1", 5)
    lease.applied(release, gateway.ask(release.request), clock.now, clock.now)
    settle(lease, gateway)
    assert lease.lease_id == "lease-2" and lease.available == 100
    assert gateway.overage == 15 and lease.unreported == 0


def test_a_lease_is_rotated_before_it_expires_without_a_stall() -> None:
    clock = Clock()
    gateway = FakeGateway(clock, pool=1000)
    lease = make_lease(clock, report_every=None)
    settle(lease, gateway)
    assert spend(lease, 30) == 30
    clock.now += VALIDITY * 0.6
    planned = lease.plan(clock.now)
    assert isinstance(planned, PlannedAsk) and planned.kind is AskKind.OPEN
    assert spend(lease, 10) == 10  # the old lease still spends while the new one opens
    lease.applied(planned, gateway.ask(planned.request), clock.now, clock.now)
    assert lease.lease_id == "lease-2" and lease.available == 100
    release = lease.plan(clock.now)
    assert isinstance(release, PlannedAsk) and release.kind is AskKind.RELEASE
    assert (release.request.lease_id, release.request.used, release.request.release) == (
        "lease-1",
        40,
        True,
    )
    lease.applied(release, gateway.ask(release.request), clock.now, clock.now)
    assert gateway.leases["lease-1"].closed and gateway.pool == 1000 - 200 + 60
    assert lease.unreported == 0


def test_a_lease_that_cannot_be_renewed_stops_spending_before_it_expires() -> None:
    clock = Clock()
    gateway = FakeGateway(clock, pool=1000)
    lease = make_lease(clock, report_every=None)
    settle(lease, gateway)
    assert spend(lease, 10) == 10
    # The gateway is unreachable: the rotation is never answered; at the expiry minus the
    # margin the lease stops spending on its own.
    clock.now += VALIDITY - 1.0
    planned = lease.plan(clock.now)
    assert isinstance(planned, PlannedAsk) and planned.kind is AskKind.RELEASE
    assert lease.try_acquire() is False and lease.available == 0
    assert planned.request.used == 10


def test_attempts_keep_their_request_id_and_stop_spending_at_the_expiry() -> None:
    clock = Clock()
    gateway = FakeGateway(clock, pool=1000)
    lease = make_lease(clock)
    settle(lease, gateway)
    assert spend(lease, 85) == 85
    planned = lease.plan(clock.now)
    assert isinstance(planned, PlannedAsk)

    class Unavailable(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "connection refused"

        def trailing_metadata(self) -> None:
            return None

    pause = lease.pause_after(planned, Unavailable(), clock.now)
    assert pause is not None and lease.failure is None
    assert lease.try_acquire() is True  # still within the grant's validity
    clock.now += VALIDITY
    assert lease.pause_after(planned, Unavailable(), clock.now) is not None
    assert lease.try_acquire() is False  # past the local expiry: nothing more is spent
    # The same ask (same request id) finally gets through: the gateway has expired the
    # lease, so the units are overage, and the lease moves on to a new one.
    lease.applied(planned, gateway.ask(planned.request), clock.now - VALIDITY, clock.now)
    settle(lease, gateway)
    assert lease.lease_id == "lease-2"
    assert gateway.recorded + gateway.overage == lease.spent


def test_a_final_failure_stops_the_lease() -> None:
    clock = Clock()
    lease = make_lease(clock)
    planned = lease.plan(clock.now)
    assert isinstance(planned, PlannedAsk)

    class Denied(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.PERMISSION_DENIED

        def details(self) -> str:
            return "this credential acts for another tenant"

        def trailing_metadata(self) -> None:
            return None

    assert lease.pause_after(planned, Denied(), clock.now) is None
    assert lease.failure is not None and lease.failure.code == grpc.StatusCode.PERMISSION_DENIED
    assert lease.plan(clock.now) is DONE and lease.try_acquire() is False


def test_report_every_reports_a_slow_spender() -> None:
    clock = Clock()
    gateway = FakeGateway(clock, pool=1000)
    lease = make_lease(clock, report_every=1.0)
    settle(lease, gateway)
    assert spend(lease, 3) == 3
    assert lease.plan(clock.now) == pytest.approx(1.0)
    clock.now += 1.0
    planned = lease.plan(clock.now)
    assert isinstance(planned, PlannedAsk) and planned.kind is AskKind.REPORT
    assert (planned.request.used, planned.request.requested) == (3, 0)
    lease.applied(planned, gateway.ask(planned.request), clock.now, clock.now)
    assert gateway.recorded == 3 and lease.available == 97 and lease.unreported == 0


def test_closing_reports_the_rest_and_releases() -> None:
    clock = Clock()
    gateway = FakeGateway(clock, pool=1000)
    lease = make_lease(clock)
    settle(lease, gateway)
    assert spend(lease, 42) == 42
    lease._start_closing(5.0)
    assert lease.try_acquire() is False
    planned = lease.plan(clock.now)
    assert isinstance(planned, PlannedAsk) and planned.kind is AskKind.RELEASE
    assert (planned.request.used, planned.request.release) == (42, True)
    lease.applied(planned, gateway.ask(planned.request), clock.now, clock.now)
    assert lease.plan(clock.now) is DONE
    assert gateway.pool == 1000 - 42 and gateway.recorded == 42
    assert lease._close_error() is None


def test_a_refused_open_waits_and_asks_again() -> None:
    clock = Clock()
    gateway = FakeGateway(clock, pool=0)
    lease = make_lease(clock)
    planned = step(lease, gateway)
    assert isinstance(planned, PlannedAsk)
    assert lease.try_acquire() is False
    assert lease.plan(clock.now) == pytest.approx(0.25)
    gateway.pool = 7
    clock.now += 0.25
    settle(lease, gateway)
    assert lease.available == 7


def test_a_refusal_without_retry_after_waits_a_little() -> None:
    clock = Clock()
    lease = make_lease(clock)
    planned = lease.plan(clock.now)
    assert isinstance(planned, PlannedAsk)
    deny = lease_pb2.LeaseAnswer(
        request_id=planned.request.request_id,
        decision=pb.DECISION_DENY,
        reason=pb.REASON_NO_ENTITLEMENT,
        message="limit 'sms-per-key' grants no lease",
    )
    lease.applied(planned, LeaseAnswer.from_pb(deny), clock.now, clock.now)
    assert lease.plan(clock.now) == pytest.approx(MIN_PAUSE)
    assert lease.last_answer is not None and "sms-per-key" in lease.last_answer.message


@pytest.mark.parametrize("seed", range(20))
def test_random_runs_never_spend_more_than_granted_and_report_everything(seed: int) -> None:
    """Spending, renewals, reports, expiries the client did not see coming, refusals and a
    close, in random order: every unit allowed locally is reported exactly once, and
    (outside expiries) never more than the gateway granted."""
    rng = random.Random(seed)
    clock = Clock()
    gateway = FakeGateway(clock, pool=rng.randrange(50, 2000))
    lease = make_lease(clock, units=rng.randrange(1, 300), report_every=rng.choice([None, 0.5]))
    for _ in range(400):
        action = rng.random()
        if action < 0.5:
            spend(lease, rng.randrange(1, 40))
        elif action < 0.8:
            step(lease, gateway)
        elif action < 0.9:
            clock.now += rng.uniform(0, VALIDITY / 2)
        elif action < 0.95:
            gateway.pool += rng.randrange(0, 100)
        else:
            # the gateway's clock runs ahead: it expires a live lease
            for held in gateway.leases.values():
                if not held.closed and rng.random() < 0.5:
                    held.expires_at = clock.now
            gateway.expire()
        assert lease.spent <= gateway.granted_total
    lease._start_closing(5.0)
    for _ in range(20):
        if step(lease, gateway) is DONE:
            break
    assert lease.plan(clock.now) is DONE
    assert gateway.recorded + gateway.overage == lease.spent
    assert lease.unreported == 0
    # Everything granted and not recorded went back.
    assert all(held.closed for held in gateway.leases.values())


@pytest.mark.parametrize(
    ("changes", "field_name"),
    [
        ({"tenant": "cpaas demo"}, "tenant"),
        ({"metric": "API.SMS"}, "metric"),
        ({"units": 0}, "units"),
        ({"units": 10**13}, "units"),
        ({"holder": "api gw 3"}, "holder"),
        ({"holder": "x" * 129}, "holder"),
        ({"key": "key 1"}, "key"),
        ({"labels": {"": "x"}}, "labels"),
    ],
)
def test_lease_arguments_are_validated_like_a_usage(
    changes: dict[str, object], field_name: str
) -> None:
    arguments: dict[str, object] = {
        "tenant": "cpaas-demo",
        "metric": "api.sms.send",
        "units": 10,
        "holder": "api-gw-3:worker/1",
        **changes,
    }
    with pytest.raises(InvalidUsage) as caught:
        BaseLease(
            arguments.pop("tenant"),  # type: ignore[arg-type]
            arguments.pop("metric"),  # type: ignore[arg-type]
            retry=RetryPolicy(),
            attempt_timeout=1.0,
            clock=Clock(),
            **arguments,  # type: ignore[arg-type]
        )
    assert caught.value.field == field_name


@pytest.mark.parametrize(("n", "reason"), [(0, "at least 1"), (-3, "at least 1"), (1.5, "integer")])
def test_try_acquire_refuses_a_bad_amount(n: object, reason: str) -> None:
    lease = make_lease(Clock())
    with pytest.raises(InvalidUsage) as caught:
        lease.try_acquire(n)  # type: ignore[arg-type]
    assert caught.value.field == "n" and reason in caught.value.reason


def test_the_client_lease_answer_carries_every_field_of_the_wire_answer() -> None:
    wire = {f.name for f in lease_pb2.LeaseAnswer.DESCRIPTOR.fields} - {"violations"}
    assert wire == {f.name for f in dataclasses.fields(LeaseAnswer)} - {"raw"}
    answer = lease_pb2.LeaseAnswer(
        decision=pb.DECISION_ALLOW, reason=pb.REASON_LEASE_EXPIRED, closed=True, granted=3
    )
    answer.valid_for.FromMilliseconds(1500)
    client = LeaseAnswer.from_pb(answer)
    assert (client.allowed, client.reason.value, client.closed, client.valid_for) == (
        True,
        "lease_expired",
        True,
        1.5,
    )


def test_an_answer_that_did_nothing_is_resent_with_the_same_request_id() -> None:
    """The gateway answers THROTTLE STORE_UNAVAILABLE when its store is down: nothing was
    recorded, so the report must go again, as it was."""
    clock = Clock()
    gateway = FakeGateway(clock, pool=1000)
    lease = make_lease(clock)
    settle(lease, gateway)
    assert spend(lease, 85) == 85
    planned = lease.plan(clock.now)
    assert isinstance(planned, PlannedAsk) and planned.kind is AskKind.RENEW
    unavailable = lease_pb2.LeaseAnswer(
        request_id=planned.request.request_id,
        lease_id="lease-1",
        decision=pb.DECISION_THROTTLE,
        reason=pb.REASON_STORE_UNAVAILABLE,
    )
    unavailable.retry_after.FromMilliseconds(100)
    pause = lease.resend_after(planned, LeaseAnswer.from_pb(unavailable), clock.now)
    assert pause == pytest.approx(0.1)
    assert lease.unreported == 85 and lease.available == 15  # nothing applied
    answer = gateway.ask(planned.request)
    assert lease.resend_after(planned, answer, clock.now) is None
    lease.applied(planned, answer, clock.now, clock.now)
    assert gateway.recorded == 85 and lease.unreported == 0


def test_reports_do_not_postpone_the_rotation_of_a_lease_that_is_not_renewed() -> None:
    clock = Clock()
    gateway = FakeGateway(clock, pool=1000)
    lease = make_lease(clock, report_every=1.0)
    settle(lease, gateway)
    for _ in range(5):  # a slow spender: a report a second, no renewal
        assert spend(lease, 1) == 1
        clock.now += 1.0
        planned = lease.plan(clock.now)
        assert isinstance(planned, PlannedAsk) and planned.kind is AskKind.REPORT
        lease.applied(planned, gateway.ask(planned.request), clock.now, clock.now)
    clock.now += VALIDITY * 0.6 - 5.0
    planned = lease.plan(clock.now)
    assert isinstance(planned, PlannedAsk) and planned.kind is AskKind.OPEN  # rotated on time


def test_the_sync_lease_counts_exactly_under_threads() -> None:
    """Four threads taking from one `Lease` (its lock around the counter): together they are
    allowed exactly what the lease holds, no unit twice and none lost."""
    import threading

    from chargepath_client import Lease

    def unused_call(*args: object, **kwargs: object) -> lease_pb2.LeaseResponse:
        raise AssertionError("no call is made")

    lease = Lease(unused_call, (), "cpaas-demo", "api.sms.send", units=10)
    lease._limit = 200_000  # as if granted: try_acquire decides on the counters alone
    allowed = [0] * 4

    def take(i: int) -> None:
        while lease.try_acquire():
            allowed[i] += 1

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == lease.spent == 200_000
    assert lease.available == 0
