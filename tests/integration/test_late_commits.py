"""Issue #13, items 1 and 2, on a real redis-server: a reused session sequence is refused, a
batch that comes to run past its deadline writes nothing, and a store call that commits after
its caller was answered by the failure policy is reconciled: a refused caller is never billed,
and the recorded flag always agrees with the ledger (counting reversals)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from chargepath.core.model import Decision, Mode, Reason, Subject, Usage, Verdict
from chargepath.core.plans import load_policy_text
from chargepath.engine import Engine, EngineSettings, session_fingerprint
from chargepath.store.base import DecideItem, Reversal
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.ledger import LedgerEntry
from chargepath.store.redis_store import RedisStore
from chargepath.telemetry import Telemetry
from tests.conftest import ledger_entries, make_engine

pytestmark = pytest.mark.integration

POLICY = """
metrics: [{name: api.sms.send}, {name: slice.bytes}]
plans:
  - name: p
    limits:
      - {name: sms, metric: api.sms.send, scope: key,
         rate: {capacity: 1000, refill: 1000, per: second}}
      - {name: bytes, metric: slice.bytes, scope: slice,
         rate: {capacity: 1000000, refill: 1000000, per: second}}
tenants:
  - {name: strict, plan: p, failure_policy: {mode: deny}}
  - {name: open, plan: p, failure_policy: {mode: allow}}
"""

STORE_TIMEOUT_S = 0.05


def admit(rid: str, tenant: str, key: str = "k1", amount: int = 1, **kw: Any) -> Usage:
    return Usage(rid, Subject(tenant, "", key), "api.sms.send", amount, Mode.ADMIT, **kw)


def report(rid: str, tenant: str, amount: int = 100, **kw: Any) -> Usage:
    return Usage(rid, Subject(tenant, "s1"), "slice.bytes", amount, Mode.REPORT, **kw)


def net_billed(entries: list[LedgerEntry]) -> Counter[str]:
    """Per request id: usage entries less reversals (what billing counts)."""
    out: Counter[str] = Counter()
    for e in entries:
        out[e.request_id] += -1 if e.reversal else 1
    return out


def late_counts(reader: InMemoryMetricReader) -> dict[str, int]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        str(p.attributes["outcome"]): int(p.value)  # type: ignore[union-attr]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "chargepath.store.late_replies"
        for p in m.data.data_points  # type: ignore[union-attr]
        if p.value  # type: ignore[union-attr]
    }


async def metered_engine(store: RedisStore) -> tuple[Engine, InMemoryMetricReader]:
    await store.publish_policy(load_policy_text(POLICY))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(TracerProvider(), MeterProvider(metric_readers=[reader]), tracing=False)
    engine = Engine(store, EngineSettings(store_timeout_s=STORE_TIMEOUT_S), telemetry)
    await engine.reload_policy()
    return engine, reader


# -- 1. a reused sequence ---------------------------------------------------------------------


async def test_a_reused_sequence_is_refused_and_a_true_resend_is_replayed(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    engine = await make_engine(store, POLICY)
    first = report("r-1", "strict", 100, session_id="ctl", sequence=7)
    (v,) = await engine.decide_batch([first])
    assert v.recorded and not v.replayed

    # a restarted controller reuses the session and the sequence for another usage
    for other in (
        report("r-2", "strict", 100, session_id="ctl", sequence=7),  # another request id
        report("r-1", "strict", 999, session_id="ctl", sequence=7),  # same id, other amount
    ):
        (w,) = await engine.decide_batch([other])
        assert (w.decision, w.reason, w.recorded, w.replayed) == (
            Decision.DENY,
            Reason.INVALID_USAGE,
            False,
            False,
        )
        assert [x.field for x in w.violations] == ["sequence"]
        assert w.violations[0].reason.startswith(
            "sequence 7 of this session was already used for another usage (decision "
            f"{v.decision_id})"
        )
        assert "must start a new session or continue after its highest sequence" in w.message

    # the true resend (same request id and content) is still answered from the record
    (again,) = await engine.decide_batch([first])
    assert again.recorded and again.replayed and again.decision_id == v.decision_id
    assert [e.request_id for e in ledger_entries(raw_redis, "strict")] == ["r-1"]


async def test_a_session_slot_holds_the_usage_fingerprint(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    engine = await make_engine(store, POLICY)
    u = report("r-9", "strict", session_id="ctl", sequence=3)
    await engine.decide_batch([u])
    slot_at = 20 + (3 % store.session_window) * 81
    slot = raw_redis.getrange("cp:{strict}:s:ctl", slot_at, slot_at + 80)
    assert slot.startswith(f"{3:020d}") and slot.endswith(session_fingerprint(u))


async def test_session_memory(store: RedisStore, raw_redis: redis.Redis) -> None:
    """README's figure: a session with its whole replay window written."""
    engine = await make_engine(store, POLICY)
    window = store.session_window
    for start in range(0, window, 64):
        await engine.decide_batch(
            [
                report(f"m-{i}", "strict", session_id="mem", sequence=i)
                for i in range(start, start + 64)
            ]
        )
    used = int(raw_redis.memory_usage("cp:{strict}:s:mem") or 0)
    length = 20 + window * 81
    assert raw_redis.strlen("cp:{strict}:s:mem") == length
    # SETRANGE grows the string by doubling its allocation: up to twice its length
    assert length <= used <= 2 * length + 512
    print(f"MEMORY USAGE of a session with {window} slots: {used} bytes")


# -- 2. a deadline on Redis' clock ------------------------------------------------------------


async def test_a_batch_that_runs_past_its_deadline_writes_nothing(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    engine, reader = await metered_engine(store)
    warm = await engine.check(report("warm", "open"))  # the store now knows Redis' clock
    assert warm.recorded
    # longer than the store timeout and its one extension: every script runs too late
    raw_redis.execute_command("CLIENT", "PAUSE", "400", "ALL")
    usages = [admit(f"a-{i}", "strict", f"k{i}") for i in range(3)]
    usages += [admit(f"o-{i}", "open", f"k{i}") for i in range(3)]
    usages += [report(f"r-{i}", "strict") for i in range(3)]
    verdicts = await asyncio.gather(*(engine.check(u) for u in usages))
    assert all(v.degraded and not v.recorded for v in verdicts)
    await engine.late_replies_settled()
    assert [e.request_id for e in ledger_entries(raw_redis, "strict")] == []
    assert [e.request_id for e in ledger_entries(raw_redis, "open")] == ["warm"]
    assert not raw_redis.keys("cp:{strict}:d:*") and raw_redis.keys("cp:{open}:d:*") == [
        "cp:{open}:d:warm"
    ]
    assert late_counts(reader) == {"nothing_written": len(usages)}
    # Redis' clock was read on the late reply: the next batch still carries a deadline
    assert store.clock.offset_ms(asyncio.get_running_loop().time()) is not None


async def test_a_refused_admit_committed_late_is_reversed_never_billed(
    store: RedisStore, raw_redis: redis.Redis
) -> None:
    engine, reader = await metered_engine(store)
    # a store that has not read Redis' clock yet sends no deadline: the batch commits when
    # Redis comes back, after every caller was answered by the failure policy
    assert store.clock.offset_ms(asyncio.get_running_loop().time()) is None
    raw_redis.execute_command("CLIENT", "PAUSE", "300", "ALL")
    unary = [admit("a-1", "strict", "k1", 3), admit("a-2", "strict", "k2", 4)]
    unary += [report("r-1", "strict"), admit("o-1", "open", "k1", 2)]
    streamed = admit("s-1", "strict", "k3", 5, session_id="ctl", sequence=1)
    verdicts, (sv,) = await asyncio.gather(
        asyncio.gather(*(engine.check(u) for u in unary)), engine.decide_batch([streamed])
    )
    a1, a2, r1, o1 = verdicts
    for v in (a1, a2, r1, sv):
        assert (v.decision, v.reason, v.degraded, v.recorded) == (
            Decision.DENY,
            Reason.STORE_UNAVAILABLE,
            True,
            False,
        )
    assert (o1.decision, o1.degraded, o1.recorded) == (Decision.ALLOW, True, False)
    await engine.late_replies_settled()

    strict = ledger_entries(raw_redis, "strict")
    reversals = [e for e in strict if e.reversal]
    assert sorted(e.request_id for e in reversals) == ["a-1", "a-2", "s-1"]
    for e in reversals:
        original = next(x for x in strict if x.request_id == e.request_id and not x.reversal)
        assert (e.decision_id, e.amount, e.mode, e.metric, e.key) == (
            original.decision_id,
            original.amount,
            "admit",
            "api.sms.send",
            original.key,
        )
        assert (e.decision, e.reason) == (int(Decision.DENY), int(Reason.STORE_UNAVAILABLE))
        assert e.billed_amount == -original.amount and e.policy_version == 1
    # billing: the refused callers net to 0; the report (answered neither recorded nor
    # spooled) stays, and its resend is answered from the record, counted once
    assert net_billed(strict) == Counter({"a-1": 0, "a-2": 0, "s-1": 0, "r-1": 1})
    assert sum(e.billed_amount for e in strict) == 100
    assert net_billed(ledger_entries(raw_redis, "open")) == Counter({"o-1": 1})
    assert late_counts(reader) == {"reversed": 3, "resend": 2}

    # the reversed decisions' records are forgotten: a resend is decided anew, once
    assert not raw_redis.exists("cp:{strict}:d:a-1")
    again = await engine.check(unary[0])
    assert again.recorded and not again.replayed and again.decision_id != a1.decision_id
    (s_again,) = await engine.decide_batch([streamed])
    assert s_again.recorded and not s_again.replayed
    resent = await engine.check(unary[2])
    assert resent.recorded and resent.replayed
    # a second reversal of the same decision writes nothing
    resolution = engine.policy.resolve(unary[1].subject, unary[1].metric)
    twice = Reversal(DecideItem(unary[1], resolution, a2.decision_id, ""), a2, 1)
    assert await store.reverse("strict", [twice]) == [False]
    final = ledger_entries(raw_redis, "strict")
    assert net_billed(final) == Counter({"a-1": 1, "a-2": 0, "s-1": 1, "r-1": 1})


# -- a reversal credits the limits back --------------------------------------------------------

CREDIT_POLICY = """
metrics: [{name: api.calls}]
plans:
  - name: p
    limits:
      - {name: burst, metric: api.calls, scope: key,
         rate: {capacity: 10, refill: 1, per: minute}}
      - {name: monthly, metric: api.calls, scope: tenant, quota: {amount: 100, per: month}}
tenants:
  - {name: strict, plan: p, failure_policy: {mode: deny}}
"""
BUCKET, QUOTA = "cp:{strict}:r:burst::k1", "cp:{strict}:q:monthly::"
K1 = Subject("strict", "", "k1")


def calls(rid: str, amount: int) -> Usage:
    return Usage(rid, K1, "api.calls", amount, Mode.ADMIT)


def counters(raw: redis.Redis) -> tuple[dict[str, str], dict[str, str]]:
    """The bucket's and the quota's hashes, as Redis holds them."""
    return raw.hgetall(BUCKET), raw.hgetall(QUOTA)  # type: ignore[return-value]


async def test_a_reversal_gives_back_what_the_refused_admit_took(
    redis_server: EmbeddedRedis, store: RedisStore, raw_redis: redis.Redis
) -> None:
    """A refused admit committed late takes 3 units from a bucket and a quota; its reversal
    gives them back in the same step: the bucket is where it was plus its refill, the quota
    where it was, so the limits agree with the ledger. A second reversal changes nothing."""
    await store.publish_policy(load_policy_text(CREDIT_POLICY))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(TracerProvider(), MeterProvider(metric_readers=[reader]), tracing=False)
    engine = Engine(store, EngineSettings(store_timeout_s=STORE_TIMEOUT_S), telemetry)
    await engine.reload_policy()
    # the units taken before, decided on a store of their own: the engine's has not read
    # Redis' clock yet, so its batch carries no deadline and commits after the pause
    other = RedisStore.from_url(redis_server.url, connect_timeout=1.0)
    try:
        before = await (await make_engine(other, CREDIT_POLICY)).check(calls("before", 4))
    finally:
        await other.close()
    assert before.recorded
    bucket0, quota0 = counters(raw_redis)
    assert quota0["u"] == "4"

    raw_redis.execute_command("CLIENT", "PAUSE", "300", "ALL")
    try:
        refused = await engine.check(calls("refused", 3))
        await engine.late_replies_settled()
    finally:
        await engine.close()  # the breaker's probe, if the timeout started one
    assert (refused.decision, refused.degraded, refused.recorded) == (Decision.DENY, True, False)
    assert late_counts(reader) == {"reversed": 1}
    entries = ledger_entries(raw_redis, "strict")
    assert net_billed(entries) == Counter({"before": 1, "refused": 0})

    bucket1, quota1 = counters(raw_redis)
    assert quota1 == quota0  # the same period: the 3 units are back
    (burst, _) = engine.policy.resolve(K1, "api.calls").limits
    elapsed = int(bucket1["t"]) - int(bucket0["t"])
    assert elapsed >= 0 and bucket1["s"] == bucket0["s"] == str(burst.scale)
    # exactly the level before plus the refill since (never above the capacity)
    assert int(bucket1["l"]) == min(
        burst.capacity_sub, int(bucket0["l"]) + elapsed * burst.refill_per_ms
    )

    # the same reversal again: nothing written, nothing credited
    late = next(e for e in entries if e.request_id == "refused" and not e.reversal)
    item = DecideItem(calls("refused", 3), engine.policy.resolve(K1, "api.calls"),
                      late.decision_id, "")  # fmt: skip
    again = Reversal(item, refused, late.policy_version, late.decided_at_ms)
    assert await store.reverse("strict", [again]) == [False]
    assert counters(raw_redis) == (bucket1, quota1)
    assert ledger_entries(raw_redis, "strict") == entries


async def test_a_credit_stays_below_capacity_and_within_its_period(
    store: RedisStore, raw_redis: redis.Redis, redis_server: EmbeddedRedis
) -> None:
    """A reversal written after the bucket refilled gives back only up to its capacity, and
    one written in the next period gives the quota nothing (the units came from a period
    that has ended); the ledger entry of the reversal is written either way."""
    engine = await make_engine(store, CREDIT_POLICY)
    took = await engine.check(calls("took", 3))
    assert took.recorded and took.decided_at_ms
    _, quota_then = counters(raw_redis)
    assert quota_then["u"] == "3"
    # a reversal decided on a clock a month later: the bucket is full again, the month over
    month_ms = 32 * 86_400_000
    later = RedisStore.from_url(redis_server.url, connect_timeout=1.0, clock_offset_ms=month_ms)
    try:
        told = took._replace(decision=Decision.DENY, reason=Reason.STORE_UNAVAILABLE,
                             degraded=True, recorded=False)  # fmt: skip
        item = DecideItem(calls("took", 3), engine.policy.resolve(K1, "api.calls"),
                          took.decision_id, "")  # fmt: skip
        assert await later.reverse("strict", [Reversal(item, told, 1, took.decided_at_ms)]) == [
            True
        ]
    finally:
        await later.close()
    assert not raw_redis.exists(BUCKET)  # full: a full bucket is not kept (never above it)
    assert counters(raw_redis)[1] == quota_then  # the period it debited is over: untouched
    assert net_billed(ledger_entries(raw_redis, "strict")) == Counter({"took": 0})


# -- the invariant under SIGSTOPs -------------------------------------------------------------


async def test_verdicts_and_ledger_agree_through_sigstops(tmp_path: Path) -> None:
    """Fail-closed admits, fail-open admits and reports, unary and streamed, while the test's
    own redis-server is stopped (SIGSTOP) for 60 ms to 1.2 s at a time, longer than the store
    timeout: after recovery every verdict is compared with the ledger."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    # a window wider than the run: every resend of a stream usage is within it
    store = RedisStore.from_url(server.url, connect_timeout=0.5, session_window=16_384)
    rng = random.Random(13)
    try:
        engine, reader = await metered_engine(store)
        sent: dict[str, Usage] = {}
        answers: dict[str, Verdict] = {}
        stop = asyncio.Event()
        seq = {"strict": 0, "open": 0}

        async def unary_load(worker: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                tenant = ("strict", "open")[n % 2]
                rid = f"u{worker}-{n}"
                u = (
                    report(rid, tenant, rng.randint(1, 500))
                    if n % 3 == 0
                    else admit(rid, tenant, f"k{worker}", rng.randint(1, 3))
                )
                sent[rid] = u
                answers[rid] = await engine.check(u)
                await asyncio.sleep(0.01)

        async def stream_load(tenant: str) -> None:
            while not stop.is_set():
                batch = []
                for _ in range(8):
                    seq[tenant] += 1
                    s = seq[tenant]
                    rid = f"s-{tenant}-{s}"
                    u = (
                        report(rid, tenant, 10, session_id=f"ctl-{tenant}", sequence=s)
                        if s % 2
                        else admit(rid, tenant, "ks", 1, session_id=f"ctl-{tenant}", sequence=s)
                    )
                    sent[rid] = u
                    batch.append(u)
                for u, v in zip(batch, await engine.decide_batch(batch), strict=True):
                    answers[u.request_id] = v
                await asyncio.sleep(0.01)

        async def faults() -> None:
            pid = server.process.pid  # type: ignore[union-attr]
            for pause_s in (0.06, 0.08, 0.09, 0.15, 0.4, 1.2, 0.07, 0.11):
                await asyncio.sleep(0.3)
                os.kill(pid, signal.SIGSTOP)
                try:
                    await asyncio.sleep(pause_s)
                finally:
                    os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(0.5)
            stop.set()

        await asyncio.gather(
            faults(), *(unary_load(w) for w in range(6)), stream_load("strict"), stream_load("open")
        )
        await engine.late_replies_settled()
        degraded = [r for r, v in answers.items() if v.degraded]
        assert degraded, "no store call timed out: the faults did nothing"

        raw = redis.Redis.from_url(server.url, decode_responses=True)
        ledger = ledger_entries(raw, "strict") + ledger_entries(raw, "open")
        before = net_billed(ledger)
        assert set(before) <= set(sent), "a ledger entry for a usage never sent"
        refused_but_billed = mismatches = 0
        owed = []
        for rid, v in answers.items():
            u = sent[rid]
            refused = u.mode is Mode.ADMIT and v.decision is not Decision.ALLOW
            if refused:
                refused_but_billed += before[rid] != 0
            elif v.recorded:
                mismatches += before[rid] != 1
            else:  # degraded, neither recorded nor spooled: in the ledger at most once
                mismatches += before[rid] > 1
                owed.append(rid)
        # the clients resend what was answered neither recorded nor spooled, with the same ids
        for _ in range(100):
            probe = await engine.check(report("probe", "open"))
            if not probe.degraded:
                break
            await asyncio.sleep(0.05)
        for rid in owed:
            u = sent[rid]
            for _ in range(20):  # as a client does: until an answer that is not degraded
                if u.session_id:
                    (again,) = await engine.decide_batch([u])
                else:
                    again = await engine.check(u)
                if not again.degraded:
                    break
                await asyncio.sleep(0.05)
            assert again.recorded and not again.degraded, again
        after = net_billed(ledger_entries(raw, "strict") + ledger_entries(raw, "open"))
        mismatches += sum(1 for rid in owed if after[rid] != 1)
        refused_but_billed += sum(
            1
            for rid, v in answers.items()
            if sent[rid].mode is Mode.ADMIT and v.decision is not Decision.ALLOW and after[rid]
        )
        counts = late_counts(reader)
        print(
            f"{len(answers)} verdicts, {len(degraded)} degraded, {len(owed)} resent; "
            f"late replies by outcome: {counts}"
        )
        assert refused_but_billed == 0
        assert mismatches == 0
        assert counts, "no late reply was counted"
        raw.close()
    finally:
        await store.close()
        server.stop()
