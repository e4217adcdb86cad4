"""`UsageStream`: many usages over one StreamUsage call, batched, and resent after a reconnect.

    async with client.stream() as stream:
        verdict = await stream.submit(
            tenant="mvno-demo", slice="1-000001", metric="slice.bytes", amount=1_500_000
        )
        futures = [
            stream.submit_nowait(tenant="mvno-demo", slice="1-000001", metric="slice.bytes",
                                 amount=n)
            for n in (10, 20, 30)
        ]
        verdicts = await asyncio.gather(*futures)
    # leaving the block waits until every submitted usage is answered

How it keeps "exactly once" across connection drops:

- The stream has a `session_id` (a UUID unless given) and gives each usage the next
  `sequence` number (strictly increasing) and a request id (a UUID unless given).
- Every usage stays in a pending buffer, in sequence order, until its verdict arrives.
- When the connection fails transiently (UNAVAILABLE, RESOURCE_EXHAUSTED, or no answer to a
  sent batch within `stall_timeout`), a new StreamUsage call is opened after a backoff and
  every pending usage is sent again, in order, with the same session id, sequence and
  request id. The gateway recognises the ones it had already decided and answers them from
  its record (`replayed=True`), counting nothing twice.
- Only when `retry.max_attempts` connections in a row fail without a single verdict are the
  pending usages failed (with `Unavailable`/`DeadlineExceeded`); the stream then accepts no
  more usages. A non-transient failure (e.g. UNAUTHENTICATED) fails them at once.

Usages are sent in batches of up to `batch_size`; a batch that is not full waits `linger`
seconds for company. At most `max_in_flight` usages are pending: `submit` waits for room,
`submit_nowait` raises `StreamFull`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Literal

import grpc
import grpc.aio

from chargepath_client import _wire
from chargepath_client._errors import (
    ChargepathError,
    DeadlineExceeded,
    InvalidUsage,
    StreamClosed,
    StreamFull,
    Unavailable,
    from_rpc_error,
    invalid_usage_from_verdict,
)
from chargepath_client._retry import RetryPolicy
from chargepath_client._validation import (
    SEQUENCE_MAX,
    validate_request_id,
    validate_session_id,
)
from chargepath_client._verdict import Mode, Verdict
from chargepath_protos.v1 import metering_pb2 as pb

logger = logging.getLogger("chargepath_client")

MAX_BATCH = 1_000  # the server's limit of usages per StreamUsageRequest
# The gateway's default session replay window (`--session-window`): a resend more than this many
# sequences behind the session's highest is refused, so no more than this many usages are ever
# written and unanswered at once.
REPLAY_WINDOW = 128


@dataclass(slots=True)
class _Pending:
    usage: pb.Usage
    future: asyncio.Future[Verdict]


class _ConnectionLost(Exception):
    """One StreamUsage call ended before its work was done; `transient`: worth reconnecting."""

    def __init__(self, error: ChargepathError, *, transient: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.transient = transient


class UsageStream:
    """A StreamUsage session; get one from `AsyncClient.stream()` and use `async with`.

    Attributes: `session_id`, `pending` (usages sent or queued but not answered yet),
    `reconnects` (connections replaced after a transient failure).
    """

    def __init__(
        self,
        stream_usage: _wire.StartUsageStream,
        *,
        session_id: str | None,
        batch_size: int,
        linger: float,
        max_in_flight: int,
        first_sequence: int,
        stall_timeout: float,
        retry: RetryPolicy,
        metadata: _wire.Metadata,
        validate: bool,
        view: Literal["full", "basic"] = "full",
    ) -> None:
        if view not in ("full", "basic"):
            raise ValueError("view must be 'full' or 'basic'")
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1 to {MAX_BATCH}")
        if max_in_flight < batch_size:
            raise ValueError("max_in_flight must be at least batch_size")
        if linger < 0 or stall_timeout <= 0:
            raise ValueError("need linger >= 0 and stall_timeout > 0")
        if not 1 <= first_sequence <= SEQUENCE_MAX:
            raise ValueError(f"first_sequence must be 1 to {SEQUENCE_MAX}")
        if session_id is not None:
            validate_session_id(session_id)
        self.session_id = session_id if session_id is not None else _wire.new_id()
        self.reconnects = 0
        self._stream_usage = stream_usage
        self._batch_size = batch_size
        self._linger = linger
        self._max_in_flight = max_in_flight
        self._stall_timeout = stall_timeout
        self._retry = retry
        self._metadata = metadata
        self._validate = validate
        # Builds (and unless told not to, validates) a usage of this session.
        self._usage = functools.partial(_wire.usage, validate=validate, session_id=self.session_id)
        self._view = pb.VERDICT_VIEW_BASIC if view == "basic" else pb.VERDICT_VIEW_FULL
        self._next_sequence = first_sequence

        # Unanswered usages by sequence; dicts keep insertion (= sequence) order.
        self._pending: dict[int, _Pending] = {}
        self._sequence_of: dict[str, int] = {}
        # Sequences to write on the current connection, and the batches written but not
        # answered yet (time written, size), oldest first.
        self._unsent: deque[int] = deque()
        self._in_flight: deque[tuple[float, int]] = deque()
        self._sent_unanswered = 0
        self._last_answer = 0.0

        self._runner: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._closing = False
        self._broken: ChargepathError | None = None
        self._stalled = False
        self._answered = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> UsageStream:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            # Cancelled or interrupted: do not hold the caller up draining.
            await self.abort()
            return
        try:
            await self.aclose()
        except ChargepathError:
            if exc is None:
                raise
            logger.warning("stream %s: closing after an error failed", self.session_id)

    def start(self) -> None:
        """Start the background task (done by `async with`). Needs a running event loop."""
        if self._runner is not None:
            return
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._runner = asyncio.get_running_loop().create_task(
            self._run(), name=f"chargepath-stream-{self.session_id}"
        )

    async def aclose(self) -> None:
        """Stop accepting usages, wait until every pending one is answered, then close.

        Raises the stream's failure if it broke (its pending usages were failed). To bound
        the wait, wrap it: `async with asyncio.timeout(5): await stream.aclose()`; if the
        wait is cancelled, the stream is aborted (see `abort`).
        """
        self._closing = True
        if self._runner is None:
            return
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            await self._runner
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                await self.abort()  # our wait was cancelled: give up on draining
                raise
            # Otherwise the runner was cancelled by `abort()`: nothing left to drain.
        if self._broken is not None:
            raise self._broken

    async def abort(self) -> None:
        """Close at once; pending usages fail with `StreamClosed` (they may or may not have
        been recorded: resend them with the same request ids on a new stream or `report`)."""
        self._closing = True
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        message = f"stream {self.session_id} aborted before this usage was answered"
        self._fail_pending(lambda request_id: StreamClosed(message, request_id=request_id))

    # -- submitting ------------------------------------------------------------------------

    def submit_nowait(
        self,
        *,
        tenant: str,
        metric: str,
        amount: int,
        mode: Mode | str = Mode.REPORT,
        slice: str = "",
        key: str = "",
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        occurred_at: datetime | None = None,
    ) -> asyncio.Future[Verdict]:
        """Queue one usage and return a future of its verdict.

        Raises at once `InvalidUsage` for a bad argument, `StreamFull` if `max_in_flight`
        usages are pending, `StreamClosed` after close or failure. The future fails with
        `InvalidUsage` if the gateway finds the usage invalid, and with a `ChargepathError`
        if the stream gives up.
        """
        if self._runner is None or self._wakeup is None or self._room is None:
            raise RuntimeError("start the stream first: `async with client.stream() as s:`")
        if self._broken is not None:
            raise StreamClosed(f"stream {self.session_id} is broken: {self._broken}")
        if self._closing:
            raise StreamClosed(f"stream {self.session_id} is closed")
        if not self._validate and request_id is not None:
            validate_request_id(request_id)  # the futures are matched by it
        usage = self._usage(
            Mode(mode), tenant, metric, amount, slice, key, labels, request_id, occurred_at
        )
        if len(self._pending) >= self._max_in_flight:
            raise StreamFull(f"{self._max_in_flight} usages already pending")
        request_id = usage.request_id
        if request_id in self._sequence_of:
            raise InvalidUsage("request_id", "a usage with this id is already pending")

        sequence = self._next_sequence
        if sequence > SEQUENCE_MAX:
            raise InvalidUsage("sequence", f"the session has used up its {SEQUENCE_MAX} sequences")
        self._next_sequence += 1
        usage.sequence = sequence
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._pending[sequence] = _Pending(usage, future)
        self._sequence_of[request_id] = sequence
        self._unsent.append(sequence)
        if len(self._pending) >= self._max_in_flight:
            self._room.clear()
        self._wakeup.set()
        return future

    async def submit(
        self,
        *,
        tenant: str,
        metric: str,
        amount: int,
        mode: Mode | str = Mode.REPORT,
        slice: str = "",
        key: str = "",
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        occurred_at: datetime | None = None,
    ) -> Verdict:
        """Queue one usage (waiting for room if `max_in_flight` are pending) and await its
        verdict. Cancelling the wait does not withdraw the usage: it is still delivered."""
        if self._room is None:
            raise RuntimeError("start the stream first: `async with client.stream() as s:`")
        while len(self._pending) >= self._max_in_flight and not self._closing:
            await self._room.wait()
        future = self.submit_nowait(
            tenant=tenant,
            metric=metric,
            amount=amount,
            mode=mode,
            slice=slice,
            key=key,
            labels=labels,
            request_id=request_id,
            occurred_at=occurred_at,
        )
        return await asyncio.shield(future)

    # -- the background task ---------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wakeup is not None
        failures = 0
        while True:
            if not self._pending:
                if self._closing:
                    return
                # Connect lazily: an idle stream holds no call open and cannot fail.
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            answered_before = self._answered
            try:
                await self._connection()
            except _ConnectionLost as lost:
                if self._answered > answered_before:
                    failures = 0
                failures += 1
                if not lost.transient or failures >= self._retry.max_attempts:
                    self._give_up(lost, failures)
                    return
                pause = self._retry.backoff(failures)
                self.reconnects += 1
                logger.info(
                    "stream %s: connection lost (%s), %d pending, reconnecting in %.3fs",
                    self.session_id,
                    lost,
                    len(self._pending),
                    pause,
                )
                await asyncio.sleep(pause)
            except Exception as exc:
                # A closed channel, or a bug: fail the pending usages rather than leave their
                # futures hanging.
                logger.exception("stream %s: unexpected failure", self.session_id)
                cause = ChargepathError(f"stream failed: {exc!r}")
                self._give_up(_ConnectionLost(cause, transient=False), failures + 1)
                return

    async def _connection(self) -> None:
        """Run one StreamUsage call until the work is done or the call fails."""
        call = self._stream_usage(metadata=self._metadata)
        # Everything unanswered goes (again) on this connection, in sequence order.
        self._unsent = deque(self._pending)
        self._in_flight.clear()
        self._sent_unanswered = 0
        self._stalled = False
        self._last_answer = time.monotonic()
        writer = asyncio.create_task(self._write(call))
        watchdog = asyncio.create_task(self._watch(call))
        try:
            await self._read(call)
        finally:
            call.cancel()
            writer.cancel()
            watchdog.cancel()
            for result in await asyncio.gather(writer, watchdog, return_exceptions=True):
                if isinstance(result, Exception):
                    # A failure of our own (not a cancellation) explains more than the
                    # "call cancelled" the reader saw because of it.
                    raise result

    async def _write(self, call: _wire.UsageStreamCall) -> None:
        try:
            await self._write_batches(call)
        except Exception:
            call.cancel()  # so that the reader stops too
            raise

    async def _write_batches(self, call: _wire.UsageStreamCall) -> None:
        assert self._wakeup is not None
        while True:
            if not self._unsent:
                if self._closing and not self._pending:
                    await call.done_writing()
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # At most REPLAY_WINDOW usages written and unanswered: after a reconnect every one
            # of them is then within the gateway's replay window of the session's highest
            # sequence, so a resend is answered from its record, never refused as too old.
            room = REPLAY_WINDOW - self._sent_unanswered
            if room <= 0:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._unsent) < self._batch_size and self._linger > 0 and not self._closing:
                await asyncio.sleep(self._linger)
            batch: list[pb.Usage] = []
            while self._unsent and len(batch) < min(self._batch_size, room):
                item = self._pending.get(self._unsent.popleft())
                if item is not None:
                    batch.append(item.usage)
            if not batch:
                continue
            self._in_flight.append((time.monotonic(), len(batch)))
            self._sent_unanswered += len(batch)
            try:
                await call.write(pb.StreamUsageRequest(usages=batch, view=self._view))
            except grpc.aio.AioRpcError:
                return  # the reader sees the same status and reports it
            except asyncio.InvalidStateError:
                return  # the call already ended; the reader reports how

    async def _watch(self, call: _wire.UsageStreamCall) -> None:
        """Cancel the call if a sent batch stays unanswered for `stall_timeout` seconds."""
        while True:
            await asyncio.sleep(self._stall_timeout / 4)
            if not self._in_flight:
                continue
            waiting_since = max(self._in_flight[0][0], self._last_answer)
            if time.monotonic() - waiting_since > self._stall_timeout:
                self._stalled = True
                call.cancel()
                return

    async def _read(self, call: _wire.UsageStreamCall) -> None:
        while True:
            try:
                response = await call.read()
            except grpc.aio.AioRpcError as error:
                code = error.code()
                transient = code == grpc.StatusCode.DEADLINE_EXCEEDED or self._retry.is_transient(
                    code, error.details()
                )
                raise _ConnectionLost(from_rpc_error(error), transient=transient) from error
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are being cancelled, not just the call
                reason: ChargepathError = (
                    DeadlineExceeded(f"no answer within {self._stall_timeout}s")
                    if self._stalled
                    else ChargepathError("call cancelled", code=grpc.StatusCode.CANCELLED)
                )
                raise _ConnectionLost(reason, transient=True) from None
            if not isinstance(response, pb.StreamUsageResponse):  # grpc.aio.EOF
                if self._closing and not self._pending:
                    return
                # The server ended the stream with OK while work was left: reconnect.
                raise _ConnectionLost(Unavailable("stream ended by the server"), transient=True)
            self._on_response(response)

    def _on_response(self, response: pb.StreamUsageResponse) -> None:
        assert self._wakeup is not None and self._room is not None
        self._last_answer = time.monotonic()
        if self._in_flight:
            _, size = self._in_flight.popleft()
            self._sent_unanswered -= size
            self._wakeup.set()  # room in the replay window: the writer may go on
            if size != len(response.verdicts):
                logger.warning(
                    "stream %s: batch of %d usages got %d verdicts",
                    self.session_id,
                    size,
                    len(response.verdicts),
                )
        for raw in response.verdicts:
            sequence = self._sequence_of.pop(raw.request_id, None)
            if sequence is None:
                logger.warning(
                    "stream %s: verdict for unknown request id %r", self.session_id, raw.request_id
                )
                continue
            item = self._pending.pop(sequence)
            self._answered += 1
            if item.future.done():
                continue
            if raw.reason == pb.REASON_INVALID_USAGE:
                item.future.set_exception(invalid_usage_from_verdict(raw))
            else:
                item.future.set_result(Verdict.from_pb(raw))
        if len(self._pending) < self._max_in_flight:
            self._room.set()
        if self._closing and not self._pending:
            self._wakeup.set()

    def _give_up(self, lost: _ConnectionLost, failures: int) -> None:
        cause = lost.error
        summary = f"stream {self.session_id} gave up after {failures} failed connection(s): {cause}"
        logger.warning("%s; failing %d pending usages", summary, len(self._pending))

        def error(request_id: str | None) -> ChargepathError:
            if isinstance(cause, InvalidUsage):
                return InvalidUsage(cause.field, cause.reason, request_id=request_id)
            return type(cause)(summary, code=cause.code, request_id=request_id)

        self._broken = error(None)
        self._fail_pending(error)

    def _fail_pending(self, error: Callable[[str | None], ChargepathError]) -> None:
        for item in self._pending.values():
            if not item.future.done():
                item.future.set_exception(error(item.usage.request_id))
        self._pending.clear()
        self._sequence_of.clear()
        self._unsent.clear()
        if self._room is not None:
            self._room.set()
