"""A stalled event loop is not a slow store: a reply that came in time is used, not thrown
away for a degraded verdict because the store timeout's timer ran late. On both event loops
(the gateway runs uvloop), against the session's real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import redis
import uvloop

from chargepath.core.model import Mode, Subject, Usage, Verdict
from chargepath.store.embedded import EmbeddedRedis
from chargepath.store.redis_store import RedisStore
from tests.conftest import ledger_entries, make_engine
from tests.integration.policies import REPORTING

Runner = Callable[[Coroutine[Any, Any, Any]], Any]
RUNNERS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


def stall(seconds: float) -> None:
    """Block the event loop, as a long garbage collection or a starved CPU would."""
    time.sleep(seconds)


async def check_through_a_stall(
    url: str,
    raw: redis.Redis,
    request_id: str,
    *,
    pause_ms: int,
    stall_s: float,
    timeout_s: float = 0.05,
) -> tuple[Verdict, float]:
    """One report decided with a store timeout of ``timeout_s`` while Redis holds its reply
    ``pause_ms`` and the loop is stuck ``stall_s``; the verdict and how long it took."""
    store = RedisStore.from_url(url, connect_timeout=1.0)
    try:
        engine = await make_engine(store, REPORTING, store_timeout_s=timeout_s)
        await engine.check(Usage("warm", Subject("mvno", "s1"), "slice.bytes", 1, Mode.REPORT))
        # a pause ends on Redis' timer (serverCron, every 1000/hz ms: 100 ms at the default
        # hz 10), so that it lasts about what it says, not up to 100 ms more
        hz = raw.config_get("hz")["hz"]
        raw.config_set("hz", 100)
        raw.execute_command("CLIENT", "PAUSE", str(pause_ms), "ALL")
        try:
            u = Usage(request_id, Subject("mvno", "s1"), "slice.bytes", 10, Mode.REPORT)
            started = time.perf_counter()
            check = asyncio.ensure_future(engine.check(u))
            await asyncio.sleep(0.005)  # the script call is on its way
            stall(stall_s)
            v = await check
            return v, time.perf_counter() - started
        finally:
            raw.execute_command("CLIENT", "UNPAUSE")
            raw.config_set("hz", hz)
            await engine.close()
    finally:
        await store.close()


@RUNNERS
def test_a_reply_that_waited_out_a_loop_stall_is_used(
    run: Runner, redis_server: EmbeddedRedis, raw_redis: redis.Redis
) -> None:
    # Redis holds the reply 20 ms, in time for the 200 ms timeout; it arrives while the loop
    # is stuck for 600 ms, so the timer is long overdue when the loop wakes. (A 200 ms timeout,
    # not the default 50: on a loaded machine redis-server itself may wait that long for a
    # CPU, and then the reply was not in time, which is not what this test is about.)
    v, _ = run(
        check_through_a_stall(
            redis_server.url, raw_redis, "stalled-1", pause_ms=20, stall_s=0.6, timeout_s=0.2
        )
    )
    assert v.recorded and not v.degraded
    assert [e.request_id for e in ledger_entries(raw_redis, "mvno")] == ["warm", "stalled-1"]


@RUNNERS
def test_a_store_that_does_not_answer_still_times_out_after_a_stall(
    run: Runner, redis_server: EmbeddedRedis, raw_redis: redis.Redis
) -> None:
    """The grace after a stall is bounded: a store that stays silent is still a timeout."""
    v, waited = run(
        check_through_a_stall(redis_server.url, raw_redis, "silent-1", pause_ms=600, stall_s=0.1)
    )
    assert v.degraded and not v.recorded
    assert waited < 0.45  # the stall, one more timeout's worth, slack for a busy machine


@RUNNERS
def test_a_command_is_written_in_the_step_that_issues_it(
    run: Runner, redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store timeout starts when the engine issues the call: the bytes must leave in that
    same step, not a turn of the loop later (redis-py's write under ``socket_timeout`` runs
    in a task of its own on Python 3.11; ``connect.prompt_writes`` undoes that)."""
    writes: list[int] = []
    original = asyncio.StreamWriter.writelines

    def counted(self: asyncio.StreamWriter, data: Any) -> None:
        writes.append(len(writes))
        original(self, data)

    async def main() -> tuple[int, bool]:
        store = RedisStore.from_url(redis_server.url, connect_timeout=1.0)
        try:
            await store.ping()  # connected: what follows is one PING on a warm connection
            monkeypatch.setattr(asyncio.StreamWriter, "writelines", counted)
            call = asyncio.ensure_future(store.ping())
            await asyncio.sleep(0)  # one turn: the call's first step, and nothing after it
            written = len(writes)
            await call
            return written, call.exception() is None
        finally:
            monkeypatch.undo()
            await store.close()

    assert run(main()) == (1, True)
