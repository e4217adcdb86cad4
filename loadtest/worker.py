"""A worker process: its own event loop (uvloop), its own channels, its share of the arrivals.

The parent sends :class:`Phase` commands on a pipe; the worker plays every flow on the phase's
schedule (paced by its event loop, or by the Go generator for ``generator="go"`` check flows),
sends :class:`Progress` a few times a second, and at the end of the phase (after the
drain) sends its :class:`~loadtest.stats.FlowStats` in a :class:`PhaseDone`. Every message to the
parent goes through one multiprocessing queue shared by the workers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from typing import Literal

import grpc
import redis.asyncio
import uvloop

from loadtest import ceiling_redis
from loadtest.credentials import PLAINTEXT, ClientCredentials
from loadtest.drivers import CheckFlow, Flow, Metadata, RedisBatchFlow, RlsFlow, StreamFlow
from loadtest.gogen import GoCheckFlow, GoGeneratorError
from loadtest.schedule import Schedule
from loadtest.stats import FlowRecorder, FlowStats
from loadtest.workload import CheckRequests, RlsRequests, Workload

PROGRESS_INTERVAL_S = 0.25


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """One flow of the scenario. ``share`` is its part of the offered usage rate; an operation
    carries ``batch`` usages; ``streams`` (stream flows) is the number of streams, all workers
    together. ``generator`` sends a gRPC check flow's calls: this process (python) or the
    native generator (go, :mod:`loadtest.gogen`)."""

    name: str
    kind: Literal["check", "stream", "rls"]
    share: float
    batch: int = 1
    streams: int = 0
    generator: Literal["python", "go"] = "python"


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """What the workers load: a gRPC MeteringService, or Redis itself (the Redis ceiling).
    ``credentials`` (TLS, API key) apply to a gRPC target only."""

    kind: Literal["grpc", "redis"]
    address: str
    connections: int
    timeout_s: float = 5.0
    metadata: Metadata = ()
    credentials: ClientCredentials = PLAINTEXT

    def call_metadata(self) -> Metadata:
        """What every call carries: ``metadata``, and the API key if there is one."""
        return self.credentials.call_metadata(self.metadata)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    target: TargetSpec
    flows: tuple[FlowSpec, ...]
    workload: Workload
    run_id: str
    max_in_flight: int


@dataclass(frozen=True, slots=True)
class Phase:
    """Run every flow at ``rate`` usages per second (all workers together) for ``duration``
    seconds from ``start_wall`` (``time.time()``); then wait up to ``drain_s`` for answers."""

    index: int
    rate: float
    duration: float
    start_wall: float
    drain_s: float


@dataclass(frozen=True, slots=True)
class Ready:
    worker: int


@dataclass(frozen=True, slots=True)
class Progress:
    worker: int
    phase: int
    sent_ops: int
    answered_usages: int
    error_ops: int


@dataclass(frozen=True, slots=True)
class PhaseDone:
    worker: int
    phase: int
    flows: list[FlowStats]


@dataclass(frozen=True, slots=True)
class Failed:
    worker: int
    error: str


def lanes_of(worker: int, workers: int, streams: int) -> int:
    """Streams that worker ``worker`` of ``workers`` opens, of ``streams`` in all."""
    return streams // workers + (1 if worker < streams % workers else 0)


def main(
    spec: WorkerSpec,
    worker: int,
    workers: int,
    commands: Connection,
    events: Queue[Ready | Progress | PhaseDone | Failed],
) -> None:
    """Entry point of a worker process."""
    # Ctrl-C is the parent's to handle: it stops the workers through their pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        uvloop.run(_serve(spec, worker, workers, commands, events))
    except (ConnectionError, GoGeneratorError) as exc:
        events.put(Failed(worker, f"{type(exc).__name__}: {exc}"))
    except BaseException:
        events.put(Failed(worker, traceback.format_exc()))
        raise


async def _serve(
    spec: WorkerSpec,
    worker: int,
    workers: int,
    commands: Connection,
    events: Queue[Ready | Progress | PhaseDone | Failed],
) -> None:
    prefix = f"lt-{spec.run_id}-w{worker}-{os.getpid()}"
    channels: list[grpc.aio.Channel] = []
    client: redis.asyncio.Redis | None = None
    flows: list[tuple[FlowSpec, Flow]] = []
    try:
        if spec.target.kind == "grpc":
            # The Go generator opens its own connections.
            if any(fs.kind != "check" or fs.generator == "python" for fs in spec.flows):
                channels = await _open_channels(spec.target)
        else:
            client = _redis_client(spec.target)
            await client.ping()
        for fs in spec.flows:
            if client is None:
                flow = await _grpc_flow(spec, fs, channels, worker, workers, prefix)
            else:
                flow = await _redis_flow(spec, fs, client, prefix)
            flows.append((fs, flow))
        events.put(Ready(worker))
        loop = asyncio.get_running_loop()
        while True:
            command: Phase | None = await loop.run_in_executor(None, commands.recv)
            if command is None:
                break
            stats = await _run_phase(command, flows, worker, workers, events)
            events.put(PhaseDone(worker, command.index, stats))
    finally:
        for _, flow in flows:
            await flow.close()
        for ch in channels:
            await ch.close(None)
        if client is not None:
            await client.aclose()


async def _open_channels(target: TargetSpec) -> list[grpc.aio.Channel]:
    # A local subchannel pool gives each channel its own TCP connection; by default, channels
    # with the same target and options share one.
    options = [("grpc.use_local_subchannel_pool", 1)]
    tls = target.credentials.channel_credentials()
    channels = [
        grpc.aio.insecure_channel(target.address, options=options)
        if tls is None
        else grpc.aio.secure_channel(target.address, tls, options=options)
        for _ in range(target.connections)
    ]
    try:
        await asyncio.wait_for(
            asyncio.gather(*(ch.channel_ready() for ch in channels)), timeout=10.0
        )
    except TimeoutError:
        over = " over TLS (is it a TLS server, with a certificate --tls-ca trusts?)" if tls else ""
        raise ConnectionError(f"no gRPC server answers at {target.address}{over}") from None
    return channels


def _redis_client(target: TargetSpec) -> redis.asyncio.Redis:
    host, _, port = target.address.rpartition(":")
    # The ceiling keeps Redis busy, not the client: many batches in flight, each on its own
    # connection (a pipeline is one round trip on one connection).
    pool = redis.asyncio.BlockingConnectionPool(
        host=host,
        port=int(port),
        max_connections=max(8, 4 * target.connections),
        decode_responses=True,  # as the gateway's store
    )
    return redis.asyncio.Redis(connection_pool=pool)


async def _redis_flow(
    spec: WorkerSpec, fs: FlowSpec, client: redis.asyncio.Redis, prefix: str
) -> Flow:
    mode: ceiling_redis.Mode = "report" if fs.kind == "stream" else "admit"
    decide = await ceiling_redis.prepare(client, spec.workload, mode, f"{prefix}-{fs.name}")
    return RedisBatchFlow(
        client, decide, batch=fs.batch, max_in_flight=spec.max_in_flight, name=fs.name
    )


async def _grpc_flow(
    spec: WorkerSpec,
    fs: FlowSpec,
    channels: list[grpc.aio.Channel],
    worker: int,
    workers: int,
    prefix: str,
) -> Flow:
    if fs.kind == "check" and fs.generator == "go":
        return await GoCheckFlow.start(
            spec.target.address,
            connections=spec.target.connections,
            workload=spec.workload,
            id_prefix=f"{prefix}-{fs.name}",
            timeout_s=spec.target.timeout_s,
            metadata=spec.target.call_metadata(),
            max_in_flight=spec.max_in_flight,
            name=fs.name,
            credentials=spec.target.credentials,
        )
    if fs.kind == "check":
        return CheckFlow(
            channels,
            CheckRequests(spec.workload, f"{prefix}-{fs.name}"),
            timeout_s=spec.target.timeout_s,
            metadata=spec.target.call_metadata(),
            max_in_flight=spec.max_in_flight,
            name=fs.name,
        )
    if fs.kind == "rls":
        return RlsFlow(
            channels,
            RlsRequests(spec.workload),
            timeout_s=spec.target.timeout_s,
            metadata=spec.target.call_metadata(),
            max_in_flight=spec.max_in_flight,
            name=fs.name,
        )
    return StreamFlow(
        channels,
        lanes=lanes_of(worker, workers, fs.streams),
        workload=spec.workload,
        batch=fs.batch,
        session_prefix=f"{prefix}-{fs.name}",
        metadata=spec.target.call_metadata(),
        max_in_flight=spec.max_in_flight,
        name=fs.name,
    )


async def _run_phase(
    phase: Phase,
    flows: list[tuple[FlowSpec, Flow]],
    worker: int,
    workers: int,
    events: Queue[Ready | Progress | PhaseDone | Failed],
) -> list[FlowStats]:
    # Workers share the parent's wall-clock start; each converts it to its monotonic clock.
    start = time.monotonic() + (phase.start_wall - time.time())
    plays = []
    for fs, flow in flows:
        flow.begin(FlowRecorder(fs.name, fs.batch, start, phase.duration))
        op_rate = phase.rate * fs.share / fs.batch
        if op_rate > 0 and phase.duration > 0:
            schedule = Schedule(start, op_rate, phase.duration, worker, workers)
            plays.append(flow.play(schedule, start_wall=phase.start_wall, drain_s=phase.drain_s))
    reporter = asyncio.get_running_loop().create_task(
        _report_progress(phase.index, [f for _, f in flows], worker, events)
    )
    try:
        await asyncio.gather(*plays)
        deadline = time.monotonic() + phase.drain_s
        await asyncio.gather(*(flow.drain(deadline) for _, flow in flows))
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
    _put_progress(phase.index, [f for _, f in flows], worker, events)
    return [flow.recorder.snapshot() for _, flow in flows]


async def _report_progress(
    phase: int,
    flows: list[Flow],
    worker: int,
    events: Queue[Ready | Progress | PhaseDone | Failed],
) -> None:
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL_S)
        _put_progress(phase, flows, worker, events)


def _put_progress(
    phase: int,
    flows: list[Flow],
    worker: int,
    events: Queue[Ready | Progress | PhaseDone | Failed],
) -> None:
    tallies = [f.recorder.tally for f in flows]
    events.put(
        Progress(
            worker,
            phase,
            sent_ops=sum(t.sent_ops for t in tallies),
            answered_usages=sum(t.ok_usages for t in tallies),
            error_ops=sum(t.error_ops for t in tallies),
        )
    )
