"""Bounded gateway memory on a live gateway (issue #12, item 7): streams whose client writes and
never reads, caps on open streams per process and per credential, and the embedded Redis'
maxmemory with its gauges.

The 2,000-stream test runs for CHARGEPATH_STREAMS_S seconds of writing (default 15; the issue's
run was 40) and asserts the README's bound on the gateway's RSS:
``CHARGEPATH_STREAMS_S=40 .venv/bin/python -m pytest -s tests/e2e/test_memory_bounds.py``."""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import grpc
import pytest
import redis

from chargepath.store.embedded import free_port
from chargepath_protos.v1 import keys_pb2 as kpb
from chargepath_protos.v1 import keys_pb2_grpc as kpb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.e2e.conftest import GatewayProcess, start_gateway

pytestmark = pytest.mark.e2e

STREAMS = 2000
CONNECTIONS = 20
USAGES_PER_MESSAGE = 10
WRITE_S = float(os.environ.get("CHARGEPATH_STREAMS_S", "15"))
#: README "Bounded memory": a gateway process's RSS with open streams whose clients never
#: read stays under 150 MB + 100 KB per stream (messages of 10 usages).
RSS_BASE, RSS_PER_STREAM = 150 * 2**20, 100 * 2**10


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def message(n: int = USAGES_PER_MESSAGE) -> pb.StreamUsageRequest:
    return pb.StreamUsageRequest(
        usages=[
            pb.Usage(
                request_id=uuid.uuid4().hex,
                subject=pb.Subject(tenant="mvno-demo", slice="1-000001"),
                metric="slice.bytes",
                amount=1,
                mode=pb.MODE_REPORT,
            )
            for _ in range(n)
        ]
    )


def metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> GatewayProcess:
    """A gateway whose operator may hold the 2,000 streams (its default per credential is
    1,024), with a store timeout that a 2-core test machine keeps."""
    gw = start_gateway(
        tmp_path_factory.mktemp("roomy"),
        extra_args=("--max-streams-per-credential", "4096", "--store-timeout-ms", "2000"),
    )
    yield gw  # type: ignore[misc]
    gw.stop()
    if gw.redis is not None:
        gw.redis.stop()


async def _write_never_read(
    gw: GatewayProcess, streams: int, seconds: float, samples: list[int], ended: list[str]
) -> int:
    """Open ``streams`` streams that write messages for ``seconds`` and never read; sample the
    gateway's RSS every second. Returns the messages the clients could write; ``ended`` gets
    the status of each stream that ended before the time was up."""
    channels = [grpc.aio.insecure_channel(gw.address) for _ in range(CONNECTIONS)]
    deadline = time.monotonic() + seconds
    written = 0

    async def stream(i: int) -> grpc.aio.StreamStreamCall:
        nonlocal written
        stub = pb_grpc.MeteringServiceStub(channels[i % CONNECTIONS])
        call = stub.StreamUsage(metadata=gw.metadata)
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(call.write(message()), left)
            except TimeoutError:
                break  # the gateway stopped reading this stream: flow control
            except grpc.aio.AioRpcError as exc:
                ended.append(exc.code().name)
                break
            written += 1
        return call

    tasks = [asyncio.ensure_future(stream(i)) for i in range(streams)]
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        samples.append(rss(gw.process.pid))
    calls = await asyncio.gather(*tasks)
    samples.append(rss(gw.process.pid))
    for call in calls:
        call.cancel()
    for ch in channels:
        await ch.close()
    return written


async def test_a_stream_that_never_reads_is_no_longer_read_once_its_windows_are_full(
    roomy: GatewayProcess,
) -> None:
    progress: list[int] = []
    channel = grpc.aio.insecure_channel(roomy.address)
    call = pb_grpc.MeteringServiceStub(channel).StreamUsage(metadata=roomy.metadata)
    written = 0

    async def write() -> None:
        nonlocal written
        while True:
            await call.write(message(100))
            written += 1

    writer = asyncio.ensure_future(write())
    for _ in range(12):
        await asyncio.sleep(1.0)
        progress.append(written)
    writer.cancel()
    call.cancel()
    await channel.close()
    # the client's writes stopped: the gateway stopped reading it (its responses wait for
    # the client's HTTP/2 window), a bounded number of messages in
    assert progress[-1] == progress[-5] > 0, progress
    print(
        f"\na stream that never reads: the gateway stopped reading it after {progress[-1]} "
        "messages of 100 usages"
    )


async def test_two_thousand_streams_that_never_read_hold_bounded_memory(
    roomy: GatewayProcess,
) -> None:
    samples: list[int] = []
    ended: list[str] = []
    start = rss(roomy.process.pid)
    written = await _write_never_read(roomy, STREAMS, WRITE_S, samples, ended)
    bound = RSS_BASE + RSS_PER_STREAM * STREAMS
    peak = max(samples)
    print(
        f"\n{STREAMS} streams that never read, {WRITE_S:.0f} s, {written:,} messages of "
        f"{USAGES_PER_MESSAGE} usages written: gateway RSS {start / 2**20:.0f} MB -> peak "
        f"{peak / 2**20:.0f} MB, last {samples[-1] / 2**20:.0f} MB (bound {bound / 2**20:.0f} "
        f"MB); streams ended early: {Counter(ended)}"
    )
    assert peak <= bound, [s // 2**20 for s in samples]
    # Streams that end early (INTERNAL in this one client process's transport, mostly past
    # 30 s of a run) are printed, not asserted: the bound is on the gateway.
    # The gateway still serves. Asked on a connection of its own (a local subchannel pool):
    # right after this process closed the streams' 20 channels, a Check on a new channel to
    # the same address was answered CANCELLED in two CI runs that we know of (once through
    # the sync API, once through grpc.aio; CI kept no gateway log, and a local run's had
    # nothing about streams or calls). A channel that shares the global pool may be handed a
    # connection being torn down (a guess, not confirmed). If a Check is still refused, the
    # next one, on a fresh connection, must be answered: a gateway that no longer serves
    # fails all three.
    refused: list[str] = []
    for _ in range(3):
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(roomy.address, options=options) as ch:
            try:
                v = await pb_grpc.MeteringServiceStub(ch).Check(
                    pb.CheckRequest(usage=message(1).usages[0]), metadata=roomy.metadata, timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                refused.append(exc.code().name)
                continue
        break
    else:
        raise AssertionError(f"the gateway no longer serves: {refused}\n{roomy.log()[-3000:]}")
    print(f"Checks refused before one was answered: {refused}")
    assert v.verdict.recorded


def test_streams_past_the_process_or_credential_cap_are_resource_exhausted(
    tmp_path: Path,
) -> None:
    gw = start_gateway(
        tmp_path, extra_args=("--max-streams", "3", "--max-streams-per-credential", "2")
    )
    try:
        with gw.channel() as ch:
            created = kpb_grpc.KeyServiceStub(ch).CreateKey(
                kpb.CreateKeyRequest(tenant="mvno-demo", role=kpb.ROLE_METER), timeout=5
            )
        meter = created.secret_key
        operator = gw.operator_key
        holders = []

        def hold(key: str) -> grpc.RpcError | None:
            ch = gw.raw_channel()
            gate = _Gate()
            call = pb_grpc.MeteringServiceStub(ch).StreamUsage(gate, metadata=metadata(key))
            holders.append((ch, call, gate))
            try:
                next(call)  # the answer to the gate's first message: the stream is open
            except grpc.RpcError as exc:
                return exc
            return None

        assert hold(operator) is None and hold(operator) is None
        third = hold(operator)
        assert third is not None and third.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this credential has 2 streams open" in third.details()
        assert hold(meter) is None  # another credential: the process's third stream
        fourth = hold(meter)
        assert fourth is not None and fourth.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "serves at most 3 streams" in fourth.details()
        # a stream that ends gives its place back
        ch, call, gate = holders[0]
        gate.close()
        list(call)
        assert hold(operator) is None
        for ch, _, gate in holders:
            gate.close()
            ch.close()
        assert "chargepath.streams.refused" not in gw.log()  # counted, not logged
    finally:
        gw.stop()
        if gw.redis is not None:
            gw.redis.stop()


class _Gate:
    """A request iterator for a sync stream: one message, then nothing until closed."""

    def __init__(self) -> None:
        self._sent = False
        self._closed = False

    def __iter__(self) -> _Gate:
        return self

    def __next__(self) -> pb.StreamUsageRequest:
        if not self._sent:
            self._sent = True
            return message(1)
        while not self._closed:
            time.sleep(0.02)
        raise StopIteration

    def close(self) -> None:
        self._closed = True


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        m = re.match(
            r"(chargepath_redis_memory_\w+|chargepath_streams_refused_total)\S* (\S+)$", line
        )
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_the_embedded_redis_has_maxmemory_noeviction_and_the_gauges_say_how_close(
    tmp_path: Path,
) -> None:
    port = free_port()
    gw = start_gateway(
        tmp_path,
        embedded=True,
        extra_args=("--redis-maxmemory", "64mb", "--metrics-port", str(port)),
        env={"CHARGEPATH_REDIS_MEMORY_INTERVAL_MS": "200"},
    )
    try:
        client = redis.Redis.from_url(
            (tmp_path / "data" / "redis" / "url").read_text().strip(), decode_responses=True
        )
        assert client.config_get("maxmemory") == {"maxmemory": str(64 * 2**20)}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        used = int(client.info("memory")["used_memory"])
        client.close()
        deadline = time.monotonic() + 10
        got: dict[str, float] = {}
        while time.monotonic() < deadline:
            got = scrape(port)
            if "chargepath_redis_memory_utilization" in got:
                break
            time.sleep(0.2)
        assert got["chargepath_redis_memory_limit_bytes"] == 64 * 2**20
        assert 0.5 * used < got["chargepath_redis_memory_used_bytes"] < 2 * used
        ratio = got["chargepath_redis_memory_utilization"]
        assert ratio == pytest.approx(got["chargepath_redis_memory_used_bytes"] / 2**26)
        assert got["chargepath_streams_refused_total"] == 0
        assert "maxmemory 64mb, noeviction" in gw.log()
    finally:
        gw.stop()
