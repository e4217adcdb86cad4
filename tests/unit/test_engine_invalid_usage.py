"""An invalid usage is refused by the engine before the store is asked, with its reasons as
structures: on a stream, an INVALID_USAGE verdict whose ``violations`` are what validation
found (``message`` is their text); on Check, an :class:`InvalidUsageError` carrying them.

The store here only serves the policy: validation needs no store, and its ``decide`` fails
the test if it is reached. Nothing here claims Redis behaviour."""

from __future__ import annotations

import pytest

from chargepath.core.model import (
    Decision,
    FieldViolation,
    InvalidUsageError,
    Mode,
    Reason,
    Subject,
    Usage,
    Verdict,
)
from chargepath.core.plans import PolicyDocument, load_policy_text
from chargepath.engine import Engine, EngineSettings
from chargepath.store.base import DecideItem, PublishedPolicy, Reversal
from chargepath.telemetry import Telemetry

POLICY = """
metrics: [{name: api.sms.send}]
plans: [{name: p, limits: [{name: l, metric: api.sms.send, rate: {capacity: 5, refill: 1}}]}]
tenants: [{name: acme, plan: p}]
"""


class PolicyOnlyStore:
    """Serves one published policy; deciding is not expected."""

    def __init__(self, document: PolicyDocument) -> None:
        self.published = PublishedPolicy(1, document)

    async def decide(
        self,
        tenant: str,
        policy_version: int,
        items: list[DecideItem],
        *,
        ok_limits: bool = True,
        deadline: float | None = None,
    ) -> list[Verdict]:
        raise AssertionError(f"an invalid usage reached the store: {items}")

    async def reverse(self, tenant: str, reversals: list[Reversal]) -> list[bool]:
        raise AssertionError("nothing to reverse here")

    async def publish_policy(
        self, document: PolicyDocument, *, force: bool = False, expected_version: int | None = None
    ) -> PublishedPolicy:
        raise AssertionError("not published here")

    async def load_policy(self) -> PublishedPolicy | None:
        return self.published

    async def policy_version(self) -> int:
        return 1

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def engine() -> Engine:
    e = Engine(PolicyOnlyStore(load_policy_text(POLICY)), EngineSettings(), Telemetry())
    await e.reload_policy()
    return e


async def test_a_stream_invalid_usage_verdict_carries_its_violations() -> None:
    e = await engine()
    bad = Usage("r1", Subject(""), "api.sms.send", 0, Mode.ADMIT)
    unknown = Usage("r2", Subject("acme"), "api.mms.send", 1, Mode.ADMIT)
    (v, w) = await e.decide_batch([bad, unknown])
    assert (v.decision, v.reason) == (Decision.DENY, Reason.INVALID_USAGE)
    assert v.violations == (
        FieldViolation("subject.tenant", "is required"),
        FieldViolation("amount", "must be between 1 and 1000000000000, got 0"),
    )
    # the text is unchanged: the violations joined, as before they were structures
    assert v.message == (
        "subject.tenant: is required; amount: must be between 1 and 1000000000000, got 0"
    )
    assert w.violations == (
        FieldViolation("metric", "unknown metric 'api.mms.send': not in the policy's catalog"),
    )
    assert w.message == str(w.violations[0])


async def test_a_check_of_an_invalid_usage_raises_with_the_same_structures() -> None:
    e = await engine()
    with pytest.raises(InvalidUsageError) as exc:
        await e.check(Usage("", Subject("acme"), "api.sms.send", 1, Mode.ADMIT))
    assert exc.value.violations == [FieldViolation("request_id", "is required")]
