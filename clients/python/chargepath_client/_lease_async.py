"""`AsyncLease`: a quota lease of the `AsyncClient`, renewed and reported by a background task.

async with client.lease("cpaas-demo", "api.sms.send", units=1000, key="key-42") as lease:
    if lease.try_acquire():
        await send_sms()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from types import TracebackType

import grpc
import grpc.aio

from chargepath_client import _wire
from chargepath_client._lease import DONE, BaseLease, LeaseAnswer, PlannedAsk
from chargepath_client._retry import RetryPolicy
from chargepath_protos.v1 import lease_pb2

logger = logging.getLogger("chargepath_client")


class AsyncLease(BaseLease):
    """A quota lease held by an `AsyncClient` (made by `AsyncClient.lease`; see `BaseLease`
    for the counting).

    `async with client.lease(...) as lease:` opens it (one round trip: the first grant) and
    closes it at the end (reports what was spent, releases the rest); or `await open()` and
    `await close()`. `try_acquire` is a plain method, no I/O and no lock: call it from the
    event loop's thread. The background task runs whenever the loop does, so a holder that
    spends in a loop must await something now and then for the lease to be renewed.
    """

    __slots__ = ("_call", "_event", "_metadata", "_task")

    def __init__(
        self,
        call: _wire.LeaseCall,
        metadata: _wire.Metadata,
        tenant: str,
        metric: str,
        *,
        units: int,
        slice: str = "",
        key: str = "",
        holder: str = "",
        labels: Mapping[str, str] | None = None,
        report_every: float | None = 1.0,
        validate: bool = True,
        retry: RetryPolicy | None = None,
        attempt_timeout: float = 2.0,
    ) -> None:
        super().__init__(
            tenant,
            metric,
            units=units,
            slice=slice,
            key=key,
            holder=holder,
            labels=labels,
            report_every=report_every,
            validate=validate,
            retry=retry if retry is not None else RetryPolicy(),
            attempt_timeout=attempt_timeout,
            clock=time.monotonic,
        )
        self._call = call
        self._metadata = metadata
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _wake(self) -> None:
        self._event.set()

    async def open(self, deadline: float | None = None) -> AsyncLease:
        """Ask for the first grant (retried within `deadline` seconds, by default the
        client's `default_deadline`), then start the background task. A THROTTLE or DENY is
        not an error: the lease holds nothing yet and the background asks again
        (`last_answer` says why). Raises the call's `ChargepathError` when the gateway
        refuses the caller or cannot be reached."""
        if self._task is not None:
            raise RuntimeError("the lease is already open")
        wait = deadline if deadline is not None else self._attempt_timeout
        self._give_up_at = self._clock() + wait
        step = self.plan(self._clock())
        if not isinstance(step, PlannedAsk):
            raise RuntimeError("the lease is closed (or failed): make another one")
        await self._send(step)
        self._give_up_at = float("inf")
        if self._failure is not None:
            raise self._failure
        self._task = asyncio.create_task(self._run(), name=f"chargepath-lease-{self.metric}")
        return self

    async def close(self, within: float = 5.0) -> None:
        """Report what was spent and release the lease (its unspent units go back to the
        limits); waits up to `within` seconds. Raises `ChargepathError` when units spent
        could not be reported. Closing twice does nothing."""
        if self._closing:
            return
        self._start_closing(within)
        task = self._task
        if task is None:
            return
        self._event.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), within + 1.0)
        except TimeoutError:
            task.cancel()
        error = self._close_error()
        if error is not None:
            raise error

    async def __aenter__(self) -> AsyncLease:
        if self._task is None:
            await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
            return
        try:
            await self.close()
        except Exception:  # the body's exception is the one to see; this one is logged
            logger.exception("closing lease of %s/%s", self.tenant, self.metric)

    async def _run(self) -> None:
        while True:
            self._event.clear()
            step = self.plan(self._clock())
            if step is DONE:
                return
            if isinstance(step, PlannedAsk):
                await self._send(step)
            else:
                assert step is None or isinstance(step, float)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._event.wait(), step)

    async def _send(self, ask: PlannedAsk) -> None:
        """Send `ask` until it is answered or fails for good (same request id each time)."""
        request = lease_pb2.LeaseRequest(ask=ask.request)
        sent_at = self._clock()
        while True:
            try:
                response = await self._call(
                    request, timeout=self.attempt_timeout(self._clock()), metadata=self._metadata
                )
            except grpc.aio.AioRpcError as error:
                pause = self.pause_after(ask, error, self._clock())
                if pause is None:
                    return
                await asyncio.sleep(pause)
            else:
                answer = LeaseAnswer.from_pb(response.answer)
                pause = self.resend_after(ask, answer, self._clock())
                if pause is None:
                    self.applied(ask, answer, sent_at, self._clock())
                    return
                await asyncio.sleep(pause)
