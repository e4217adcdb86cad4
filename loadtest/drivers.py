"""The flows a worker drives: each turns an arrival (an intended send time) into one operation.

A flow never waits for an operation before starting the next one: ``fire`` only starts it. At
most ``max_in_flight`` operations of a flow are outstanding in a worker; an arrival beyond that
is counted as dropped (a client-side overload, reported as such) rather than queued without
bound.

The flows here are paced by this process's event loop (:class:`PacedFlow`); a flow may also own
its schedule, as the Go generator's does (:mod:`loadtest.gogen`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence

import grpc
import redis.asyncio
from envoy.service.ratelimit.v3 import rls_pb2

from chargepath_protos.v1 import metering_pb2 as pb
from loadtest.ceiling_redis import BatchDecision
from loadtest.schedule import Schedule
from loadtest.stats import DEGRADED_OFFSET, FlowRecorder
from loadtest.workload import CheckRequests, RlsRequests, StreamBatches, Workload

CHECK_METHOD = "/chargepath.v1.MeteringService/Check"
STREAM_METHOD = "/chargepath.v1.MeteringService/StreamUsage"
RLS_METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"

Metadata = tuple[tuple[str, str], ...]

#: The error of a Check answered with a verdict for another request id (both generators).
REQUEST_ID_MISMATCH = "REQUEST_ID_MISMATCH"
#: The error of a ShouldRateLimit answer whose overall code is neither OK nor OVER_LIMIT.
RLS_UNKNOWN_CODE = "RLS_UNKNOWN_CODE"

#: An RLS answer counted as the decision it stands for: OK as ALLOW, OVER_LIMIT as THROTTLE (it
#: does not tell a THROTTLE from a DENY, nor say whether the decision was degraded).
RLS_OUTCOMES = {
    rls_pb2.RateLimitResponse.OK: int(pb.DECISION_ALLOW),
    rls_pb2.RateLimitResponse.OVER_LIMIT: int(pb.DECISION_THROTTLE),
}

# Pacing sleeps no less than this: below it, timer wake-ups cost more than they save.
MIN_SLEEP_S = 0.0005


def outcome(v: pb.Verdict) -> int:
    """The verdict's decision, plus DEGRADED_OFFSET when the gateway decided without its store
    (by the tenant's failure policy): such answers must never pass for a sustained rate."""
    return int(v.decision) + (DEGRADED_OFFSET if v.degraded else 0)


class Flow(abc.ABC):
    """One kind of operation of one worker. Each phase, ``begin`` gives it the recorder of the
    phase, ``play`` sends the operations of the phase's schedule, and ``drain`` waits for their
    answers."""

    def __init__(self, name: str, usages_per_op: int, max_in_flight: int) -> None:
        self.name = name
        self.usages_per_op = usages_per_op
        self.max_in_flight = max_in_flight
        self.recorder = FlowRecorder(name, usages_per_op, time.monotonic(), 0.0)

    def begin(self, recorder: FlowRecorder) -> None:
        self.recorder = recorder

    @abc.abstractmethod
    async def play(self, schedule: Schedule, *, start_wall: float, drain_s: float) -> None:
        """Send every arrival of ``schedule`` (whose start is ``start_wall`` on ``time.time()``),
        each recorded against its intended time; return when the last one is sent or dropped.
        ``drain_s`` is the phase's drain, for a flow that drains on its own."""

    @abc.abstractmethod
    async def drain(self, deadline: float) -> None:
        """Wait until every operation is answered or ``deadline`` (monotonic) passes; then
        abandon the rest, counted as incomplete."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class PacedFlow(Flow):
    """A flow paced by the worker's event loop: ``play`` fires each arrival when it is due."""

    async def play(self, schedule: Schedule, *, start_wall: float, drain_s: float) -> None:
        """Fire every arrival of ``schedule`` at (or, if the loop was late, right after) its
        time.

        Arrivals that fell due while the loop was busy are fired at once, each with its own
        intended time, so lateness of the generator is counted in the latency, never hidden.
        """
        total = schedule.total
        i = 0
        while i < total:
            due = schedule.due(time.monotonic())
            while i < due:
                self.fire(schedule.time_of(i))
                i += 1
            if i < total:
                await asyncio.sleep(max(schedule.time_of(i) - time.monotonic(), MIN_SLEEP_S))

    def fire(self, intended: float) -> None:
        """Start one operation meant to be sent at ``intended`` (monotonic seconds)."""
        rec = self.recorder
        rec.scheduled()
        if rec.in_flight >= self.max_in_flight:
            rec.dropped()
            return
        rec.sent()
        self._start(intended, rec)

    async def drain(self, deadline: float) -> None:
        rec = self.recorder
        if rec.in_flight > 0:
            idle = asyncio.Event()
            rec.on_idle = idle.set
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), max(0.0, deadline - time.monotonic()))
            rec.on_idle = None
        if rec.in_flight > 0:
            await self._abandon()

    @abc.abstractmethod
    def _start(self, intended: float, rec: FlowRecorder) -> None: ...

    @abc.abstractmethod
    async def _abandon(self) -> None:
        """Cancel every outstanding operation and count it as incomplete."""


class _TaskFlow(PacedFlow):
    """A flow whose operations are independent tasks (unary calls, Redis batches)."""

    def __init__(self, name: str, usages_per_op: int, max_in_flight: int) -> None:
        super().__init__(name, usages_per_op, max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, op: asyncio.Task[None]) -> None:
        self._tasks.add(op)
        op.add_done_callback(self._tasks.discard)

    async def _abandon(self) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        self.recorder.incomplete(len(tasks))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        await self._abandon()


class CheckFlow(_TaskFlow):
    """Unary Check calls (MODE_ADMIT), round-robin over the worker's channels."""

    def __init__(
        self,
        channels: Sequence[grpc.aio.Channel],
        requests: CheckRequests,
        *,
        timeout_s: float,
        metadata: Metadata,
        max_in_flight: int,
        name: str = "check",
    ) -> None:
        super().__init__(name, 1, max_in_flight)
        self._calls: list[grpc.aio.UnaryUnaryMultiCallable[pb.CheckRequest, pb.CheckResponse]] = [
            ch.unary_unary(
                CHECK_METHOD,
                request_serializer=pb.CheckRequest.SerializeToString,
                response_deserializer=pb.CheckResponse.FromString,
            )
            for ch in channels
        ]
        self._requests = requests
        self._timeout_s = timeout_s
        self._metadata = metadata or None
        self._next = 0

    def _start(self, intended: float, rec: FlowRecorder) -> None:
        call = self._calls[self._next % len(self._calls)]
        self._next += 1
        self._spawn(asyncio.get_running_loop().create_task(self._check(call, intended, rec)))

    async def _check(
        self,
        call: grpc.aio.UnaryUnaryMultiCallable[pb.CheckRequest, pb.CheckResponse],
        intended: float,
        rec: FlowRecorder,
    ) -> None:
        request = self._requests.next()
        try:
            resp = await call(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            rec.failed(time.monotonic(), exc.code().name, exc.details() or "")
            return
        sent = request.usage.request_id
        if resp.verdict.request_id != sent:  # an answer to another call: no decision
            detail = f"sent {sent!r}, answered {resp.verdict.request_id!r}"
            rec.failed(time.monotonic(), REQUEST_ID_MISMATCH, detail)
            return
        rec.answered(intended, time.monotonic(), (outcome(resp.verdict),))


class RlsFlow(_TaskFlow):
    """Unary ``ShouldRateLimit`` calls of Envoy's rate limit service (RLS v3), one descriptor
    each, round-robin over the worker's channels: the ``check`` flow's admits as Envoy asks."""

    def __init__(
        self,
        channels: Sequence[grpc.aio.Channel],
        requests: RlsRequests,
        *,
        timeout_s: float,
        metadata: Metadata,
        max_in_flight: int,
        name: str = "rls",
    ) -> None:
        super().__init__(name, 1, max_in_flight)
        self._calls: list[
            grpc.aio.UnaryUnaryMultiCallable[rls_pb2.RateLimitRequest, rls_pb2.RateLimitResponse]
        ] = [
            ch.unary_unary(
                RLS_METHOD,
                request_serializer=rls_pb2.RateLimitRequest.SerializeToString,
                response_deserializer=rls_pb2.RateLimitResponse.FromString,
            )
            for ch in channels
        ]
        self._requests = requests
        self._timeout_s = timeout_s
        self._metadata = metadata or None
        self._next = 0

    def _start(self, intended: float, rec: FlowRecorder) -> None:
        call = self._calls[self._next % len(self._calls)]
        self._next += 1
        self._spawn(asyncio.get_running_loop().create_task(self._ask(call, intended, rec)))

    async def _ask(
        self,
        call: grpc.aio.UnaryUnaryMultiCallable[rls_pb2.RateLimitRequest, rls_pb2.RateLimitResponse],
        intended: float,
        rec: FlowRecorder,
    ) -> None:
        try:
            resp = await call(
                self._requests.next(), timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            rec.failed(time.monotonic(), exc.code().name, exc.details() or "")
            return
        decision = RLS_OUTCOMES.get(resp.overall_code)
        if decision is None:
            rec.failed(time.monotonic(), RLS_UNKNOWN_CODE, f"overall_code {resp.overall_code}")
            return
        rec.answered(intended, time.monotonic(), (decision,))


class _Session:
    """One StreamUsage call and the messages sent on it that await their answer, in order."""

    def __init__(
        self,
        call: grpc.aio.StreamStreamCall[pb.StreamUsageRequest, pb.StreamUsageResponse],
        batches: StreamBatches,
    ) -> None:
        self.call = call
        self.batches = batches
        self.pending: deque[tuple[float, FlowRecorder]] = deque()
        self.reader: asyncio.Task[None] | None = None

    def fail_pending(self, error: str, detail: str) -> None:
        now = time.monotonic()
        while self.pending:
            _, rec = self.pending.popleft()
            rec.failed(now, error, detail)


class Lane:
    """One long-lived StreamUsage stream of a worker.

    Messages are written in their arrival order by one writer task; the server answers them in
    the same order, so a FIFO of intended send times pairs each answer with its message. If the
    stream fails, the messages awaiting an answer count as errors (with the status code) and the
    next message opens a new stream with a new session id.
    """

    def __init__(
        self,
        multicallable: grpc.aio.StreamStreamMultiCallable[
            pb.StreamUsageRequest, pb.StreamUsageResponse
        ],
        *,
        workload: Workload,
        session_prefix: str,
        batch: int,
        metadata: Metadata,
    ) -> None:
        self._multicallable = multicallable
        self._workload = workload
        self._session_prefix = session_prefix
        self._batch = batch
        self._metadata = metadata or None
        self._sessions = 0
        self._session: _Session | None = None
        self._outbox: deque[tuple[float, FlowRecorder]] = deque()
        self._wake = asyncio.Event()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    def open(self) -> _Session:
        """The current stream, opened (with a new session id) if there is none."""
        if self._session is None:
            self._sessions += 1
            batches = StreamBatches(
                self._workload, f"{self._session_prefix}-{self._sessions}", self._batch
            )
            call = self._multicallable(None, metadata=self._metadata)
            session = _Session(call, batches)
            session.reader = asyncio.get_running_loop().create_task(self._read_loop(session))
            self._session = session
        return self._session

    def send(self, intended: float, rec: FlowRecorder) -> None:
        self._outbox.append((intended, rec))
        self._wake.set()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                intended, rec = self._outbox.popleft()
                session = self.open()
                session.pending.append((intended, rec))
                try:
                    await session.call.write(session.batches.next())
                except grpc.aio.AioRpcError as exc:
                    self._close_session(session, exc.code().name, exc.details() or "")
                except (asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
                    self._close_session(session, "STREAM_CLOSED", str(exc))

    async def _read_loop(self, session: _Session) -> None:
        error, detail = "STREAM_CLOSED", "the server ended the stream with messages unanswered"
        try:
            while True:
                resp = await session.call.read()
                if not isinstance(resp, pb.StreamUsageResponse):  # grpc.aio.EOF
                    break
                if not session.pending:
                    error, detail = "UNEXPECTED_RESPONSE", "an answer to no message"
                    break
                intended, rec = session.pending.popleft()
                rec.answered(intended, time.monotonic(), [outcome(v) for v in resp.verdicts])
        except grpc.aio.AioRpcError as exc:
            error, detail = exc.code().name, exc.details() or ""
        self._close_session(session, error, detail)

    def _close_session(self, session: _Session, error: str, detail: str) -> None:
        session.fail_pending(error, detail)
        if self._session is session:
            self._session = None
            session.call.cancel()

    def abandon(self) -> int:
        """Drop every unanswered message (returns how many) and cancel the stream."""
        n = len(self._outbox)
        self._outbox.clear()
        session = self._session
        if session is not None:
            n += len(session.pending)
            session.pending.clear()
            self._session = None
            session.call.cancel()
        return n

    async def close(self) -> None:
        """Half-close the stream, give the server a moment to answer, then cancel it."""
        self._writer.cancel()
        session = self._session
        self._session = None
        if session is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await session.call.done_writing()
            if session.reader is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(session.reader), 2.0)
            session.call.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)


class StreamFlow(PacedFlow):
    """StreamUsage messages of ``batch`` usages (MODE_REPORT), round-robin over the worker's
    lanes (streams), which are spread over its channels."""

    def __init__(
        self,
        channels: Sequence[grpc.aio.Channel],
        *,
        lanes: int,
        workload: Workload,
        batch: int,
        session_prefix: str,
        metadata: Metadata,
        max_in_flight: int,
        name: str = "stream",
    ) -> None:
        super().__init__(name, batch, max_in_flight)
        if lanes < 1:
            raise ValueError("a stream flow needs at least one stream")
        self._lanes = [
            Lane(
                channels[i % len(channels)].stream_stream(
                    STREAM_METHOD,
                    request_serializer=pb.StreamUsageRequest.SerializeToString,
                    response_deserializer=pb.StreamUsageResponse.FromString,
                ),
                workload=workload,
                session_prefix=f"{session_prefix}-s{i}",
                batch=batch,
                metadata=metadata,
            )
            for i in range(lanes)
        ]
        for lane in self._lanes:
            lane.open()
        self._next = 0

    def _start(self, intended: float, rec: FlowRecorder) -> None:
        lane = self._lanes[self._next % len(self._lanes)]
        self._next += 1
        lane.send(intended, rec)

    async def _abandon(self) -> None:
        self.recorder.incomplete(sum(lane.abandon() for lane in self._lanes))
        for lane in self._lanes:
            lane.open()

    async def close(self) -> None:
        await asyncio.gather(*(lane.close() for lane in self._lanes))


class RedisBatchFlow(_TaskFlow):
    """Batch decisions run directly against Redis (the Redis ceiling): each operation is one
    call of a :class:`~loadtest.ceiling_redis.BatchDecision` with ``batch`` usages."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        decide: BatchDecision,
        *,
        batch: int,
        max_in_flight: int,
        name: str,
    ) -> None:
        super().__init__(name, batch, max_in_flight)
        self._client = client
        self._decide = decide

    def _start(self, intended: float, rec: FlowRecorder) -> None:
        self._spawn(asyncio.get_running_loop().create_task(self._batch(intended, rec)))

    async def _batch(self, intended: float, rec: FlowRecorder) -> None:
        try:
            decisions = await self._decide(self._client, self.usages_per_op)
        except Exception as exc:  # any failure of the batch is an error of the run, by type
            rec.failed(time.monotonic(), type(exc).__name__, str(exc))
            return
        rec.answered(intended, time.monotonic(), decisions)
