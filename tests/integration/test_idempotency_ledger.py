"""Idempotency (DESIGN property 2) and the ledger (property 3) against a real redis-server."""

from __future__ import annotations

import asyncio
import random

import redis

from chargepath.core.model import (
    Decision,
    FieldViolation,
    InvalidUsageError,
    Mode,
    Reason,
    Subject,
    Usage,
)
from chargepath.store.redis_store import RedisStore
from tests.conftest import ledger_entries as ledger
from tests.conftest import make_engine
from tests.integration.policies import OPEN, REPORTING


def level(raw: redis.Redis, key: str) -> int:
    return int(raw.hget(key, "l"))  # type: ignore[arg-type]


async def test_one_request_id_ten_times_in_sequence_and_concurrently(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, REPORTING)
    u = Usage("same-id", Subject("mvno", "s1"), "slice.bytes", 700, Mode.REPORT)
    first = await e.check(u)
    seq = [await e.check(u) for _ in range(9)]
    conc = await asyncio.gather(*(e.check(u) for _ in range(10)))
    assert first.recorded and not first.replayed
    for v in [*seq, *conc]:
        assert v.replayed and v.decision_id == first.decision_id
        assert (v.decision, v.reason, v.recorded) == (first.decision, first.reason, True)
    # debited once: the quota counts 700, and the bucket (10 sub-units per unit) holds 300 or
    # a little more (it refills at 100/s), not 1000 - 2 x 700
    assert raw_redis.hget("cp:{mvno}:q:bytes-hourly:s1:", "u") == "700"
    assert 300 * 10 <= level(raw_redis, "cp:{mvno}:r:bytes-rate:s1:") < 400 * 10
    entries = [x for x in ledger(raw_redis, "mvno") if x.request_id == "same-id"]
    assert len(entries) == 1 and entries[0].amount == 700


async def test_concurrent_first_attempts_decide_once(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, OPEN)
    u = Usage("race", Subject("acme", key="k1"), "api.sms.send", 1, Mode.ADMIT)
    verdicts = await asyncio.gather(*(e.check(u) for _ in range(10)))
    assert len({v.decision_id for v in verdicts}) == 1
    assert sum(not v.replayed for v in verdicts) == 1
    assert len(ledger(raw_redis, "acme")) == 1
    # 5 capacity, 1 taken once: 4 more fit exactly
    fresh = await e.check(Usage("other", Subject("acme", key="k1"), "api.sms.send", 4, Mode.ADMIT))
    assert fresh.decision is Decision.ALLOW and fresh.limits[0].remaining == 0


async def test_request_id_reused_for_another_usage_is_refused(store: RedisStore) -> None:
    e = await make_engine(store, OPEN)
    await e.check(Usage("dup", Subject("acme", key="k1"), "api.sms.send", 1, Mode.ADMIT))
    try:
        await e.check(Usage("dup", Subject("acme", key="k1"), "api.sms.send", 2, Mode.ADMIT))
    except InvalidUsageError as exc:
        # the store's structure reaches the caller as it is, not re-parsed from its text
        assert exc.violations == [
            FieldViolation(
                "request_id", "was already used for a different usage within the dedup window"
            )
        ]
        assert str(exc) == (
            "request_id: was already used for a different usage within the dedup window"
        )
    else:
        raise AssertionError("a reused request_id with another amount must be refused")


def session_usage(seq: int, amount: int = 10, session: str = "sess-1") -> Usage:
    return Usage(
        f"u{seq}",
        Subject("mvno", "s1"),
        "slice.bytes",
        amount,
        Mode.REPORT,
        session_id=session,
        sequence=seq,
    )


async def test_stream_resent_from_sequence_zero_counts_nothing_twice(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, REPORTING)
    first = await e.decide_batch([session_usage(i) for i in range(10)])
    assert all(v.recorded and not v.replayed for v in first)
    # reconnect: resend everything from 0, plus 5 new usages
    again = await e.decide_batch([session_usage(i) for i in range(15)])
    assert all(v.replayed for v in again[:10]) and not any(v.replayed for v in again[10:])
    assert [v.decision_id for v in again[:10]] == [v.decision_id for v in first]
    assert [(v.decision, v.reason) for v in again[:10]] == [(v.decision, v.reason) for v in first]
    entries = ledger(raw_redis, "mvno")
    assert sorted(x.request_id for x in entries) == sorted(f"u{i}" for i in range(15))
    assert raw_redis.hget("cp:{mvno}:q:bytes-hourly:s1:", "u") == str(15 * 10)
    # a resend older than the replay window is still not counted twice
    for start in range(15, 15 + 300, 100):
        await e.decide_batch([session_usage(i) for i in range(start, start + 100)])
    old = await e.decide_batch([session_usage(3)])
    assert old[0].reason is Reason.INVALID_USAGE and not old[0].recorded
    assert old[0].message.startswith("sequence:") and "replay window" in old[0].message
    (violation,) = old[0].violations
    assert violation.field == "sequence" and "replay window" in violation.reason
    assert old[0].message == str(violation)
    assert len(ledger(raw_redis, "mvno")) == 315


async def test_a_sequence_never_decided_is_decided_when_it_comes(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    """A usage answered degraded (not recorded) and resent after later ones were recorded is
    recorded then, not mistaken for a resend."""
    e = await make_engine(store, REPORTING)
    await e.decide_batch([session_usage(i) for i in (1, 2, 4, 5)])
    late = await e.decide_batch([session_usage(3), session_usage(4)])
    assert late[0].recorded and not late[0].replayed
    assert late[1].replayed
    rids = sorted(x.request_id for x in ledger(raw_redis, "mvno"))
    assert rids == [f"u{i}" for i in (1, 2, 3, 4, 5)]


async def test_sessions_are_independent(store: RedisStore, raw_redis: redis.Redis) -> None:
    e = await make_engine(store, REPORTING)
    await e.decide_batch([session_usage(1, session="a")])
    v = await e.decide_batch([session_usage(1, session="b")])
    assert not v[0].replayed
    assert len(ledger(raw_redis, "mvno")) == 2


async def test_ledger_holds_every_allowed_admit_and_every_report_once(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    e = await make_engine(store, OPEN + "\n" + "")
    rng = random.Random(7)
    verdicts = []
    usages = []
    for i in range(300):
        if rng.random() < 0.5:
            u = Usage(
                f"a{i}",
                Subject("acme", key=f"k{rng.randrange(3)}"),
                "api.sms.send",
                rng.randint(1, 3),
                Mode.ADMIT,
            )
        else:
            u = Usage(
                f"r{i}", Subject("acme", "s1"), "slice.bytes", rng.randint(1, 10**6), Mode.REPORT
            )
        usages.append(u)
    # a mix of unary calls, batches and retries
    for u in usages[:100]:
        verdicts.append(await e.check(u))
    for i in range(100, 300, 50):
        verdicts.extend(await e.decide_batch(usages[i : i + 50]))
    for u in usages[:100:7]:
        await e.check(u)  # retries change nothing
    by_id = {u.request_id: u for u in usages}
    should = {v.request_id for v in verdicts if v.recorded}
    assert should == {u.request_id for u in usages if u.mode is Mode.REPORT} | {
        v.request_id for v in verdicts if v.decision is Decision.ALLOW
    }
    assert any(v.reason is Reason.RATE_LIMITED for v in verdicts)  # the mix had refusals
    entries = ledger(raw_redis, "acme")
    assert sorted(x.request_id for x in entries) == sorted(should)
    for x in entries:
        assert x.amount == by_id[x.request_id].amount
        assert x.mode == ("report" if by_id[x.request_id].mode is Mode.REPORT else "admit")
