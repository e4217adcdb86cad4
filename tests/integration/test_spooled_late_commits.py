"""A spooled usage whose first store call commits late is recorded once, in every order
(docs/design.md, "Late commits and the spool"), on a real redis-server; also when that late
first attempt was a refusal of an admit the gateway had allowed (fail-open).

The gateway's store talks to Redis through a TCP relay that the test can hold in either
direction (:class:`Relay`): holding requests makes a store call time out before it reaches
Redis (it commits when released); holding replies lets it commit while the gateway never reads
the answer (the process "dies" with the reply in flight). The spool's replay talks to Redis
directly. Every test moves the stream's session far past its replay window before the replay,
so that the session slot can no longer tell the late commit: only the request-id record can.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from chargepath.app import _settle_late_replies
from chargepath.core.model import Decision, Mode, Reason, Subject, Usage, Verdict
from chargepath.core.plans import load_policy_text
from chargepath.engine import SPOOL_HOLD_MS, Engine, EngineSettings, fingerprint
from chargepath.spool_replay import RedisSessionSlots, ReplayRound, SpoolReplayer
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.redis_store import RedisStore
from chargepath.store.spool import SPOOL_FILE, Spool, SpooledUsage, wall_ms
from chargepath.telemetry import Telemetry
from tests.conftest import ledger_entries

pytestmark = pytest.mark.integration

POLICY = """
metrics: [{name: slice.bytes}, {name: api.calls}]
plans:
  - name: p
    limits:
      - {name: bytes, metric: slice.bytes, scope: slice,
         rate: {capacity: 1000000, refill: 1000000, per: second}}
      - {name: calls, metric: api.calls, scope: key,
         rate: {capacity: 5, refill: 1, per: hour}}
tenants:
  - {name: open, plan: p, failure_policy: {mode: allow}}
  - {name: capped, plan: p, failure_policy: {mode: allow}, caps: {request_ids: 2}}
"""

WINDOW = 4  # the session replay window: small, so a stream moves past it in a few usages
STORE_TIMEOUT_S = 0.1
WAIT_S = 10.0  # every wait of these tests fails past this, with a message


class Relay:
    """A TCP relay to Redis whose two directions can each be held (bytes queue up in the
    relay, in order, and flow when released): a paused connection, at the socket level."""

    def __init__(self, url: str, upstream_port: int) -> None:
        self.url = url
        self.upstream_port = upstream_port
        self.requests = asyncio.Event()  # set: requests flow to Redis
        self.replies = asyncio.Event()  # set: replies flow back
        self.requests.set()
        self.replies.set()
        self.forwarded_requests = 0
        #: set when Redis answered something that the relay holds (replies held)
        self.reply_held = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for task in (
            asyncio.ensure_future(self._pipe(reader, up_w, self.requests, True)),
            asyncio.ensure_future(self._pipe(up_r, writer, self.replies, False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        gate: asyncio.Event,
        counted: bool,
    ) -> None:
        try:
            while data := await src.read(65536):
                if not counted and not gate.is_set():
                    self.reply_held.set()
                await gate.wait()
                dst.write(data)
                await dst.drain()
                if counted:
                    self.forwarded_requests += 1
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class Gateway:
    """An engine and its spool; its store goes through the relay."""

    store: RedisStore
    spool: Spool
    engine: Engine


@pytest.fixture
async def relay(redis_server: EmbeddedRedis) -> AsyncIterator[Relay]:
    r = Relay(redis_server.url, redis_server.port)
    await r.start()
    yield r
    r.requests.set()
    r.replies.set()
    await r.close()


def relay_url(relay: Relay, port: int) -> str:
    """The Redis URL (with its password) with the relay's port."""
    return relay.url.replace(f":{relay.upstream_port}/", f":{port}/")


async def open_gateway(relay: Relay, tmp_path: Path) -> Gateway:
    assert relay._server is not None
    port = relay._server.sockets[0].getsockname()[1]
    url = relay_url(relay, port)
    store = RedisStore.from_url(url, connect_timeout=1.0, session_window=WINDOW)
    await store.publish_policy(load_policy_text(POLICY))
    spool = Spool(tmp_path / SPOOL_FILE)
    await spool.open()
    engine = Engine(
        store,
        EngineSettings(store_timeout_s=STORE_TIMEOUT_S, breaker_failures=1000),
        Telemetry(),
        spool=spool,
    )
    await engine.reload_policy()
    return Gateway(store, spool, engine)


async def close_gateway(g: Gateway) -> None:
    await g.spool.close()
    await g.store.close()


def stream(tenant: str, first: int, n: int) -> list[Usage]:
    return [
        Usage(
            f"{tenant}-st-{seq}",
            Subject(tenant, "s1"),
            "slice.bytes",
            100 + seq,
            Mode.REPORT,
            session_id="ctl",
            sequence=seq,
        )
        for seq in range(first, first + n)
    ]


async def move_session_on(redis_server: EmbeddedRedis, engine: Engine, tenant: str) -> None:
    """Sequences 10..29 of the session, decided straight on Redis (not through the relay):
    the first ones are then far outside the session's window."""
    direct = RedisStore.from_url(redis_server.url, connect_timeout=1.0, session_window=WINDOW)
    try:
        mover = Engine(direct, EngineSettings(store_timeout_s=2.0), Telemetry())
        mover.policy = engine.policy
        verdicts = await mover.decide_batch(stream(tenant, 10, 20))
        assert all(v.recorded for v in verdicts)
    finally:
        await direct.close()


async def replay(
    redis_server: EmbeddedRedis,
    spool: Spool,
    engine: Engine,
    *,
    clock_ms: int = 0,
) -> ReplayRound:
    """One replay round, straight on Redis; ``clock_ms`` added to the wall clock (past the
    holds: their process is gone)."""
    direct = RedisStore.from_url(redis_server.url, connect_timeout=1.0, session_window=WINDOW)
    try:
        return await SpoolReplayer(
            spool,
            direct,
            lambda: engine.policy,
            engine.reload_policy,
            session_slots=RedisSessionSlots(direct.client, WINDOW),
            holder="replayer",
            clock_ms=lambda: wall_ms() + clock_ms,
        ).replay_once()
    finally:
        await direct.close()


def billed(raw: redis.Redis, tenant: str) -> Counter[str]:
    return Counter(e.request_id for e in ledger_entries(raw, tenant) if not e.reversal)


async def wait_for(event: asyncio.Event, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), WAIT_S)
    except TimeoutError:
        raise AssertionError(f"still waiting after {WAIT_S:.0f} s for {what}") from None


async def spooled_in_flight(g: Gateway, relay: Relay, usages: list[Usage]) -> list[Verdict]:
    """Decide ``usages`` with the relay holding requests: answered spooled (and held) while
    their store call is still on its way to Redis. Returns their verdicts."""
    relay.requests.clear()
    verdicts = await asyncio.wait_for(g.engine.decide_batch(usages), WAIT_S)
    assert all(v.spooled and v.degraded and not v.recorded for v in verdicts), verdicts
    held = await g.spool.head(100)
    assert [r.entry.usage.request_id for r in held] == [u.request_id for u in usages]
    assert all(r.held_until_ms > wall_ms() for r in held)
    return verdicts


# -- the orders -------------------------------------------------------------------------------


async def test_late_reply_first_settles_the_spool_before_any_replay(
    relay: Relay, redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> None:
    """Order 1: the late commit, its reply read by the gateway, then the replay."""
    g = await open_gateway(relay, tmp_path)
    try:
        usages = stream("open", 1, 3)
        await spooled_in_flight(g, relay, usages)
        # held: a replay round now leaves them (their call may yet commit)
        early = await replay(redis_server, g.spool, g.engine)
        assert (early.claimed, early.settled, early.left) == (True, 0, 3)
        relay.requests.set()  # the call reaches Redis and commits, its reply is read
        await asyncio.wait_for(g.engine.late_replies_settled(), WAIT_S)
        stats = await g.spool.stats()
        assert (stats.depth, stats.already_recorded) == (0, 3)
        await move_session_on(redis_server, g.engine, "open")
        assert (await replay(redis_server, g.spool, g.engine)).settled == 0
    finally:
        await close_gateway(g)
    assert billed(raw_redis, "open") == Counter(
        u.request_id for u in stream("open", 1, 3) + stream("open", 10, 20)
    )


async def test_a_replay_that_runs_first_is_found_by_the_late_commit(
    relay: Relay, redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> None:
    """Order 2: the replay reaches Redis while the first call is still in flight (the hold
    has lapsed, as for a replayer of another process); the late call, run after it, finds
    the replay's request-id record and records nothing (the session slots do not know the
    replay)."""
    g = await open_gateway(relay, tmp_path)
    try:
        usages = stream("open", 1, 3)
        await spooled_in_flight(g, relay, usages)
        first = await replay(redis_server, g.spool, g.engine, clock_ms=SPOOL_HOLD_MS + 1)
        assert (first.replayed, first.left) == (3, 0)
        # the session is still within its window: its slots do not hold these sequences (the
        # replay wrote request-id records only), so only those records can stop the late call
        relay.requests.set()
        await asyncio.wait_for(g.engine.late_replies_settled(), WAIT_S)
        await move_session_on(redis_server, g.engine, "open")
    finally:
        await close_gateway(g)
    assert billed(raw_redis, "open") == Counter(
        u.request_id for u in usages + stream("open", 10, 20)
    )


async def test_a_late_commit_whose_reply_died_with_the_gateway_is_found_by_the_replay(
    relay: Relay, redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> None:
    """Order 3: the call commits, the gateway dies before reading the reply (the relay holds
    it), the session moves on past its window; a new process replays the spool once the hold
    lapsed, and finds the commit by its request-id record."""
    g = await open_gateway(relay, tmp_path)
    usages = stream("open", 1, 3)
    try:
        relay.replies.clear()  # the request reaches Redis; the reply never comes back
        before = relay.forwarded_requests
        verdicts = await asyncio.wait_for(g.engine.decide_batch(usages), WAIT_S)
        assert all(v.spooled and not v.recorded for v in verdicts)
        await wait_for(relay.reply_held, "Redis' reply to the call (the commit)")
        assert relay.forwarded_requests > before
        assert len(billed(raw_redis, "open")) == 3
    finally:
        # the process dies: its late replies are never read
        for task in list(g.engine._late):
            task.cancel()
        await close_gateway(g)
    await move_session_on(redis_server, g.engine, "open")

    spool = Spool(tmp_path / SPOOL_FILE)  # the next process, same data folder
    await spool.open()
    try:
        held = await replay(redis_server, spool, g.engine)
        assert (held.settled, held.left) == (0, 3)  # the holds still run
        lapsed = await replay(redis_server, spool, g.engine, clock_ms=SPOOL_HOLD_MS + 1)
        assert (lapsed.already_recorded, lapsed.replayed, lapsed.left) == (3, 0, 0)
    finally:
        await spool.close()
    assert billed(raw_redis, "open") == Counter(
        u.request_id for u in usages + stream("open", 10, 20)
    )


async def test_a_call_that_never_commits_is_released_and_replayed_once(
    relay: Relay, redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> None:
    """The late call fails (its connection is cut before the request reaches Redis): the
    engine ends the holds, and the replay records the usages, once."""
    g = await open_gateway(relay, tmp_path)
    try:
        usages = stream("open", 1, 2)
        await spooled_in_flight(g, relay, usages)
        await relay.close()  # the connection drops with the request unsent
        await asyncio.wait_for(g.engine.late_replies_settled(), WAIT_S)
        assert all(r.held_until_ms == 0 for r in await g.spool.head(10))
        await move_session_on(redis_server, g.engine, "open")
        round_ = await replay(redis_server, g.spool, g.engine)
        assert (round_.replayed, round_.left) == (2, 0)
    finally:
        await close_gateway(g)
    assert billed(raw_redis, "open") == Counter(
        u.request_id for u in usages + stream("open", 10, 20)
    )


# -- caps -------------------------------------------------------------------------------------


async def test_a_replay_is_recorded_past_a_cap(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> None:
    """A spooled usage was acknowledged: its replay is recorded even while the tenant is at
    its cap on live request ids, which still refuses new usages."""
    store = RedisStore.from_url(redis_server.url, connect_timeout=1.0)
    spool = Spool(tmp_path / SPOOL_FILE)
    await spool.open()
    try:
        await store.publish_policy(load_policy_text(POLICY))
        engine = Engine(store, EngineSettings(store_timeout_s=2.0), Telemetry(), spool=spool)
        await engine.reload_policy()
        spooled = Usage("spooled-1", Subject("capped", "s1"), "slice.bytes", 7, Mode.REPORT)
        resolution = engine.policy.resolve(spooled.subject, spooled.metric)
        assert resolution.entitled
        assert await spool.append(SpooledUsage(spooled, fingerprint(spooled), "d" * 32))
        # the tenant fills its cap (2 live request ids); a third new one is refused
        for rid in ("new-1", "new-2", "new-3"):
            await engine.check(Usage(rid, Subject("capped", "s1"), "slice.bytes", 1, Mode.REPORT))
        refused = await engine.check(
            Usage("new-4", Subject("capped", "s1"), "slice.bytes", 1, Mode.REPORT)
        )
        assert refused.reason is Reason.CAP_REACHED and not refused.recorded
        round_ = await replay(redis_server, spool, engine)
        assert (round_.replayed, round_.dropped, round_.left) == (1, 0, 0)
    finally:
        await spool.close()
        await store.close()
    assert billed(raw_redis, "capped") == Counter({"new-1": 1, "new-2": 1, "spooled-1": 1})


# -- drain ------------------------------------------------------------------------------------


async def test_drain_reconciles_a_late_reply_in_flight(
    relay: Relay, redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> None:
    """The gateway's drain waits (bounded) for the late replies still followed: the spooled
    usages are settled from the reply before the process exits."""
    g = await open_gateway(relay, tmp_path)
    try:
        usages = stream("open", 1, 2)
        await spooled_in_flight(g, relay, usages)
        # bounded: with the call still held, the drain gives up at its bound
        await asyncio.wait_for(_settle_late_replies(g.engine, 0.2), WAIT_S)
        assert g.engine._late, "the late call should still be followed"
        relay.requests.set()
        await asyncio.wait_for(_settle_late_replies(g.engine, WAIT_S), WAIT_S + 1)
        assert not g.engine._late
        stats = await g.spool.stats()
        assert (stats.depth, stats.already_recorded) == (0, 2)
    finally:
        with contextlib.suppress(Exception):
            await close_gateway(g)
    assert billed(raw_redis, "open") == Counter(u.request_id for u in usages)


# -- a fail-open ALLOW that the store refused late --------------------------------------------


def calls(rid: str, session_id: str = "", sequence: int = 0) -> Usage:
    return Usage(
        rid,
        Subject("open", "", "k1"),
        "api.calls",
        1,
        Mode.ADMIT,
        session_id=session_id,
        sequence=sequence,
    )


async def empty_the_bucket(redis_server: EmbeddedRedis, engine: Engine) -> list[Verdict]:
    """Admits of all 5 units of key k1's bucket (1 more per hour), decided straight on
    Redis: the store refuses the next admit, while a gateway's local allowance (its own
    bucket, full) would still allow it."""
    direct = RedisStore.from_url(redis_server.url, connect_timeout=1.0, session_window=WINDOW)
    try:
        filler = Engine(direct, EngineSettings(store_timeout_s=2.0), Telemetry())
        filler.policy = engine.policy
        verdicts = await filler.decide_batch([calls(f"fill-{i}") for i in range(5)])
        assert all(v.decision is Decision.ALLOW and v.recorded for v in verdicts), verdicts
        return verdicts
    finally:
        await direct.close()


def late_allowed() -> list[Usage]:
    """A unary admit and a stream admit of key k1, each of 1 unit."""
    return [calls("late-u"), calls("late-s", session_id="ctl", sequence=1)]


def assert_refusal_recorded_late(raw: redis.Redis, request_id: str) -> None:
    """The store's record of the first attempt: a refusal (THROTTLE), not recorded."""
    rec = raw.get(f"cp:{{open}}:d:{request_id}")
    assert rec is not None, f"no request-id record for {request_id}"
    fields = str(rec).split("|")
    assert (int(fields[1]), fields[4]) == (int(Decision.THROTTLE), "0"), fields


def acknowledged(verdicts: list[Verdict]) -> Counter[str]:
    """The usages a caller was told it may act on (or that were recorded): ALLOWed admits."""
    return Counter(v.request_id for v in verdicts if v.decision is Decision.ALLOW)


async def replay_again(
    redis_server: EmbeddedRedis, spool: Spool, engine: Engine, entries: list[SpooledUsage]
) -> ReplayRound:
    """A second replay of the same usages (a replay whose gateway died before it settled
    them)."""
    assert all(await spool.append_all(entries))
    return await replay(redis_server, spool, engine)


async def test_a_fail_open_allow_refused_late_is_recorded_by_the_replay(
    relay: Relay, redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> None:
    """The store is reached late (in doubt) and refuses the admits the gateway had allowed
    (fail-open, spooled); the gateway reads that late refusal and releases the holds; the
    replay records each usage once, as a report, and rewrites the record: a resend and a
    second replay add nothing."""
    g = await open_gateway(relay, tmp_path)
    try:
        told = await empty_the_bucket(redis_server, g.engine)
        usages = late_allowed()
        told += await spooled_in_flight(g, relay, usages)
        assert all(v.decision is Decision.ALLOW for v in told)
        relay.requests.set()  # the call reaches Redis (the bucket is empty) and is answered
        await asyncio.wait_for(g.engine.late_replies_settled(), WAIT_S)
        for u in usages:
            assert_refusal_recorded_late(raw_redis, u.request_id)
        spooled = await g.spool.head(10)
        assert [(r.entry.usage.request_id, r.held_until_ms) for r in spooled] == [
            ("late-u", 0),
            ("late-s", 0),
        ]
        assert billed(raw_redis, "open") == Counter(f"fill-{i}" for i in range(5))
        await move_session_on(redis_server, g.engine, "open")

        first = await replay(redis_server, g.spool, g.engine)
        assert (first.replayed, first.already_recorded, first.dropped, first.left) == (2, 0, 0, 0)
        for u in usages:  # the record now says recorded, under the first attempt's decision
            rec = str(raw_redis.get(f"cp:{{open}}:d:{u.request_id}")).split("|")
            assert rec[4] == "2" and rec[5] == spooled[usages.index(u)].entry.decision_id

        # a resend of the unary admit is answered from the record: recorded, nothing added
        direct = RedisStore.from_url(redis_server.url, connect_timeout=1.0, session_window=WINDOW)
        try:
            resender = Engine(direct, EngineSettings(store_timeout_s=2.0), Telemetry())
            resender.policy = g.engine.policy
            (resent,) = await resender.decide_batch([usages[0]])
        finally:
            await direct.close()
        assert (resent.recorded, resent.replayed) == (True, True)
        assert resent.decision_id == spooled[0].entry.decision_id

        second = await replay_again(redis_server, g.spool, g.engine, [r.entry for r in spooled])
        assert (second.replayed, second.already_recorded, second.left) == (0, 2, 0)
    finally:
        await close_gateway(g)

    entries = [e for e in ledger_entries(raw_redis, "open") if e.request_id.startswith("late")]
    assert sorted((e.request_id, e.mode, e.amount) for e in entries) == [
        ("late-s", "report", 1),
        ("late-u", "report", 1),
    ]
    assert all(e.occurred_at_ms for e in entries)
    # every usage a caller was told ALLOW is in the ledger exactly once, nothing else is
    assert billed(raw_redis, "open") == acknowledged(told) + Counter(
        u.request_id for u in stream("open", 10, 20)
    )


async def test_a_late_refusal_whose_reply_died_with_the_gateway_is_recorded_by_the_replay(
    relay: Relay, redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> None:
    """The refusal commits, the gateway dies before reading it (the relay holds the reply);
    a new process replays once the holds lapsed: each usage is recorded once, and a second
    replay adds nothing."""
    g = await open_gateway(relay, tmp_path)
    usages = late_allowed()
    try:
        told = await empty_the_bucket(redis_server, g.engine)
        relay.replies.clear()  # the request reaches Redis; the reply never comes back
        verdicts = await asyncio.wait_for(g.engine.decide_batch(usages), WAIT_S)
        assert all(
            v.decision is Decision.ALLOW and v.degraded and v.spooled and not v.recorded
            for v in verdicts
        ), verdicts
        told += verdicts
        await wait_for(relay.reply_held, "Redis' reply to the call (the refusal)")
        # not in doubt (it ran at once): the stream usage's refusal is in its session slot
        assert_refusal_recorded_late(raw_redis, "late-u")
    finally:
        for task in list(g.engine._late):  # the process dies: its late replies are unread
            task.cancel()
        await close_gateway(g)
    spool = Spool(tmp_path / SPOOL_FILE)  # the next process, same data folder
    await spool.open()
    try:
        spooled = await spool.head(10)
        held = await replay(redis_server, spool, g.engine)
        assert (held.settled, held.left) == (0, 2)  # the holds still run
        lapsed = await replay(redis_server, spool, g.engine, clock_ms=SPOOL_HOLD_MS + 1)
        assert (lapsed.replayed, lapsed.already_recorded, lapsed.dropped) == (2, 0, 0)
        second = await replay_again(redis_server, spool, g.engine, [r.entry for r in spooled])
        assert (second.replayed, second.already_recorded, second.left) == (0, 2, 0)
    finally:
        await spool.close()
    assert billed(raw_redis, "open") == acknowledged(told)
