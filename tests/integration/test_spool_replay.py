"""The spool replayed into the real store (issue #13, item 4): in order, each usage in the
ledger exactly once, through late commits, a crash between replay and settle, and a store that
fails again mid-replay."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis

from chargepath.core.model import Decision, Mode, Reason, Subject, Usage, Verdict
from chargepath.core.plans import load_policy_text
from chargepath.engine import (
    Engine,
    EngineSettings,
    fingerprint,
    new_decision_id,
    session_fingerprint,
)
from chargepath.spool_replay import RedisSessionSlots, SpoolReplayer
from chargepath.store.base import DecideItem
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.redis_store import RedisStore
from chargepath.store.spool import SPOOL_FILE, Outcome, Spool, SpooledUsage
from chargepath.telemetry import Telemetry
from tests.conftest import ledger_entries, make_engine
from tests.integration.policies import OPEN, REPORTING

pytestmark = pytest.mark.integration

SPOOLED_AT = 1_700_000_000_000


def degraded(usage: Usage, at_ms: int = SPOOLED_AT) -> SpooledUsage:
    """The spool entry the engine would write for ``usage`` answered degraded."""
    return SpooledUsage(usage, fingerprint(usage), new_decision_id(), "", at_ms)


async def late_commit(store: RedisStore, engine: Engine, entry: SpooledUsage) -> Verdict:
    """What the degraded attempt itself does when its script runs after the gateway gave up:
    the engine's store call, with its decision id, as first sent (session key and all)."""
    u = entry.usage
    item = DecideItem(
        u,
        engine.policy.resolve(u.subject, u.metric),
        entry.decision_id,
        session_fingerprint(u) if u.session_id else entry.fingerprint,
    )
    return (await store.decide(u.subject.tenant, engine.policy.version, [item]))[0]


def replayer(spool: Spool, store: Any, engine: Engine, **kw: Any) -> SpoolReplayer:
    return SpoolReplayer(spool, store, lambda: engine.policy, engine.reload_policy, **kw)


async def drain(r: SpoolReplayer) -> dict[Outcome, int]:
    totals = dict.fromkeys(Outcome, 0)
    for _ in range(100):
        round_ = await r.replay_once()
        assert round_.claimed and not round_.store_error
        totals[Outcome.REPLAYED] += round_.replayed
        totals[Outcome.ALREADY_RECORDED] += round_.already_recorded
        totals[Outcome.DROPPED] += round_.dropped
        if not round_.left:
            return totals
    raise AssertionError("the spool did not drain")


@pytest.fixture
async def spool(tmp_path: Path) -> Any:
    s = Spool(tmp_path / SPOOL_FILE)
    await s.open()
    yield s
    await s.close()


async def test_spooled_reports_are_replayed_in_order_each_once(
    store: RedisStore, raw_redis: redis.Redis, spool: Spool
) -> None:
    engine = await make_engine(store, REPORTING)
    entries = []
    for i in range(30):
        # a fail-open and a fail-closed tenant: a report is spooled whatever the policy said
        tenant = "mvno" if i % 3 else "strict"
        labels = (("cell", f"c{i}"),) if i == 4 else ()
        u = Usage(f"r{i}", Subject(tenant, "s1"), "slice.bytes", 10, Mode.REPORT, labels=labels)
        entries.append(degraded(u, SPOOLED_AT + i))
    entries[7] = degraded(entries[7].usage._replace(occurred_at_ms=123), SPOOLED_AT + 7)
    assert all(await spool.append_all(entries))

    r = replayer(spool, store, engine, batch_size=7, clock_ms=lambda: SPOOLED_AT + 600_003)
    first = await r.replay_once()
    # r{i} was spooled at SPOOLED_AT + i: r0, r1, r2 more than the 600 s dedup window ago
    assert (first.replayed, first.past_window) == (7, 3)
    totals = await drain(r)
    assert totals[Outcome.REPLAYED] == 23 and not totals[Outcome.DROPPED]

    for tenant in ("mvno", "strict"):
        mine = [e for e in entries if e.usage.subject.tenant == tenant]
        ledger = ledger_entries(raw_redis, tenant)
        assert [x.request_id for x in ledger] == [e.usage.request_id for e in mine]  # in order
        assert [x.decision_id for x in ledger] == [e.decision_id for e in mine]
        assert {x.mode for x in ledger} == {"report"}
        assert raw_redis.hget(f"cp:{{{tenant}}}:q:bytes-hourly:s1:", "u") == str(10 * len(mine))
    by_rid = {x.request_id: x for t in ("mvno", "strict") for x in ledger_entries(raw_redis, t)}
    assert by_rid["r4"].labels == {"cell": "c4"}
    assert by_rid["r5"].occurred_at_ms == SPOOLED_AT + 5  # when it was spooled
    assert by_rid["r7"].occurred_at_ms == 123  # the client's own time is kept
    stats = await spool.stats()
    assert (stats.depth, stats.bytes, stats.replayed) == (0, 0, 30)
    assert stats.health_detail() == "spool: empty"


async def test_a_fail_open_admit_is_recorded_as_a_report_past_its_limit(
    store: RedisStore, raw_redis: redis.Redis, spool: Spool
) -> None:
    engine = await make_engine(store, OPEN)
    admits = [
        Usage(f"a{i}", Subject("acme", key="k1"), "api.sms.send", 1, Mode.ADMIT) for i in range(8)
    ]
    entries = [degraded(u) for u in admits]
    assert all(await spool.append_all(entries))

    totals = await drain(replayer(spool, store, engine))
    assert totals[Outcome.REPLAYED] == 8  # past the capacity of 5: the work was done
    ledger = ledger_entries(raw_redis, "acme")
    assert [(x.request_id, x.mode, x.amount) for x in ledger] == [
        (f"a{i}", "report", 1) for i in range(8)
    ]
    # the bucket is in debt: a new admit waits
    fresh = await engine.check(
        Usage("new", Subject("acme", key="k1"), "api.sms.send", 1, Mode.ADMIT)
    )
    assert fresh.decision is Decision.THROTTLE
    # the client resends an admit it was answered during the outage: the replay's record
    # answers (recorded, the degraded verdict's decision id), nothing is taken twice
    again = await engine.check(admits[3])
    assert again.replayed and again.recorded and again.decision is Decision.ALLOW
    assert again.decision_id == entries[3].decision_id
    assert len(ledger_entries(raw_redis, "acme")) == 8


async def test_a_late_commit_is_not_counted_twice(
    store: RedisStore, raw_redis: redis.Redis, spool: Spool
) -> None:
    engine = await make_engine(store, OPEN)
    report = degraded(Usage("rep", Subject("acme", "s1"), "slice.bytes", 500, Mode.REPORT))
    admit = degraded(Usage("adm", Subject("acme", key="k1"), "api.sms.send", 2, Mode.ADMIT))
    never = degraded(Usage("nvr", Subject("acme", "s1"), "slice.bytes", 7, Mode.REPORT))
    # the degraded attempts of the first two did reach Redis, after their verdicts
    assert (await late_commit(store, engine, report)).recorded
    assert (await late_commit(store, engine, admit)).recorded
    assert all(await spool.append_all([report, admit, never]))

    totals = await drain(replayer(spool, store, engine))
    assert totals == {Outcome.REPLAYED: 1, Outcome.ALREADY_RECORDED: 2, Outcome.DROPPED: 0}
    rids = [x.request_id for x in ledger_entries(raw_redis, "acme")]
    assert sorted(rids) == ["adm", "nvr", "rep"]
    # the late admit took 2 of the key's 5, once
    v = await engine.check(Usage("probe", Subject("acme", key="k1"), "api.sms.send", 1, Mode.ADMIT))
    assert v.limits[0].remaining == 2


async def test_a_late_commit_of_a_stream_usage_is_found_in_its_session(
    store: RedisStore, raw_redis: redis.Redis, spool: Spool
) -> None:
    engine = await make_engine(store, OPEN)
    stream = [
        degraded(
            Usage(
                f"s{i}",
                Subject("acme", "s1"),
                "slice.bytes",
                100 + i,
                Mode.REPORT,
                session_id="ctl-1",
                sequence=i,
            )
        )
        for i in range(1, 5)
    ]
    assert (await late_commit(store, engine, stream[1])).recorded  # sequence 2, session key
    slots = RedisSessionSlots(store.client, store.session_window)
    probes = [("ctl-1", e.usage.sequence, session_fingerprint(e.usage)) for e in stream]
    assert await slots.recorded("acme", probes) == [False, True, False, False]
    # the slot of sequence 2 holds s2: another usage at that sequence is not found there
    assert await slots.recorded("acme", [("ctl-1", 2, session_fingerprint(stream[0].usage))]) == [
        False
    ]
    assert all(await spool.append_all(stream))

    totals = await drain(replayer(spool, store, engine, session_slots=slots))
    assert totals == {Outcome.REPLAYED: 3, Outcome.ALREADY_RECORDED: 1, Outcome.DROPPED: 0}
    ledger = ledger_entries(raw_redis, "acme")
    assert [x.request_id for x in ledger] == ["s2", "s1", "s3", "s4"]
    assert sum(x.amount for x in ledger) == 101 + 102 + 103 + 104


async def test_a_late_commit_that_refused_an_admit_is_recorded_by_the_replay(
    store: RedisStore, raw_redis: redis.Redis, spool: Spool
) -> None:
    """The degraded attempt of a fail-open admit (answered ALLOW, spooled) ran late and was
    throttled: nobody was told that refusal, the caller acted on the ALLOW. The replay
    records the usage once, as a report, and its record then says recorded."""
    engine = await make_engine(store, OPEN)
    full = Usage("fill", Subject("acme", key="k1"), "api.sms.send", 5, Mode.ADMIT)
    assert (await engine.check(full)).recorded
    refused = degraded(Usage("late", Subject("acme", key="k1"), "api.sms.send", 1, Mode.ADMIT))
    assert (await late_commit(store, engine, refused)).decision is Decision.THROTTLE
    assert await spool.append(refused)

    replaying = replayer(spool, store, engine)
    totals = await drain(replaying)
    assert (totals[Outcome.REPLAYED], totals[Outcome.DROPPED]) == (1, 0)
    ledger = ledger_entries(raw_redis, "acme")
    assert [(x.request_id, x.mode, x.decision_id) for x in ledger] == [
        ("fill", "admit", ledger[0].decision_id),
        ("late", "report", refused.decision_id),
    ]
    # the late attempt's own reply, read now, and a resend: answered from the record
    again = await late_commit(store, engine, refused)
    assert (again.recorded, again.replayed) == (True, True)
    assert await spool.append(refused)  # a second replay of it
    assert (await drain(replaying))[Outcome.ALREADY_RECORDED] == 1
    assert [x.request_id for x in ledger_entries(raw_redis, "acme")] == ["fill", "late"]


async def test_a_refusal_told_to_a_resend_is_not_overridden_by_the_replay(
    store: RedisStore, raw_redis: redis.Redis, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    """The request id of a spooled admit was decided again by the store (another decision
    id: a resend, whose caller was told the refusal): the replay does not record over that
    answer. It is dropped, counted and logged."""
    engine = await make_engine(store, OPEN)
    full = Usage("fill", Subject("acme", key="k1"), "api.sms.send", 5, Mode.ADMIT)
    assert (await engine.check(full)).recorded
    spooled = degraded(Usage("late", Subject("acme", key="k1"), "api.sms.send", 1, Mode.ADMIT))
    resent = await engine.check(spooled.usage)
    assert resent.decision is Decision.THROTTLE and resent.decision_id != spooled.decision_id
    assert await spool.append(spooled)

    totals = await drain(replayer(spool, store, engine))
    assert totals[Outcome.DROPPED] == 1 and (await spool.stats()).dropped == 1
    assert [x.request_id for x in ledger_entries(raw_redis, "acme")] == ["fill"]
    assert any(
        "request_id late" in r.getMessage() and "decided again" in r.getMessage()
        for r in caplog.records
    )


async def test_a_late_refusal_a_resend_was_answered_is_not_overridden(
    store: RedisStore, raw_redis: redis.Redis, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    """The first attempt was refused late, and a resend of the request id (a caller that
    never had the degraded ALLOW) was answered that refusal from its record: the caller's
    last answer is the refusal, so the replay does not record the usage."""
    engine = await make_engine(store, OPEN)
    full = Usage("fill", Subject("acme", key="k1"), "api.sms.send", 5, Mode.ADMIT)
    assert (await engine.check(full)).recorded
    refused = degraded(Usage("late", Subject("acme", key="k1"), "api.sms.send", 1, Mode.ADMIT))
    assert (await late_commit(store, engine, refused)).decision is Decision.THROTTLE
    told = await engine.check(refused.usage)
    assert (told.decision, told.replayed, told.recorded) == (Decision.THROTTLE, True, False)
    assert told.decision_id == refused.decision_id
    assert str(raw_redis.get("cp:{acme}:d:late")).endswith("|t")
    assert await spool.append(refused)

    totals = await drain(replayer(spool, store, engine))
    assert (totals[Outcome.DROPPED], totals[Outcome.REPLAYED]) == (1, 0)
    assert [x.request_id for x in ledger_entries(raw_redis, "acme")] == ["fill"]
    assert any(
        "request_id late" in r.getMessage() and "a resend of it was answered" in r.getMessage()
        for r in caplog.records
    )
    # the mark changes no answer: a further resend gets the same refusal
    again = await engine.check(refused.usage)
    assert again._replace(decided_at_ms=0) == told._replace(decided_at_ms=0)


class CrashingSpool(Spool):
    """A process that dies after the store answered its replay and before the spool forgot
    the usages."""

    async def settle(self, outcomes: Any) -> None:
        raise RuntimeError("killed between replay and settle")


class Clock:
    def __init__(self) -> None:
        self.now = SPOOLED_AT

    def __call__(self) -> int:
        return self.now


async def test_a_crash_between_replay_and_settle_doubles_nothing(
    store: RedisStore, raw_redis: redis.Redis, tmp_path: Path
) -> None:
    engine = await make_engine(store, REPORTING)
    clock = Clock()
    crashing = CrashingSpool(tmp_path / SPOOL_FILE, clock_ms=clock)
    await crashing.open()
    entries = [
        degraded(Usage(f"c{i}", Subject("mvno", "s1"), "slice.bytes", 3, Mode.REPORT))
        for i in range(10)
    ]
    assert all(await crashing.append_all(entries))
    with pytest.raises(RuntimeError, match="killed"):
        await replayer(crashing, store, engine, holder="first", lease_ms=30_000).replay_once()
    await crashing.close()
    assert len(ledger_entries(raw_redis, "mvno")) == 10

    restarted = Spool(tmp_path / SPOOL_FILE, clock_ms=clock)
    assert (await restarted.open()).depth == 10
    try:
        second = replayer(restarted, store, engine, holder="second", lease_ms=30_000)
        assert not (await second.replay_once()).claimed  # the dead holder's lease still runs
        clock.now += 30_001
        totals = await drain(second)
        assert totals == {Outcome.REPLAYED: 0, Outcome.ALREADY_RECORDED: 10, Outcome.DROPPED: 0}
    finally:
        await restarted.close()
    ledger = ledger_entries(raw_redis, "mvno")
    assert [x.request_id for x in ledger] == [f"c{i}" for i in range(10)]
    assert raw_redis.hget("cp:{mvno}:q:bytes-hourly:s1:", "u") == "30"


class KillAfterFirstDecide:
    """The real store, whose Redis is SIGKILLed right after its first decide returns."""

    def __init__(self, store: RedisStore, server: EmbeddedRedis) -> None:
        self.store = store
        self.server = server
        self.calls = 0

    async def decide(self, *args: Any, **kw: Any) -> list[Verdict]:
        self.calls += 1
        verdicts = await self.store.decide(*args, **kw)
        if self.calls == 1:
            self.server.kill()
        return verdicts


async def test_replay_stops_when_redis_dies_and_resumes_when_it_is_back(tmp_path: Path) -> None:
    # appendfsync always: what the replay settled must survive the SIGKILL
    server = EmbeddedRedis(tmp_path / "redis", fsync="always")
    server.start()
    store = RedisStore.from_url(server.url, connect_timeout=0.2)
    spool = Spool(tmp_path / SPOOL_FILE)
    await spool.open()
    try:
        await store.publish_policy(load_policy_text(REPORTING))
        engine = Engine(store, EngineSettings(store_timeout_s=0.2), Telemetry())
        await engine.reload_policy()
        entries = [
            degraded(
                Usage(
                    f"k{i}",
                    Subject("mvno" if i % 2 else "strict", "s1"),
                    "slice.bytes",
                    1,
                    Mode.REPORT,
                )
            )
            for i in range(20)
        ]
        assert all(await spool.append_all(entries))
        dying = KillAfterFirstDecide(store, server)
        first = await replayer(spool, dying, engine, holder="gw", store_timeout_s=0.5).replay_once()
        # "strict" came first in the batch and was recorded; then Redis died under "mvno"
        assert first.store_error and first.replayed == 10 and first.left == 10
        left = [r.entry.usage.request_id for r in await spool.head(100)]
        assert left == [f"k{i}" for i in range(1, 20, 2)]  # the rest, still in order
        again = await replayer(spool, store, engine, holder="gw", store_timeout_s=0.5).replay_once()
        assert again.store_error and again.settled == 0 and again.left == 10

        server.start()  # the same data folder: the AOF brings back what was recorded
        stop = asyncio.Event()
        task = asyncio.create_task(
            replayer(spool, store, engine, holder="gw").run(stop, idle_s=0.05)
        )
        for _ in range(400):  # 20 s at most
            if not (await spool.stats()).depth:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await task
        assert (await spool.stats()).depth == 0
        raw = redis.Redis.from_url(server.url, decode_responses=True)
        for tenant, parity in (("strict", 0), ("mvno", 1)):
            rids = [x.request_id for x in ledger_entries(raw, tenant)]
            assert rids == [f"k{i}" for i in range(parity, 20, 2)]
        raw.close()
    finally:
        await spool.close()
        await store.close()
        server.stop()


async def test_a_batch_that_times_out_is_found_recorded_on_the_next_round(
    store: RedisStore, raw_redis: redis.Redis, spool: Spool
) -> None:
    """CLIENT PAUSE holds the replay's script past its timeout; when the pause ends the script
    may still run (a late commit of the replay itself). Either way, each usage once."""
    engine = await make_engine(store, REPORTING)
    entries = [
        degraded(Usage(f"p{i}", Subject("mvno", "s1"), "slice.bytes", 2, Mode.REPORT))
        for i in range(15)
    ]
    assert all(await spool.append_all(entries))
    r = replayer(spool, store, engine, batch_size=5, store_timeout_s=0.3)
    assert (await r.replay_once()).replayed == 5
    raw_redis.execute_command("CLIENT", "PAUSE", 1000, "ALL")
    paused = await r.replay_once()
    assert paused.store_error and paused.settled == 0 and paused.left == 10
    await asyncio.sleep(1.2)
    totals = await drain(r)
    assert totals[Outcome.REPLAYED] + totals[Outcome.ALREADY_RECORDED] == 10
    assert totals[Outcome.DROPPED] == 0
    assert [x.request_id for x in ledger_entries(raw_redis, "mvno")] == [f"p{i}" for i in range(15)]
    assert raw_redis.hget("cp:{mvno}:q:bytes-hourly:s1:", "u") == "30"


async def test_a_usage_of_a_tenant_no_longer_entitled_is_dropped_loudly(
    store: RedisStore, raw_redis: redis.Redis, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    engine = await make_engine(store, REPORTING)
    gone = degraded(Usage("g1", Subject("nobody", "s1"), "slice.bytes", 1, Mode.REPORT))
    assert await spool.append(gone)
    totals = await drain(replayer(spool, store, engine))
    assert totals[Outcome.DROPPED] == 1
    assert ledger_entries(raw_redis, "nobody") == []
    assert (await spool.stats()).depth == 0
    assert any(
        "request_id g1" in r.getMessage() and Reason.NO_ENTITLEMENT.name in r.getMessage()
        for r in caplog.records
    )
