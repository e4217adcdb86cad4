"""The Go generator (clients/go/bin/chargepath-loadgen, built by `make clients`) against the echo
server: it keeps the open-loop schedule exactly as loadtest/schedule.py defines it, drops what
is beyond max-in-flight, and sends the very requests the Python generator sends. No timed
assertion: counts only."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from chargepath_protos.v1 import metering_pb2 as pb
from loadtest import gogen, processes
from loadtest.drivers import REQUEST_ID_MISMATCH, CheckFlow
from loadtest.echo import EchoService
from loadtest.schedule import Schedule
from loadtest.stats import FlowRecorder, Tally
from loadtest.workload import CheckRequests, Workload, load_workload
from tests.e2e.conftest import DEMO_PLANS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[str, int]]:
    try:
        gogen.require_binary()
    except gogen.GoGeneratorError as exc:
        pytest.fail(str(exc))
    with processes.echo_server() as (address, pid):
        yield address, pid


def _workload(**kwargs: Any) -> Workload:
    return load_workload(DEMO_PLANS, spread=kwargs.pop("spread", "many"), **kwargs)


async def _start(address: str, prefix: str, **kwargs: Any) -> gogen.GoCheckFlow:
    options: dict[str, Any] = {
        "connections": 2,
        "workload": _workload(),
        "timeout_s": 30.0,
        "metadata": (),
        "max_in_flight": 10_000,
    }
    options.update(kwargs)
    return await gogen.GoCheckFlow.start(address, id_prefix=prefix, **options)


async def _phase(
    flows: list[gogen.GoCheckFlow],
    rate: float,
    duration: float,
    drain_s: float,
) -> list[tuple[Schedule, Tally]]:
    """One phase on every flow (flow w is worker w of len(flows)), as a worker process runs it."""
    start_wall = time.time() + 0.3
    start = time.monotonic() + (start_wall - time.time())
    schedules = [Schedule(start, rate, duration, w, len(flows)) for w in range(len(flows))]
    for flow in flows:
        flow.begin(FlowRecorder(flow.name, 1, start, duration))
    await asyncio.gather(
        *(
            f.play(s, start_wall=start_wall, drain_s=drain_s)
            for f, s in zip(flows, schedules, strict=True)
        )
    )
    deadline = time.monotonic() + drain_s
    await asyncio.gather(*(f.drain(deadline) for f in flows))
    return [(s, f.recorder.snapshot().tally) for f, s in zip(flows, schedules, strict=True)]


async def test_the_go_generator_keeps_the_schedule(echo: tuple[str, int]) -> None:
    flows = [await _start(echo[0], f"sched-{w}") for w in range(3)]
    try:
        # Two phases on the same processes and connections, as a warm-up and a run (or the
        # steps of a search); 3 workers and a rate that does not divide evenly.
        for rate, duration in ((101.0, 1.0), (157.0, 0.7)):
            results = await _phase(flows, rate, duration, drain_s=10.0)
            assert sum(s.total for s, _ in results) == results[0][0].flow_total
            for schedule, tally in results:
                assert tally.scheduled_ops == schedule.total > 0
                assert (
                    tally.ok_ops + tally.dropped_ops + tally.incomplete_ops + tally.error_ops
                    == tally.scheduled_ops
                )
                assert tally.error_ops == tally.dropped_ops == tally.incomplete_ops == 0
                assert tally.decisions == {"ALLOW": schedule.total}
    finally:
        for flow in flows:
            await flow.close()


async def test_the_go_generator_drops_beyond_max_in_flight(echo: tuple[str, int]) -> None:
    """With the echo server stopped (SIGSTOP) nothing is answered: the first max-in-flight
    arrivals are sent, the rest dropped, and the sent ones are incomplete after the drain."""
    address, pid = echo
    flow = await _start(address, "drops", max_in_flight=3)
    os.kill(pid, signal.SIGSTOP)
    try:
        ((schedule, tally),) = await _phase([flow], 40.0, 1.0, drain_s=0.2)
    finally:
        os.kill(pid, signal.SIGCONT)
        await flow.close()
    assert tally.scheduled_ops == schedule.total == 40
    assert tally.sent_ops == tally.incomplete_ops == 3
    assert tally.dropped_ops == 37
    assert tally.ok_ops == tally.error_ops == 0


class _RecordingEcho(EchoService):
    """The echo service, keeping every Check request and its metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[pb.CheckRequest] = []
        self.metadata: list[tuple[tuple[str, str], ...]] = []

    async def check(
        self,
        request: pb.CheckRequest,
        context: grpc.aio.ServicerContext[pb.CheckRequest, pb.CheckResponse],
    ) -> pb.CheckResponse:
        self.requests.append(request)
        md = context.invocation_metadata() or ()
        self.metadata.append(tuple((k, v) for k, v in md if k.startswith("x-lt-")))
        return await super().check(request, context)


@pytest.mark.parametrize("spread", ["many", "hot"])
async def test_the_go_generator_sends_what_the_python_one_sends(
    echo: tuple[str, int], spread: str
) -> None:
    service = _RecordingEcho()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([service.handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    workload = _workload(spread=spread, keys=7, check_amount=2, view="basic")
    metadata = (("x-lt-other", "1"), ("x-lt-token", "a b&c=d%20+"))
    try:
        flow = await _start(
            f"127.0.0.1:{port}", "lt-same", workload=workload, metadata=metadata, connections=1
        )
        try:
            for _ in range(2):  # request ids count on across phases
                ((_, tally),) = await _phase([flow], 50.0, 0.2, drain_s=10.0)
                assert tally.ok_ops == 10
        finally:
            await flow.close()
    finally:
        await server.stop(None)
    python = CheckRequests(workload, "lt-same")
    expected = [python.next() for _ in range(20)]
    got = sorted(service.requests, key=lambda r: int(r.usage.request_id.rpartition("-")[2]))
    assert got == expected
    assert {tuple(sorted(md)) for md in service.metadata} == {metadata}


class _WrongIdEcho(EchoService):
    """An echo that answers every Check with the verdict of another request."""

    async def check(
        self,
        request: pb.CheckRequest,
        context: grpc.aio.ServicerContext[pb.CheckRequest, pb.CheckResponse],
    ) -> pb.CheckResponse:
        resp = await super().check(request, context)
        resp.verdict.request_id = "someone-else"
        return resp


async def test_an_answer_to_another_request_is_an_error_for_both_generators() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([_WrongIdEcho().handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        go = await _start(address, "wrong-go", connections=1)
        python = CheckFlow(
            [channel],
            CheckRequests(_workload(), "wrong-py"),
            timeout_s=10.0,
            metadata=(),
            max_in_flight=100,
        )
        try:
            ((_, tally),) = await _phase([go], 20.0, 0.5, drain_s=10.0)
            start = time.monotonic() + 0.05
            python.begin(FlowRecorder("check", 1, start, 0.5))
            await python.play(Schedule(start, 20.0, 0.5), start_wall=time.time(), drain_s=10.0)
            await python.drain(time.monotonic() + 10.0)
            py_tally = python.recorder.snapshot().tally
        finally:
            await go.close()
            await python.close()
    finally:
        await channel.close()
        await server.stop(None)
    for t in (tally, py_tally):
        assert t.ok_ops == 0 and t.decisions == {}
        assert t.error_ops == t.scheduled_ops == 10
        assert t.errors == {REQUEST_ID_MISMATCH: 10}


async def test_a_call_past_its_deadline_is_a_deadline_exceeded_error(
    echo: tuple[str, int],
) -> None:
    """With the echo server stopped (SIGSTOP) and a 0.2 s deadline per call, every call sent
    fails with DEADLINE_EXCEEDED, none is left incomplete."""
    address, pid = echo
    flow = await _start(address, "deadline", timeout_s=0.2)
    os.kill(pid, signal.SIGSTOP)
    try:
        ((schedule, tally),) = await _phase([flow], 20.0, 0.5, drain_s=5.0)
    finally:
        os.kill(pid, signal.SIGCONT)
        await flow.close()
    assert tally.scheduled_ops == schedule.total == 10
    assert tally.error_ops == 10 and tally.errors == {"DEADLINE_EXCEEDED": 10}
    assert tally.ok_ops == tally.dropped_ops == tally.incomplete_ops == 0
