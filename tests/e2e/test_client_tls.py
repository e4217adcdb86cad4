"""The client's TLS, mutual TLS and api key options against a real grpc.aio server.

The server is the load test's echo service (loadtest/echo.py) behind
`grpc.ssl_server_credentials`, with certificates from trustme; each verdict's `message`
echoes what the server saw of the caller (its authorization metadata, the common name of its
certificate), so the test can tell what arrived."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import trustme

from chargepath_client import AsyncClient, Client, RetryPolicy, Unavailable, Verdict
from chargepath_protos.v1 import metering_pb2 as pb
from loadtest.echo import EchoService

pytestmark = pytest.mark.e2e

SERVER_NAME = "gateway.chargepath.test"
API_KEY = "ck_test_5up3r-s3cr3t"
# A refused handshake is final for these tests: fail fast instead of retrying.
ONCE = RetryPolicy.disabled()


def caller(context: Any) -> str:
    """What the server knows of the caller, as JSON."""
    metadata = dict(context.invocation_metadata())
    names = context.auth_context().get("x509_common_name", [b""])
    return json.dumps({"authorization": metadata.get("authorization", ""), "cn": names[0].decode()})


class CallerEcho(EchoService):
    """The echo service, with the caller in every verdict's `message`."""

    async def check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        response = await super().check(request, context)
        response.verdict.message = caller(context)
        return response

    async def stream_usage(
        self, requests: AsyncIterator[pb.StreamUsageRequest], context: Any
    ) -> AsyncIterator[pb.StreamUsageResponse]:
        async for response in super().stream_usage(requests, context):
            for verdict in response.verdicts:
                verdict.message = caller(context)
            yield response


@dataclass
class TlsServer:
    address: str
    ca: trustme.CA
    ca_file: Path


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def serve(ca: trustme.CA, tmp_path: Path, *, mutual: bool) -> AsyncIterator[TlsServer]:
    # The certificate names only SERVER_NAME, not 127.0.0.1: clients must override the name.
    cert = ca.issue_cert(SERVER_NAME)
    credentials = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), b"".join(p.bytes() for p in cert.cert_chain_pems))],
        root_certificates=ca.cert_pem.bytes() if mutual else None,
        require_client_auth=mutual,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([CallerEcho().handler()])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        yield TlsServer(f"127.0.0.1:{port}", ca, ca_file)
    finally:
        await server.stop(None)


@pytest.fixture
async def tls_server(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[TlsServer]:
    async for server in serve(ca, tmp_path, mutual=False):
        yield server


@pytest.fixture
async def mtls_server(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[TlsServer]:
    async for server in serve(ca, tmp_path, mutual=True):
        yield server


@pytest.fixture
def client_cert(ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A client certificate of the same CA (common name "billing-exporter"), as files."""
    cert = ca.issue_cert("billing-exporter.chargepath.test", common_name="billing-exporter")
    chain, key = tmp_path / "client.pem", tmp_path / "client.key"
    chain.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    yield chain, key


def seen(verdict: Verdict) -> dict[str, str]:
    result: dict[str, str] = json.loads(verdict.message)
    return result


async def test_check_and_stream_over_tls_carry_the_api_key(tls_server: TlsServer) -> None:
    async with AsyncClient(
        tls_server.address,
        tls_ca=tls_server.ca_file,
        tls_server_name=SERVER_NAME,
        api_key=API_KEY,
        retry=ONCE,
    ) as client:
        checked = await client.check("cpaas-demo", "api.sms.send", 1, request_id="tls-1")
        async with client.stream() as stream:
            streamed = await stream.submit(tenant="mvno-demo", metric="slice.bytes", amount=10)
    assert checked.request_id == "tls-1" and checked.allowed
    assert seen(checked) == {"authorization": f"Bearer {API_KEY}", "cn": ""}
    assert streamed.allowed
    assert seen(streamed)["authorization"] == f"Bearer {API_KEY}"


async def test_the_sync_client_speaks_tls_with_the_ca_as_bytes(tls_server: TlsServer) -> None:
    def run() -> Verdict:
        with Client(
            tls_server.address,
            tls_ca=tls_server.ca.cert_pem.bytes(),
            tls_server_name=SERVER_NAME,
            api_key=API_KEY,
            retry=ONCE,
        ) as client:
            return client.report("mvno-demo", "slice.bytes", 10)

    verdict = await asyncio.to_thread(run)
    assert verdict.allowed
    assert seen(verdict)["authorization"] == f"Bearer {API_KEY}"


async def test_a_server_signed_by_another_ca_is_refused(tls_server: TlsServer) -> None:
    stranger = trustme.CA()
    async with AsyncClient(
        tls_server.address,
        tls_ca=stranger.cert_pem.bytes(),
        tls_server_name=SERVER_NAME,
        api_key=API_KEY,
        retry=ONCE,
        default_deadline=5.0,
    ) as client:
        with pytest.raises(Unavailable) as caught:
            await client.check("cpaas-demo", "api.sms.send", 1)
    assert API_KEY not in str(caught.value)


async def test_the_certificate_name_is_checked(tls_server: TlsServer) -> None:
    async with AsyncClient(
        tls_server.address, tls_ca=tls_server.ca_file, retry=ONCE, default_deadline=5.0
    ) as client:
        # No override: the client checks "127.0.0.1", which the certificate does not name.
        with pytest.raises(Unavailable):
            await client.check("cpaas-demo", "api.sms.send", 1)


async def test_plaintext_is_the_default_and_a_tls_server_refuses_it(
    tls_server: TlsServer,
) -> None:
    async with AsyncClient(tls_server.address, retry=ONCE, default_deadline=5.0) as client:
        with pytest.raises(Unavailable):
            await client.check("cpaas-demo", "api.sms.send", 1)


async def test_mutual_tls_presents_the_client_certificate(
    mtls_server: TlsServer, client_cert: tuple[Path, Path]
) -> None:
    chain, key = client_cert
    async with AsyncClient(
        mtls_server.address,
        tls_ca=mtls_server.ca_file,
        tls_cert=chain,
        tls_key=str(key),
        tls_server_name=SERVER_NAME,
        retry=ONCE,
    ) as client:
        verdict = await client.check("cpaas-demo", "api.sms.send", 1)
    assert seen(verdict) == {"authorization": "", "cn": "billing-exporter"}


async def test_mutual_tls_without_a_client_certificate_is_refused(mtls_server: TlsServer) -> None:
    async with AsyncClient(
        mtls_server.address,
        tls_ca=mtls_server.ca_file,
        tls_server_name=SERVER_NAME,
        retry=ONCE,
        default_deadline=5.0,
    ) as client:
        with pytest.raises(Unavailable):
            await client.check("cpaas-demo", "api.sms.send", 1)
