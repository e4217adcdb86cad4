"""StoreDeadline: a timeout that gives a late loop one more period, on both event loops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from chargepath.deadline import StoreDeadline

Runner = Callable[[Coroutine[Any, Any, Any]], Any]
RUNNERS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


@RUNNERS
def test_a_block_that_ends_in_time_is_left_alone(run: Runner) -> None:
    async def main() -> bool:
        deadline = StoreDeadline(0.05)
        async with deadline:
            await asyncio.sleep(0.001)
        return deadline.extended

    assert run(main()) is False


@RUNNERS
def test_a_block_that_overruns_on_an_idle_loop_times_out_at_its_delay(run: Runner) -> None:
    async def main() -> float:
        started = time.perf_counter()
        with pytest.raises(TimeoutError):
            async with StoreDeadline(0.05):
                await asyncio.sleep(10)
        return time.perf_counter() - started

    # uvloop keeps timers in whole milliseconds (libuv): one may fire up to 1 ms early
    assert 0.049 - 0.001 <= run(main()) < 0.5


@RUNNERS
def test_a_late_timer_gives_one_more_period(run: Runner) -> None:
    """The loop is stuck past the deadline; what was ready meanwhile still completes."""

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[str] = loop.create_future()
        # the "reply" arrives 10 ms in, while the loop is stuck from 1 ms to 100 ms
        loop.call_later(0.001, time.sleep, 0.1)
        loop.call_later(0.01, reply.set_result, "ok")
        deadline = StoreDeadline(0.05)
        async with deadline:
            assert await reply == "ok"
        return deadline.extended

    assert run(main()) is True


@RUNNERS
def test_the_extension_is_given_once(run: Runner) -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        loop.call_later(0.001, time.sleep, 0.1)
        started = time.perf_counter()
        deadline = StoreDeadline(0.05)
        with pytest.raises(TimeoutError):
            async with deadline:
                await asyncio.sleep(10)
        assert deadline.extended
        return time.perf_counter() - started

    # the stall (0.1), one more period (0.05), and slack for a busy machine
    assert 0.15 <= run(main()) < 0.6


@RUNNERS
def test_a_cancellation_from_outside_stays_a_cancellation(run: Runner) -> None:
    async def main() -> None:
        async def guarded() -> None:
            async with StoreDeadline(5.0):
                await asyncio.sleep(10)

        task = asyncio.ensure_future(guarded())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


def stall(seconds: float) -> None:
    """Block the event loop (a long collection, a starved CPU)."""
    time.sleep(seconds)


@RUNNERS
def test_time_before_the_call_is_sent_does_not_count(run: Runner) -> None:
    """The loop is stuck before the call is written (the gateway's own backlog): restart()
    at the write gives the store its whole period, and the extension stays unused for a
    stall after it."""

    async def main() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        deadline = StoreDeadline(0.05)
        async with deadline:
            stall(0.1)  # past the first period, before the call is sent
            deadline.restart()
            restarted_late = deadline.when > loop.time()
            reply: asyncio.Future[str] = loop.create_future()
            loop.call_soon(reply.set_result, "ok")
            assert await reply == "ok"
        return restarted_late, deadline.extended

    assert run(main()) == (True, False)


@RUNNERS
def test_a_silent_store_still_times_out_after_a_restart(run: Runner) -> None:
    async def main() -> None:
        deadline = StoreDeadline(0.05)
        with pytest.raises(TimeoutError):
            async with deadline:
                deadline.restart()
                await asyncio.sleep(10)

    run(main())
