"""Retry decisions of the client, with a fake clock and no sleeping."""

from __future__ import annotations

import grpc
import pytest

from chargepath_client import Decision, LimitKind, Reason, RetryPolicy, Scope, Verdict
from chargepath_client._retry import Attempts
from chargepath_protos.v1 import metering_pb2 as pb

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_grows_exponentially_up_to_the_cap_with_full_jitter() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, backoff_multiplier=2.0)
    assert [policy.backoff(n, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5, 50, 10**6)] == [
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
        1.0,
        1.0,
    ]
    assert policy.backoff(3, rand=lambda: 0.0) == 0.0
    assert policy.backoff(3, rand=lambda: 0.5) == pytest.approx(0.2)


def test_unavailable_is_retried_until_max_attempts() -> None:
    clock = FakeClock()
    attempts = Attempts(RetryPolicy(max_attempts=3), 10.0, clock=clock, rand=lambda: 1.0)
    pauses = []
    while attempts.start() is not None:
        pause = attempts.retry_after(grpc.StatusCode.UNAVAILABLE)
        if pause is None:
            break
        pauses.append(pause)
        clock.now += pause
    assert attempts.made == 3
    assert pauses == [0.05, 0.1]


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
    ],
)
def test_permanent_failures_are_not_retried(code: grpc.StatusCode) -> None:
    attempts = Attempts(RetryPolicy(), 10.0, clock=FakeClock())
    assert attempts.start() == 10.0
    assert attempts.retry_after(code) is None


def test_a_send_broken_by_the_transport_is_retried_but_a_server_internal_error_is_not() -> None:
    policy = RetryPolicy()
    assert policy.is_transient(grpc.StatusCode.INTERNAL, "Internal error from Core")
    assert not policy.is_transient(grpc.StatusCode.INTERNAL, "internal error, incident 1f2e")
    assert not RetryPolicy(retryable_codes=frozenset()).is_transient(
        grpc.StatusCode.INTERNAL, "Internal error from Core"
    )


def test_deadline_exceeded_is_retried_only_when_the_per_attempt_timeout_ran_out() -> None:
    clock = FakeClock()
    per_attempt = Attempts(RetryPolicy(per_attempt_timeout=0.5), 2.0, clock=clock)
    assert per_attempt.start() == 0.5
    clock.now += 0.5
    assert per_attempt.retry_after(grpc.StatusCode.DEADLINE_EXCEEDED) is not None

    overall = Attempts(RetryPolicy(), 2.0, clock=clock)
    assert overall.start() == 2.0
    clock.now += 2.0
    assert overall.retry_after(grpc.StatusCode.DEADLINE_EXCEEDED) is None


def test_the_last_attempt_gets_only_what_is_left_of_the_deadline() -> None:
    clock = FakeClock()
    attempts = Attempts(RetryPolicy(per_attempt_timeout=0.8), 1.0, clock=clock, rand=lambda: 0.0)
    assert attempts.start() == 0.8
    clock.now += 0.8
    assert attempts.retry_after(grpc.StatusCode.DEADLINE_EXCEEDED) == 0.0
    assert attempts.start() == pytest.approx(0.2)
    clock.now += 0.2
    assert attempts.retry_after(grpc.StatusCode.UNAVAILABLE) is None
    assert attempts.start() is None


def test_no_retry_when_the_pause_would_outlast_the_deadline() -> None:
    clock = FakeClock()
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=1.0)
    attempts = Attempts(policy, 0.5, clock=clock, rand=lambda: 1.0)
    attempts.start()
    assert attempts.retry_after(grpc.StatusCode.UNAVAILABLE) is None


def test_disabled_policy_never_retries() -> None:
    attempts = Attempts(RetryPolicy.disabled(), 10.0, clock=FakeClock())
    attempts.start()
    assert attempts.retry_after(grpc.StatusCode.UNAVAILABLE) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_backoff": -1.0},
        {"initial_backoff": 2.0, "max_backoff": 1.0},
        {"backoff_multiplier": 0.5},
        {"per_attempt_timeout": 0.0},
    ],
)
def test_a_nonsensical_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_a_verdict_is_built_from_the_protobuf_message() -> None:
    raw = pb.Verdict(
        request_id="r-1",
        decision=pb.DECISION_THROTTLE,
        reason=pb.REASON_RATE_LIMITED,
        limits=[
            pb.LimitStatus(
                name="sms-per-key",
                kind=pb.LIMIT_KIND_RATE,
                scope=pb.SCOPE_KEY,
                remaining=-2,
                capacity=20,
                soft=False,
                exceeded=True,
            )
        ],
        policy_version=7,
        decision_id="ab" * 16,
        recorded=False,
        replayed=True,
    )
    raw.retry_after.FromMilliseconds(250)
    raw.limits[0].reset_after.FromMilliseconds(2100)
    verdict = Verdict.from_pb(raw)
    assert verdict.decision is Decision.THROTTLE and not verdict.allowed
    assert verdict.reason is Reason.RATE_LIMITED
    assert verdict.retry_after == 0.25
    assert verdict.limits[0].kind is LimitKind.RATE
    assert verdict.limits[0].scope is Scope.KEY
    assert verdict.limits[0].remaining == -2
    assert verdict.limits[0].reset_after == pytest.approx(2.1)
    assert verdict.replayed and not verdict.recorded
    assert verdict.decided_at is None
    assert verdict.raw is raw
    assert verdict == Verdict.from_pb(pb.Verdict.FromString(raw.SerializeToString()))
    with pytest.raises(AttributeError):
        verdict.decision = Decision.ALLOW  # type: ignore[misc]


def test_an_unknown_enum_number_maps_to_unspecified() -> None:
    verdict = Verdict.from_pb(pb.Verdict(decision=99, reason=99))  # type: ignore[arg-type]
    assert verdict.decision is Decision.UNSPECIFIED
    assert verdict.reason is Reason.UNSPECIFIED
