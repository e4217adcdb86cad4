"""A store timeout that tells a slow store from a stalled event loop.

``asyncio.timeout`` cancels when its timer callback runs. After the loop was stuck (a long
garbage collection, a process starved of CPU), the timer and the store's reply are handled in
the same turn of the loop, and the timer goes first: a reply that arrived in time is thrown
away, and a usage Redis recorded is answered as degraded. :class:`StoreDeadline` notices that
its timer ran late and gives the call one more period of loop time, once, before it cancels.

The period counts from when the call is sent (:meth:`StoreDeadline.restart`), not from when
the caller started waiting: the turns of the loop a call waits for before it is written belong
to the gateway's own backlog, not to the store.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

#: A timer callback this much (seconds) past its time means the loop, not the store, was late.
LATE_S = 0.005


class StoreDeadline:
    """``async with StoreDeadline(delay):`` raises :class:`TimeoutError` if the block takes
    longer than ``delay`` seconds of loop time. When the deadline's callback runs more than
    :data:`LATE_S` after the deadline, the block gets ``delay`` more seconds (once), so that
    the loop can handle what arrived while it was stuck. Worst case: ``2 * delay`` plus the
    stall."""

    __slots__ = ("_cancelling", "_delay", "_first", "_handle", "_loop", "_state", "_task", "_when")

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._state = 0  # 0 running, 1 extended once, 2 expired (the task was cancelled)

    async def __aenter__(self) -> StoreDeadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("StoreDeadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._loop = loop = asyncio.get_running_loop()
        self._when = self._first = loop.time() + self._delay
        self._handle = loop.call_at(self._when, self._on_deadline)
        return self

    def _on_deadline(self) -> None:
        now = self._loop.time()
        if self._state == 0 and now - self._when > LATE_S:
            self._state = 1
            self._when = now + self._delay
            self._handle = self._loop.call_at(self._when, self._on_deadline)
            return
        self._state = 2
        self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._handle.cancel()
        if (
            self._state == 2
            and exc_type is asyncio.CancelledError
            and self._task.uncancel() <= self._cancelling
        ):
            raise TimeoutError("store timeout") from exc

    def restart(self) -> None:
        """Start the period again from now (the store call is about to be written): the time
        the call waited before it could be sent (its turn on a busy loop, a stall before it
        was written) does not count against the store. Does nothing once the deadline was
        extended or has expired. Call it inside the block."""
        if self._state != 0:
            return
        self._handle.cancel()
        self._when = self._first = self._loop.time() + self._delay
        self._handle = self._loop.call_at(self._when, self._on_deadline)

    @property
    def when(self) -> float:
        """The deadline, in loop time (``loop.time()``), as first set."""
        return self._first

    @property
    def latest(self) -> float:
        """The first deadline plus one extension's worth (loop time): the earliest end of the
        extension a late timer gets. What the store is told: a batch it starts later is never
        waited for unless the loop stalls again; one it starts between :attr:`when` and this
        may be waited for (a stalled loop, the extension) or not (the reply comes late and
        the engine reconciles it)."""
        return self._first + self._delay

    @property
    def extended(self) -> bool:
        """Whether the loop was found late and the call given more time."""
        return self._state >= 1
