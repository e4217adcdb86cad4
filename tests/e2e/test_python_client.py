"""The Python client against a live gateway (the `gateway` fixture, demo policy).

Connection failures are real: a TCP proxy in this file forwards to the gateway and can hold
back the gateway's answers and cut every connection, and a "blackhole" server accepts
connections and never answers. What counts as proof is the tenant's ledger in Redis (the
stream `cp:{<tenant>}:ledger`, one entry per recorded usage, field `rid` = request id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import pytest
import redis

from chargepath_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    Decision,
    InvalidUsage,
    LimitKind,
    Reason,
    RetryPolicy,
    Scope,
    StreamClosed,
    Unavailable,
    Verdict,
)
from tests.conftest import ledger_entries

pytestmark = pytest.mark.e2e

CPAAS = "cpaas-demo"
SMS = "api.sms.send"
MVNO = "mvno-demo"
BYTES = "slice.bytes"
EMBB = "1-000001"


# -- network helpers -----------------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to `upstream`.

    `hold_answers = True` drops every byte the gateway sends on the connections open now (the
    gateway still receives and decides the requests); `cut()` resets every connection. New
    connections are always healthy, so a client that reconnects gets through.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.hold_answers = False
        self.connections = 0

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    def cut(self) -> None:
        """Reset every open connection, and stop holding answers (for the next ones)."""
        self.hold_answers = False
        for client, upstream in list(self._links):
            client.transport.abort()
            upstream.transport.abort()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            self._tasks.discard(task)
            return
        self.connections += 1
        link = (writer, up_writer)
        self._links.add(link)
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer, answers=False)),
            asyncio.create_task(self._pipe(up_reader, writer, answers=True)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._links.discard(link)
            writer.transport.abort()
            up_writer.transport.abort()
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, answers: bool
    ) -> None:
        held = False
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                # Once a connection starts dropping answers it never resumes: the HTTP/2
                # framing is broken from then on, as on a real half-dead connection.
                held = held or (answers and self.hold_answers)
                if held:
                    continue
                writer.write(data)
                await writer.drain()


class Blackhole:
    """Accepts TCP connections, reads whatever comes, and never answers."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._swallow, "127.0.0.1", 0)

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(65536):
                pass
        writer.transport.abort()
        self._writers.discard(writer)
        self._tasks.discard(task)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await asyncio.sleep(0)  # let connections accepted just now reach their handler
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


@pytest.fixture
async def proxy(gateway: Any) -> AsyncIterator[TcpProxy]:
    p = TcpProxy(gateway.address)
    await p.start()
    yield p
    await p.close()


@pytest.fixture
async def blackhole() -> AsyncIterator[Blackhole]:
    b = Blackhole()
    await b.start()
    yield b
    await b.close()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- ledger helpers ------------------------------------------------------------------------


def ledger_count(redis_client: redis.Redis, tenant: str, rids: Iterable[str]) -> Counter[str]:
    """How many ledger entries each of `rids` has (0 included)."""
    wanted = set(rids)
    counts = Counter({rid: 0 for rid in wanted})
    for entry in ledger_entries(redis_client, tenant):
        if entry.request_id in wanted:
            counts[entry.request_id] += 1
    return counts


async def wait_recorded(
    redis_client: redis.Redis, tenant: str, rids: Iterable[str], within: float = 5.0
) -> None:
    """Wait until every one of `rids` is in the ledger (the gateway has decided them)."""
    rids = list(rids)
    end = time.monotonic() + within
    while min(ledger_count(redis_client, tenant, rids).values()) == 0:
        assert time.monotonic() < end, "the gateway did not record the usages in time"
        await asyncio.sleep(0.02)


def new_rids(n: int, prefix: str) -> list[str]:
    return [f"{prefix}-{uuid.uuid4()}" for _ in range(n)]


# -- happy paths ---------------------------------------------------------------------------


async def test_check_admits_and_records(gateway: Any, redis_client: redis.Redis) -> None:
    key = f"key-{uuid.uuid4().hex[:8]}"
    async with AsyncClient(gateway.address, api_key=gateway.operator_key) as client:
        verdict = await client.check(CPAAS, SMS, 1, key=key, labels={"country": "SE"})
    assert isinstance(verdict, Verdict)
    assert verdict.decision is Decision.ALLOW and verdict.allowed
    assert verdict.reason is Reason.OK
    assert verdict.recorded and not verdict.replayed and not verdict.degraded
    assert verdict.policy_version >= 1
    assert re.fullmatch(r"[0-9a-f]{32}", verdict.decision_id)
    assert uuid.UUID(verdict.request_id)  # generated by the client
    assert verdict.raw.request_id == verdict.request_id
    per_key = {limit.name: limit for limit in verdict.limits}["sms-per-key"]
    assert (per_key.kind, per_key.scope, per_key.capacity) == (LimitKind.RATE, Scope.KEY, 20)
    assert per_key.remaining == 19
    [entry] = [e for e in ledger_entries(redis_client, CPAAS) if e.request_id == verdict.request_id]
    assert entry.decision_id == verdict.decision_id


async def test_report_is_recorded_with_the_given_request_id(
    gateway: Any, redis_client: redis.Redis
) -> None:
    rid = f"report-{uuid.uuid4()}"
    async with AsyncClient(gateway.address, api_key=gateway.operator_key) as client:
        verdict = await client.report(MVNO, BYTES, 1_500, slice=EMBB, request_id=rid)
    assert verdict.request_id == rid
    assert verdict.decision is Decision.ALLOW and verdict.recorded
    assert {limit.name for limit in verdict.limits} >= {"slice-bytes-rate", "tenant-bytes-rate"}
    assert ledger_count(redis_client, MVNO, [rid]) == {rid: 1}


async def test_a_throttle_is_a_verdict_with_retry_after(gateway: Any) -> None:
    key = f"key-{uuid.uuid4().hex[:8]}"
    async with AsyncClient(gateway.address, api_key=gateway.operator_key) as client:
        first = await client.check(CPAAS, SMS, 20, key=key)  # the whole burst
        second = await client.check(CPAAS, SMS, 5, key=key)
    assert first.decision is Decision.ALLOW
    assert second.decision is Decision.THROTTLE
    assert second.reason is Reason.RATE_LIMITED
    assert not second.recorded
    # 5 units at 10 per second: about half a second, minus what refilled meanwhile.
    assert 0.3 < second.retry_after <= 0.5


async def test_the_sync_client_checks_and_reports(gateway: Any, redis_client: redis.Redis) -> None:
    rid = f"sync-{uuid.uuid4()}"

    def run() -> tuple[Verdict, Verdict]:
        with Client(gateway.address, api_key=gateway.operator_key) as client:
            admitted = client.check(CPAAS, SMS, 1, key=f"key-{uuid.uuid4().hex[:8]}")
            reported = client.report(MVNO, BYTES, 10, slice=EMBB, request_id=rid)
            return admitted, reported

    admitted, reported = await asyncio.to_thread(run)
    assert admitted.decision is Decision.ALLOW and admitted.recorded
    assert reported.request_id == rid and reported.recorded
    assert ledger_count(redis_client, MVNO, [rid]) == {rid: 1}


async def test_a_repeated_request_id_is_replayed_and_counted_once(
    gateway: Any, redis_client: redis.Redis
) -> None:
    rid = f"repeat-{uuid.uuid4()}"
    async with AsyncClient(gateway.address, api_key=gateway.operator_key) as client:
        first = await client.report(MVNO, BYTES, 7, slice=EMBB, request_id=rid)
        again = await client.report(MVNO, BYTES, 7, slice=EMBB, request_id=rid)
    assert not first.replayed and again.replayed
    assert again.decision_id == first.decision_id
    assert ledger_count(redis_client, MVNO, [rid]) == {rid: 1}


# -- invalid arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        ((CPAAS + " x", SMS, 1), {}, "tenant"),
        ((CPAAS, SMS, 0), {}, "amount"),
        ((CPAAS, SMS, 1), {"key": "key 42"}, "key"),
        ((CPAAS, SMS, 1), {"slice": "s" * 129}, "slice"),
        ((CPAAS, SMS, 1), {"request_id": "has space"}, "request_id"),
        ((CPAAS, SMS, 1), {"labels": {"k": "v" * 257}}, "labels"),
    ],
)
@pytest.mark.parametrize("validate", [True, False], ids=["client-side", "server-side"])
async def test_a_bad_argument_raises_invalid_usage_naming_the_field(
    gateway: Any,
    args: tuple[str, str, int],
    kwargs: dict[str, Any],
    field: str,
    validate: bool,
) -> None:
    async with AsyncClient(
        gateway.address, api_key=gateway.operator_key, validate=validate
    ) as client:
        with pytest.raises(InvalidUsage) as caught:
            await client.check(*args, **kwargs)
    assert caught.value.field == field
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    if not validate:  # the gateway's words, not the client's
        assert caught.value.violations[0][0] == field


async def test_an_unknown_metric_is_refused_by_the_gateway(gateway: Any) -> None:
    # Syntax is checked client-side; only the gateway knows its catalog.
    async with AsyncClient(gateway.address, api_key=gateway.operator_key) as client:
        with pytest.raises(InvalidUsage) as caught:
            await client.check(CPAAS, "api.fax.send", 1)
    assert caught.value.field == "metric"
    assert "api.fax.send" in caught.value.reason


# -- deadlines and unreachable gateways ----------------------------------------------------


async def test_the_deadline_holds_against_a_gateway_that_never_answers(
    blackhole: Blackhole,
) -> None:
    async with AsyncClient(blackhole.address, default_deadline=0.5) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            await client.check(CPAAS, SMS, 1)
        elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 0.5 + 0.3
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(caught.value, TimeoutError)


async def test_per_attempt_timeouts_retry_within_the_overall_deadline(
    blackhole: Blackhole, caplog: pytest.LogCaptureFixture
) -> None:
    retry = RetryPolicy(max_attempts=10, per_attempt_timeout=0.2, max_backoff=0.05)
    caplog.set_level(logging.INFO, logger="chargepath_client")
    async with AsyncClient(blackhole.address, retry=retry) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            await client.report(MVNO, BYTES, 1, slice=EMBB, deadline=1.0)
        elapsed = time.monotonic() - started
    assert elapsed < 1.0 + 0.3
    retries = [r for r in caplog.records if caught.value.request_id in r.getMessage()]
    assert len(retries) >= 2  # several attempts, all with the same request id


async def test_the_sync_client_honours_its_deadline(blackhole: Blackhole) -> None:
    def run() -> float:
        with Client(blackhole.address, default_deadline=0.5) as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                client.check(CPAAS, SMS, 1)
            return time.monotonic() - started

    elapsed = await asyncio.to_thread(run)
    assert 0.45 <= elapsed < 0.5 + 0.3


async def test_an_unreachable_gateway_raises_unavailable_after_retries() -> None:
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    async with AsyncClient(f"127.0.0.1:{closed_port()}", retry=retry) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await client.check(CPAAS, SMS, 1)
    assert time.monotonic() - started < 2.0 + 0.3
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


# -- retries across dropped connections ------------------------------------------------------


@pytest.mark.parametrize("mode", ["admit", "report"])
async def test_a_retry_after_a_lost_answer_is_replayed_not_recounted(
    gateway: Any, redis_client: redis.Redis, proxy: TcpProxy, mode: str
) -> None:
    rid = f"lost-answer-{uuid.uuid4()}"
    tenant = CPAAS if mode == "admit" else MVNO
    async with AsyncClient(
        proxy.address, api_key=gateway.operator_key, default_deadline=10.0
    ) as client:
        if mode == "admit":
            await client.check(CPAAS, SMS, 1, key="warm-up")  # connect before holding answers
            proxy.hold_answers = True
            call = client.check(CPAAS, SMS, 1, key=f"key-{uuid.uuid4().hex[:8]}", request_id=rid)
        else:
            await client.report(MVNO, BYTES, 1, slice=EMBB)
            proxy.hold_answers = True
            call = client.report(MVNO, BYTES, 1_000, slice=EMBB, request_id=rid)
        pending = asyncio.create_task(call)
        await wait_recorded(redis_client, tenant, [rid])  # decided, answer lost in the proxy
        assert not pending.done()
        proxy.cut()
        verdict = await pending
    assert verdict.request_id == rid
    assert verdict.replayed and verdict.recorded
    assert verdict.decision is Decision.ALLOW
    assert ledger_count(redis_client, tenant, [rid]) == {rid: 1}
    [entry] = [e for e in ledger_entries(redis_client, tenant) if e.request_id == rid]
    assert entry.decision_id == verdict.decision_id  # the first decision, not a new one


async def test_concurrent_calls_through_cut_connections_count_each_usage_once(
    gateway: Any, redis_client: redis.Redis, proxy: TcpProxy
) -> None:
    n = 60
    rids = new_rids(n, "flaky")
    retry = RetryPolicy(max_attempts=20, max_backoff=0.2)
    async with AsyncClient(
        proxy.address, api_key=gateway.operator_key, default_deadline=15.0, retry=retry
    ) as client:
        await client.report(MVNO, BYTES, 1, slice=EMBB)

        # Round 1: every answer is lost after the gateway recorded the usage.
        proxy.hold_answers = True
        first = [
            asyncio.create_task(client.report(MVNO, BYTES, 100, slice=EMBB, request_id=rid))
            for rid in rids[: n // 2]
        ]
        await wait_recorded(redis_client, MVNO, rids[: n // 2])
        proxy.cut()
        replayed = await asyncio.gather(*first)

        # Round 2: connections cut at random moments while calls are in flight.
        async def cutter() -> None:
            for _ in range(5):
                await asyncio.sleep(0.01)
                proxy.cut()

        second = [
            asyncio.create_task(client.report(MVNO, BYTES, 100, slice=EMBB, request_id=rid))
            for rid in rids[n // 2 :]
        ]
        await asyncio.gather(cutter(), *second)
        chaotic = [task.result() for task in second]

    assert [v for v in replayed if not (v.replayed and v.recorded)] == []
    assert [v for v in chaotic if not v.recorded] == []
    assert [v.request_id for v in replayed + chaotic] == rids
    assert ledger_count(redis_client, MVNO, rids) == {rid: 1 for rid in rids}
    assert proxy.connections >= 3


# -- the stream helper -----------------------------------------------------------------------


async def test_stream_batches_and_answers_every_usage(
    gateway: Any, redis_client: redis.Redis
) -> None:
    rids = new_rids(300, "stream")
    async with AsyncClient(gateway.address, api_key=gateway.operator_key) as client:
        async with client.stream(batch_size=64) as stream:
            verdicts = await asyncio.gather(
                *(
                    stream.submit(tenant=MVNO, slice=EMBB, metric=BYTES, amount=10, request_id=rid)
                    for rid in rids[:200]
                )
            )
            # Left unanswered on purpose: closing waits for them.
            futures = [
                stream.submit_nowait(
                    tenant=MVNO, slice=EMBB, metric=BYTES, amount=10, request_id=rid
                )
                for rid in rids[200:]
            ]
        assert stream.pending == 0
    verdicts += [f.result() for f in futures]
    assert [v.request_id for v in verdicts] == rids
    assert [v for v in verdicts if not (v.allowed and v.recorded and not v.replayed)] == []
    assert ledger_count(redis_client, MVNO, rids) == {rid: 1 for rid in rids}


async def test_stream_basic_view_gives_plain_allows_without_limits(gateway: Any) -> None:
    async with (
        AsyncClient(gateway.address, api_key=gateway.operator_key) as client,
        client.stream(view="basic") as basic,
        client.stream() as full,
    ):
        plain = await basic.submit(tenant=MVNO, slice=EMBB, metric=BYTES, amount=10)
        detailed = await full.submit(tenant=MVNO, slice=EMBB, metric=BYTES, amount=10)
    assert plain.allowed and plain.recorded and plain.limits == ()
    assert detailed.allowed and len(detailed.limits) > 0
    with pytest.raises(ValueError):
        client.stream(view="compact")  # type: ignore[arg-type]


async def test_stream_invalid_usage_fails_only_its_own_future(gateway: Any) -> None:
    async with (
        AsyncClient(gateway.address, api_key=gateway.operator_key) as client,
        client.stream() as stream,
    ):
        good = stream.submit_nowait(tenant=MVNO, slice=EMBB, metric=BYTES, amount=1)
        bad = stream.submit_nowait(tenant=MVNO, slice=EMBB, metric="slice.unknown", amount=1)
        also_good = stream.submit_nowait(tenant=MVNO, slice=EMBB, metric=BYTES, amount=1)
        with pytest.raises(InvalidUsage) as caught:
            await bad
        assert caught.value.field == "metric"
        assert (await good).recorded and (await also_good).recorded
        with pytest.raises(InvalidUsage):  # client-side, raised at once
            stream.submit_nowait(tenant=MVNO, metric=BYTES, amount=0)


async def test_stream_reconnects_and_resends_without_double_counting(
    gateway: Any, redis_client: redis.Redis, proxy: TcpProxy
) -> None:
    retry = RetryPolicy(max_attempts=10, max_backoff=0.2)
    held_rids = new_rids(50, "stream-held")
    chaos_rids = new_rids(300, "stream-chaos")
    async with (
        AsyncClient(proxy.address, api_key=gateway.operator_key, retry=retry) as client,
        client.stream(batch_size=16, stall_timeout=5.0) as stream,
    ):
        warm = await stream.submit(tenant=MVNO, slice=EMBB, metric=BYTES, amount=1)
        assert warm.recorded

        # The gateway records a batch but its answers are lost, then the connection dies.
        proxy.hold_answers = True
        held = [
            stream.submit_nowait(tenant=MVNO, slice=EMBB, metric=BYTES, amount=10, request_id=rid)
            for rid in held_rids
        ]
        await wait_recorded(redis_client, MVNO, held_rids)
        assert not any(f.done() for f in held)
        proxy.cut()
        held_verdicts = await asyncio.gather(*held)

        # Connections cut at random moments while usages stream.
        async def cutter() -> None:
            for _ in range(6):
                await asyncio.sleep(0.015)
                proxy.cut()

        async def producer() -> list[Verdict]:
            futures = []
            for rid in chaos_rids:
                futures.append(
                    stream.submit_nowait(
                        tenant=MVNO, slice=EMBB, metric=BYTES, amount=10, request_id=rid
                    )
                )
                if len(futures) % 10 == 0:
                    await asyncio.sleep(0.002)
            return await asyncio.gather(*futures)

        _, chaos_verdicts = await asyncio.gather(cutter(), producer())
        reconnects = stream.reconnects

    assert reconnects >= 2
    assert [v.request_id for v in held_verdicts] == held_rids
    assert [v for v in held_verdicts if not (v.replayed and v.recorded)] == []
    assert [v.request_id for v in chaos_verdicts] == chaos_rids
    assert [v for v in chaos_verdicts if not v.recorded] == []
    rids = held_rids + chaos_rids
    assert ledger_count(redis_client, MVNO, rids) == {rid: 1 for rid in rids}


async def test_stream_fails_pending_usages_once_the_retry_budget_is_spent(
    blackhole: Blackhole,
) -> None:
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
    async with AsyncClient(blackhole.address, retry=retry) as client:
        stream = client.stream(stall_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            async with stream:
                with pytest.raises(DeadlineExceeded) as caught:
                    await stream.submit(tenant=MVNO, slice=EMBB, metric=BYTES, amount=1)
                assert caught.value.request_id is not None
        elapsed = time.monotonic() - started
    # Three connections, each given up after 0.3 s without an answer (checked every 75 ms).
    assert 0.9 <= elapsed < 3 * (0.3 + 0.075) + 0.5
    assert stream.pending == 0


async def test_a_bounded_close_aborts_what_is_left(blackhole: Blackhole) -> None:
    async with AsyncClient(blackhole.address) as client:
        stream = client.stream(stall_timeout=30.0)
        async with stream:
            future = stream.submit_nowait(tenant=MVNO, slice=EMBB, metric=BYTES, amount=1)
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await stream.aclose()
            assert time.monotonic() - started < 0.3 + 0.2
        with pytest.raises(StreamClosed) as caught:
            await future
        assert caught.value.request_id is not None
        with pytest.raises(StreamClosed):
            stream.submit_nowait(tenant=MVNO, slice=EMBB, metric=BYTES, amount=1)
