"""The over-limit cache's rules, on an injected clock (no I/O, no sleeps)."""

from __future__ import annotations

import itertools

from chargepath.core.model import (
    Decision,
    LimitKind,
    LimitState,
    Mode,
    Reason,
    Scope,
    Subject,
    Usage,
    Verdict,
)
from chargepath.core.overlimit import CACHED_MESSAGE, OverLimitCache, SeenIds


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def make_cache(clock: Clock, **kw: int) -> OverLimitCache:
    ids = (f"{i:032x}" for i in itertools.count())
    cache = OverLimitCache(clock, lambda: 42, lambda: next(ids), **kw)
    cache.open()
    return cache


def admit(rid: str, amount: int, key: str = "k1", tenant: str = "acme") -> Usage:
    return Usage(rid, Subject(tenant, key=key), "api.sms.send", amount, Mode.ADMIT)


def limit(capacity: int = 10, soft: bool = False, reset: int = 5000) -> LimitState:
    return LimitState("sms", LimitKind.RATE, Scope.KEY, 0, capacity, reset, soft, True)


def throttle(rid: str, retry: int, version: int = 3, **kw: object) -> Verdict:
    return Verdict(
        rid,
        Decision.THROTTLE,
        Reason.RATE_LIMITED,
        "d" * 32,
        version,
        retry_after_ms=retry,
        limits=(limit(),),
        **kw,  # type: ignore[arg-type]
    )


def allow(rid: str, **kw: object) -> Verdict:
    return Verdict(rid, Decision.ALLOW, Reason.OK, "a" * 32, 3, recorded=True, **kw)  # type: ignore[arg-type]


def learn_throttle(cache: OverLimitCache, clock: Clock, amount: int, retry: int) -> None:
    ticket = cache.ticket()
    clock.now += 3  # the store call's round trip
    cache.learn(admit("first", amount), throttle("first", retry), ticket)


def test_a_refusal_answers_larger_amounts_until_retry_after_counted_from_the_send() -> None:
    clock = Clock()
    cache = make_cache(clock)
    sent = clock.now
    learn_throttle(cache, clock, 4, 1000)
    assert cache.answer(admit("r1", 3), 3) is None  # a smaller amount may fit
    hit = cache.answer(admit("r2", 4), 3)
    assert hit is not None and hit.decision is Decision.THROTTLE
    assert hit.reason is Reason.RATE_LIMITED and hit.request_id == "r2"
    assert hit.message == CACHED_MESSAGE and not hit.recorded and not hit.replayed
    assert hit.decision_id != "d" * 32 and hit.decided_at_ms == 42
    # the entry ends 1 ms before sent + retry_after: at most as late as the store's room
    assert hit.retry_after_ms == sent + 999 - clock.now
    assert hit.limits[0].reset_after_ms == 5000 - 3
    assert cache.answer(admit("r3", 10), 3) is not None
    clock.now = sent + 998
    assert cache.answer(admit("r4", 5), 3) is not None
    clock.now = sent + 999
    assert cache.answer(admit("r5", 5), 3) is None
    assert len(cache) == 0


def test_amounts_above_the_smallest_hard_capacity_go_to_the_store() -> None:
    clock = Clock()
    cache = make_cache(clock)
    learn_throttle(cache, clock, 4, 1000)
    assert cache.answer(admit("big", 11), 3) is None  # the store: AMOUNT_EXCEEDS_CAPACITY


def test_another_policy_version_an_invalidation_or_a_closed_subscription_end_entries() -> None:
    clock = Clock()
    cache = make_cache(clock)
    learn_throttle(cache, clock, 1, 10_000)
    assert cache.answer(admit("v4", 1), 4) is None  # a newer version: the entry is gone
    assert cache.answer(admit("v3", 1), 3) is None
    learn_throttle(cache, clock, 1, 10_000)
    cache.invalidate("other")
    assert cache.answer(admit("x", 1), 3) is not None
    cache.invalidate("acme")
    assert cache.answer(admit("y", 1), 3) is None
    learn_throttle(cache, clock, 1, 10_000)
    cache.invalidate(None)
    assert cache.answer(admit("z", 1), 3) is None
    learn_throttle(cache, clock, 1, 10_000)
    cache.close()
    assert not cache.live and cache.ticket() is None
    assert cache.answer(admit("w", 1), 3) is None
    cache.open()
    assert cache.answer(admit("w", 1), 3) is None  # emptied when it closed


def test_a_reply_that_was_on_its_way_during_an_invalidation_is_not_learned() -> None:
    clock = Clock()
    cache = make_cache(clock)
    ticket = cache.ticket()
    cache.invalidate("acme")  # a grant heard before the store's (older) verdict arrived
    cache.learn(admit("a", 1), throttle("a", 5000), ticket)
    assert cache.answer(admit("b", 1), 3) is None
    cache.learn(admit("a", 1), throttle("a", 5000), None)  # taken while not live
    assert cache.answer(admit("b", 1), 3) is None


def test_only_fresh_rate_and_quota_refusals_are_learned() -> None:
    clock = Clock()
    cache = make_cache(clock)
    for verdict in (
        throttle("a", 5000, replayed=True),  # its retry_after is from long ago
        throttle("a", 5000, degraded=True),
        throttle("a", 1),
        throttle("a", 5000)._replace(reason=Reason.STORE_UNAVAILABLE),
        throttle("a", 5000)._replace(decision=Decision.DENY, reason=Reason.SUSPENDED),
        throttle("a", 5000)._replace(limits=(limit(soft=True),)),
    ):
        cache.learn(admit("a", 1), verdict, cache.ticket())
        assert cache.answer(admit("b", 1), 3) is None, verdict
    quota = throttle("q", 5000)._replace(decision=Decision.DENY, reason=Reason.QUOTA_EXHAUSTED)
    cache.learn(admit("q", 1), quota, cache.ticket())
    hit = cache.answer(admit("q2", 1), 3)
    assert hit is not None and hit.reason is Reason.QUOTA_EXHAUSTED
    report = Usage("rep", Subject("acme", key="k1"), "api.sms.send", 1, Mode.REPORT)
    assert cache.answer(report, 3) is None


def test_a_retry_of_an_allowed_request_id_is_never_refused_from_the_cache() -> None:
    clock = Clock()
    cache = make_cache(clock)
    cache.learn(admit("paid", 5), allow("paid"), cache.ticket())
    learn_throttle(cache, clock, 1, 10_000)
    # the same id again, unmarked: it was allowed here, so the store answers (its record)
    assert cache.answer(admit("paid", 5), 3) is None
    assert cache.stats.bypassed_seen == 1
    # a marked retry of an id never seen here goes to the store as well
    assert cache.answer(admit("elsewhere", 5), 3, retried=True) is None
    assert cache.stats.bypassed_retries == 1
    # an allowed stream admit counts the same
    cache.note_allowed(admit("streamed", 2))
    assert cache.answer(admit("streamed", 2), 3) is None


def test_a_request_id_answered_from_the_cache_gets_the_same_answer_again() -> None:
    clock = Clock()
    cache = make_cache(clock)
    learn_throttle(cache, clock, 1, 10_000)
    first = cache.answer(admit("r", 2), 3)
    assert first is not None
    again = cache.answer(admit("r", 2), 3, retried=True)
    assert again is not None and again.replayed
    assert again.decision_id == first.decision_id
    assert cache.answer(admit("r", 3), 3) is None  # another usage under that id: the store


def test_a_fresh_allow_of_a_refused_amount_drops_the_entry() -> None:
    clock = Clock()
    cache = make_cache(clock)
    learn_throttle(cache, clock, 2, 10_000)
    cache.learn(admit("ok", 2), allow("ok"), cache.ticket())
    assert cache.answer(admit("n", 2), 3) is None


def test_entries_are_bounded_least_recently_used_first_out() -> None:
    clock = Clock()
    cache = make_cache(clock, max_entries=3)
    for k in ("k1", "k2", "k3"):
        cache.learn(admit("a", 1, key=k), throttle("a", 10_000), cache.ticket())
    assert cache.answer(admit("b", 1, key="k1"), 3) is not None  # k1 used: k2 is the oldest
    cache.learn(admit("a", 1, key="k4"), throttle("a", 10_000), cache.ticket())
    assert len(cache) == 3
    assert cache.answer(admit("c", 1, key="k2"), 3) is None
    assert cache.answer(admit("d", 1, key="k1"), 3) is not None
    assert cache.answer(admit("e", 1, key="k4"), 3) is not None


def test_seen_ids_keep_every_id_for_the_window_in_fixed_memory() -> None:
    clock = Clock()
    seen = SeenIds(clock, window_ms=600_000, capacity=10_000)
    size = seen.bytes
    for i in range(10_000):
        seen.add("acme", f"id-{i}")
        clock.now += 60  # 10,000 ids over the 600 s window
    assert seen.bytes == size
    clock.now = 1_000_000 + 600_000  # the first id is exactly a window old
    assert all(("acme", f"id-{i}") in seen for i in range(10_000))
    false = sum(("acme", f"other-{i}") in seen for i in range(10_000))
    assert false < 100  # about 0.5 % at capacity (each of the five filters about 0.1 %)
    clock.now += 2 * 600_000  # two windows later every generation has rotated out
    assert not any(("acme", f"id-{i}") in seen for i in range(0, 10_000, 7))
