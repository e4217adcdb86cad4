"""The status page's server in this process, on a real Redis: its bounds (head and body sizes,
timeouts, connection and stream limits), its figures against the store's, and what it shows
when the store is away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from chargepath.core.auth import Role
from chargepath.core.model import Mode, Subject, Usage
from chargepath.engine import Engine
from chargepath.status.board import BoardLimits, BoardSources, StatusBoard
from chargepath.status.http import HttpLimits, StatusGate, StatusServer
from chargepath.status.session import SessionSigner
from chargepath.store.admin import AdminStore
from chargepath.store.embedded import free_port
from chargepath.store.keys import RedisKeyStore
from chargepath.store.redis_store import RedisStore
from chargepath.transport.auth import Authenticator
from tests.conftest import make_engine

pytestmark = pytest.mark.integration

POLICY = """
metrics:
  - {name: api.sms.send, unit: message}
plans:
  - name: p
    limits:
      - name: burst
        metric: api.sms.send
        scope: tenant
        rate: {capacity: 5, refill: 1, per: hour}
      - {name: monthly, metric: api.sms.send, scope: tenant, quota: {amount: 1000, per: month}}
tenants:
  - {name: t1, plan: p}
  - {name: t2, plan: p}
"""

LIMITS = HttpLimits(
    max_head_bytes=1024,
    max_body_bytes=256,
    head_timeout_s=0.5,
    max_connections=4,
    max_streams=2,
)


@dataclass
class Served:
    server: StatusServer
    engine: Engine
    operator: str

    async def exchange(self, raw: bytes, *, read: int = 65536) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        writer.write(raw)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(read), 5)
        finally:
            writer.close()

    def get(self, path: str, key: str | None = None) -> bytes:
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        return f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


async def serve(engine: Engine, store: RedisStore, keys: RedisKeyStore) -> StatusServer:
    board = StatusBoard(
        engine,
        store,
        AdminStore(store),
        BoardSources(health=lambda: "SERVING", totals=engine.telemetry.decision_totals),
        BoardLimits(refresh_s=0.2),
    )
    gate = StatusGate(Authenticator(keys, subscribe=False), keys, SessionSigner())
    server = StatusServer(board, gate, host="127.0.0.1", port=0, limits=LIMITS)
    await server.start()
    return server


@pytest_asyncio.fixture
async def served(store: RedisStore) -> AsyncIterator[Served]:
    engine = await make_engine(store, POLICY)
    keys = RedisKeyStore(store.client)
    _, operator = await keys.create(None, Role.OPERATOR)
    server = await serve(engine, store, keys)
    yield Served(server, engine, operator.plaintext)
    await server.close()


async def test_the_figures_are_the_stores_and_the_rates_the_engines(served: Served) -> None:
    engine = served.engine
    usages = [
        Usage(f"r{i}", Subject("t1"), "api.sms.send", 1, Mode.ADMIT) for i in range(8)
    ]  # a bucket of 5: 5 ALLOW, 3 THROTTLE
    verdicts = await engine.decide_batch(usages)
    assert sum(v.decision.name == "THROTTLE" for v in verdicts) == 3
    first = json.loads(body_of(await served.exchange(served.get("/status.json", served.operator))))
    await engine.decide_batch([Usage("r9", Subject("t1"), "api.sms.send", 1, Mode.ADMIT)])
    await asyncio.sleep(0.25)
    second = json.loads(body_of(await served.exchange(served.get("/status.json", served.operator))))
    assert second["seq"] > first["seq"]
    t1 = next(t for t in second["tenants"] if t["tenant"] == "t1")
    state = AdminStore(engine.store)  # type: ignore[arg-type]
    limits = tuple(lim for _, lim in engine.policy.entitlements["t1"].limits)
    _, readings, _ = await state.read_limits(Subject("t1"), limits)
    shown = {lim["name"]: (lim["used"], lim["remaining"], lim["capacity"]) for lim in t1["limits"]}
    assert shown == {r.limit.name: (r.used, r.remaining, r.capacity) for r in readings}
    assert shown["monthly"][0] == 5
    # the last refresh window held one THROTTLE (the bucket was empty) and nothing else
    assert t1["rates"]["throttled_per_s"] > 0
    assert t1["rates"]["throttle_share"] == 1.0


async def test_a_store_that_does_not_answer_shows_no_figures(
    served: Served, store: RedisStore
) -> None:
    dead = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.2)
    keys = RedisKeyStore(store.client)
    server = await serve(served.engine, dead, keys)
    try:
        client = Served(server, served.engine, served.operator)
        snapshot = json.loads(
            body_of(await client.exchange(client.get("/status.json", client.operator)))
        )
        assert snapshot["store"]["reachable"] is False
        assert snapshot["store"]["ping_ms"] is None
        assert [t["read"] for t in snapshot["tenants"]] == [False, False]
        assert all(t["limits"] == [] for t in snapshot["tenants"])
    finally:
        await server.close()
        await dead.close()


async def test_a_head_too_large_or_too_slow_is_refused(served: Served) -> None:
    huge = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 2000 + b"\r\n\r\n"
    assert status_of(await served.exchange(huge)) == 431
    # half a head, then nothing: 408 after head_timeout_s, not a connection held forever
    reader, writer = await asyncio.open_connection("127.0.0.1", served.server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    assert status_of(answer) == 408
    assert status_of(await served.exchange(b"DELETE / HTTP/1.1\r\n\r\n")) == 405
    assert status_of(await served.exchange(b"GET /nope HTTP/1.1\r\n\r\n")) == 404


async def test_the_login_form_is_bounded(served: Served) -> None:
    form = "POST /login HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    assert status_of(await served.exchange(f"{form}\r\n".encode())) == 411
    big = f"{form}Content-Length: 100000\r\n\r\n".encode()
    assert status_of(await served.exchange(big)) == 413
    # a body promised and never sent: the connection ends after head_timeout_s
    reader, writer = await asyncio.open_connection("127.0.0.1", served.server.port)
    writer.write(f"{form}Content-Length: 50\r\n\r\nkey=".encode())
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    not_form = b"POST /login HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nkey"
    assert status_of(await served.exchange(not_form)) == 415


async def test_connections_and_streams_are_limited(served: Served) -> None:
    port = served.server.port
    streams = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(served.get("/events", served.operator))
        await writer.drain()
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(
            b"HTTP/1.1 200"
        )
        await asyncio.wait_for(reader.readuntil(b"event: status"), 5)
        streams.append((reader, writer))
    # a third stream is refused: max_streams is 2
    assert status_of(await served.exchange(served.get("/events", served.operator))) == 503
    # connections that send nothing count too: with 2 streams and 2 idle ones, the 5th is 503
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert status_of(await served.exchange(b"GET / HTTP/1.1\r\n\r\n")) == 503
    for _, writer in streams + idle:
        writer.close()
    await asyncio.sleep(0.7)  # the idle ones time out, the streams notice their closed sockets
    assert status_of(await served.exchange(served.get("/status.json", served.operator))) == 200
