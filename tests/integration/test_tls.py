"""TLS and mTLS on a real grpc.aio server: the credentials of chargepath.transport.tls, with
certificates made by trustme, against real grpc clients.

The server serves the load generator's echo MeteringService (a Check and a StreamUsage that
answer at once) and a tiny ``Whoami`` method that answers with the identities and the caller the
identity map gives for the call's client certificate. No gateway, no Redis: this is the trust
boundary alone.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from chargepath.transport.tls import (
    IdentityMap,
    ServerCertificates,
    TlsConfigError,
    TlsFiles,
    load_material,
    peer_identities,
)
from chargepath_protos.v1 import metering_pb2 as pb
from loadtest.echo import EchoService

pytestmark = pytest.mark.integration

CALL_TIMEOUT_S = 5.0
WHOAMI = "/chargepath.test.Whoami/Get"
IDENTITIES = """\
identities:
  meter-1.clients.test: {role: meter, tenant: cpaas-demo}
  ops-1: {role: operator}
"""
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)
EXPIRED = {"not_before": NOW - 2 * DAY, "not_after": NOW - DAY}


@dataclass
class Pki:
    """Two unrelated CAs and files of a server certificate issued by the first."""

    ca: trustme.CA
    other_ca: trustme.CA
    dir: Path
    files: TlsFiles

    def client(self, ca: trustme.CA, *identities: str, **kwargs: Any) -> tuple[bytes, bytes]:
        """(private key, certificate chain) of a client certificate issued by ``ca``."""
        leaf = ca.issue_cert(*identities, **kwargs)
        return leaf.private_key_pem.bytes(), b"".join(b.bytes() for b in leaf.cert_chain_pems)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by rename, as certificate tools and Kubernetes secret volumes do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def install_server_cert(
    dir: Path, leaf: trustme.LeafCert, *, cert: bool = True, key: bool = True
) -> None:
    if key:
        write_atomically(dir / "server.key", leaf.private_key_pem.bytes())
    if cert:
        write_atomically(dir / "server.pem", b"".join(b.bytes() for b in leaf.cert_chain_pems))


def make_pki(tmp_path: Path, *, mutual: bool) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    install_server_cert(tmp_path, ca.issue_cert("127.0.0.1", "localhost"))
    client_ca = None
    if mutual:
        client_ca = tmp_path / "client-ca.pem"
        client_ca.write_bytes(ca.cert_pem.bytes())
    files = TlsFiles(tmp_path / "server.pem", tmp_path / "server.key", client_ca)
    return Pki(ca, other, tmp_path, files)


@dataclass
class TlsServer:
    address: str
    certificates: ServerCertificates


@asynccontextmanager
async def tls_server(files: TlsFiles, identities: IdentityMap) -> AsyncIterator[TlsServer]:
    async def whoami(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        auth = context.auth_context()
        peer = identities.peer(auth)
        return json.dumps(
            {
                "identities": list(peer_identities(auth)),
                "peer": None if peer is None else [peer.identity, peer.role, peer.tenant],
            }
        ).encode()

    certificates = ServerCertificates(files)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            EchoService().handler(),
            grpc.method_handlers_generic_handler(
                "chargepath.test.Whoami", {"Get": grpc.unary_unary_rpc_method_handler(whoami)}
            ),
        ]
    )
    port = server.add_secure_port("127.0.0.1:0", certificates.credentials())
    await server.start()
    try:
        yield TlsServer(f"127.0.0.1:{port}", certificates)
    finally:
        await server.stop(None)


def channel(
    address: str, ca: trustme.CA | None, client: tuple[bytes, bytes] | None = None
) -> grpc.aio.Channel:
    """A channel with its own connection (no subchannel shared with other channels), over TLS
    trusting ``ca``, or plaintext if ``ca`` is None."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    if ca is None:
        return grpc.aio.insecure_channel(address, options=options)
    key, chain = client if client is not None else (None, None)
    creds = grpc.ssl_channel_credentials(ca.cert_pem.bytes(), key, chain)
    return grpc.aio.secure_channel(address, creds, options=options)


async def check(ch: grpc.aio.Channel, request_id: str = "tls-1") -> pb.Verdict:
    call = ch.unary_unary(
        "/chargepath.v1.MeteringService/Check",
        request_serializer=pb.CheckRequest.SerializeToString,
        response_deserializer=pb.CheckResponse.FromString,
    )
    request = pb.CheckRequest(usage=pb.Usage(request_id=request_id, mode=pb.MODE_ADMIT))
    response: pb.CheckResponse = await call(request, timeout=CALL_TIMEOUT_S)
    return response.verdict


async def whoami(ch: grpc.aio.Channel) -> dict[str, Any]:
    answer: bytes = await ch.unary_unary(WHOAMI)(b"", timeout=CALL_TIMEOUT_S)
    result: dict[str, Any] = json.loads(answer)
    return result


async def refused(ch: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    """The error of a Check on ``ch``, which must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await check(ch)
    await ch.close()
    return err.value


@pytest.fixture
def tls_pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path, mutual=False)


@pytest.fixture
def mtls_pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path, mutual=True)


# --- TLS -----------------------------------------------------------------------------------------


async def test_a_client_trusting_the_ca_is_served(tls_pki: Pki) -> None:
    async with (
        tls_server(tls_pki.files, IdentityMap({})) as srv,
        channel(srv.address, tls_pki.ca) as ch,
    ):
        verdict = await check(ch, "tls-ok")
        assert verdict.request_id == "tls-ok"
        assert verdict.decision == pb.DECISION_ALLOW
        # TLS without a client CA asks for no client certificate: the caller has no identity.
        assert await whoami(ch) == {"identities": [], "peer": None}


async def test_a_client_trusting_another_ca_is_refused(tls_pki: Pki) -> None:
    async with tls_server(tls_pki.files, IdentityMap({})) as srv:
        err = await refused(channel(srv.address, tls_pki.other_ca))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "handshake" in (err.details() or "").lower(), err.details()


async def test_a_plaintext_client_on_the_tls_port_is_refused(tls_pki: Pki) -> None:
    async with tls_server(tls_pki.files, IdentityMap({})) as srv:
        err = await refused(channel(srv.address, None))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_an_expired_server_certificate_is_refused_by_the_client(tls_pki: Pki) -> None:
    install_server_cert(tls_pki.dir, tls_pki.ca.issue_cert("127.0.0.1", **EXPIRED))
    async with tls_server(tls_pki.files, IdentityMap({})) as srv:
        err = await refused(channel(srv.address, tls_pki.ca))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "handshake" in (err.details() or "").lower(), err.details()


# --- mTLS ----------------------------------------------------------------------------------------


async def test_a_valid_client_certificate_maps_to_its_tenant_and_role(mtls_pki: Pki) -> None:
    identities = IdentityMap.from_text(IDENTITIES)
    meter = mtls_pki.client(mtls_pki.ca, "meter-1.clients.test", common_name="meter-1")
    ops = mtls_pki.client(mtls_pki.ca, "ops.clients.test", common_name="ops-1")
    stranger = mtls_pki.client(mtls_pki.ca, "stranger.clients.test")
    async with tls_server(mtls_pki.files, identities) as srv:
        async with channel(srv.address, mtls_pki.ca, meter) as ch:
            assert (await check(ch, "mtls-ok")).request_id == "mtls-ok"
            assert await whoami(ch) == {
                "identities": ["meter-1.clients.test", "meter-1"],
                "peer": ["meter-1.clients.test", "meter", "cpaas-demo"],
            }
        async with channel(srv.address, mtls_pki.ca, ops) as ch:
            assert (await whoami(ch))["peer"] == ["ops-1", "operator", None]
        # verified, but not in the map: nobody (the caller of IdentityMap refuses the call)
        async with channel(srv.address, mtls_pki.ca, stranger) as ch:
            assert (await whoami(ch))["peer"] is None


async def test_a_client_without_a_certificate_is_refused(mtls_pki: Pki) -> None:
    async with tls_server(mtls_pki.files, IdentityMap({})) as srv:
        err = await refused(channel(srv.address, mtls_pki.ca))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_certificate_from_another_ca_is_refused(mtls_pki: Pki) -> None:
    forged = mtls_pki.client(mtls_pki.other_ca, "meter-1.clients.test", common_name="meter-1")
    async with tls_server(mtls_pki.files, IdentityMap.from_text(IDENTITIES)) as srv:
        err = await refused(channel(srv.address, mtls_pki.ca, forged))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_an_expired_client_certificate_is_refused(mtls_pki: Pki) -> None:
    expired = mtls_pki.client(mtls_pki.ca, "meter-1.clients.test", **EXPIRED)
    async with tls_server(mtls_pki.files, IdentityMap.from_text(IDENTITIES)) as srv:
        err = await refused(channel(srv.address, mtls_pki.ca, expired))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


# --- reload --------------------------------------------------------------------------------------


async def test_new_certificate_files_serve_new_connections_and_open_streams_go_on(
    tls_pki: Pki,
) -> None:
    async with tls_server(tls_pki.files, IdentityMap({})) as srv:
        old = channel(srv.address, tls_pki.ca)
        stream = old.stream_stream(
            "/chargepath.v1.MeteringService/StreamUsage",
            request_serializer=pb.StreamUsageRequest.SerializeToString,
            response_deserializer=pb.StreamUsageResponse.FromString,
        )(timeout=60)

        async def exchange(request_id: str) -> str:
            usage = pb.Usage(request_id=request_id, mode=pb.MODE_REPORT)
            await stream.write(pb.StreamUsageRequest(usages=[usage]))
            response = await stream.read()
            assert isinstance(response, pb.StreamUsageResponse)
            return str(response.verdicts[0].request_id)

        assert await exchange("before") == "before"

        # A new certificate from another CA: first the certificate alone. Beside the old key
        # it cannot serve, so new connections still get the old certificate.
        renewed = tls_pki.other_ca.issue_cert("127.0.0.1", "localhost")
        install_server_cert(tls_pki.dir, renewed, key=False)
        async with channel(srv.address, tls_pki.ca) as ch:
            assert (await check(ch, "half")).request_id == "half"
        assert srv.certificates.reloads == 0
        assert "do not match" in (srv.certificates.last_error or "")

        # Then its key: the pair is whole, and the next handshake installs it.
        install_server_cert(tls_pki.dir, renewed, cert=False)
        async with channel(srv.address, tls_pki.other_ca) as ch:
            assert (await check(ch, "renewed")).request_id == "renewed"
        assert srv.certificates.reloads == 1
        assert srv.certificates.last_error is None
        err = await refused(channel(srv.address, tls_pki.ca))
        assert err.code() == grpc.StatusCode.UNAVAILABLE

        # The stream opened under the old certificate never noticed.
        assert await exchange("after") == "after"
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK
        await old.close()


async def test_files_that_cannot_serve_keep_the_current_certificate(tls_pki: Pki) -> None:
    async with tls_server(tls_pki.files, IdentityMap({})) as srv:
        write_atomically(tls_pki.files.private_key, b"not a key\n")
        async with channel(srv.address, tls_pki.ca) as ch:
            assert (await check(ch, "kept")).request_id == "kept"
        assert srv.certificates.reloads == 0
        assert "no PEM private key" in (srv.certificates.last_error or "")


# --- start-up errors -----------------------------------------------------------------------------


def test_bad_files_are_one_line_errors(tls_pki: Pki, tmp_path: Path) -> None:
    files = tls_pki.files
    other = tls_pki.ca.issue_cert("localhost")
    (tmp_path / "other.key").write_bytes(other.private_key_pem.bytes())
    (tmp_path / "junk").write_text("hello\n")
    (tmp_path / "encrypted.key").write_text(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    (tmp_path / "broken.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    )
    cases = [
        (
            TlsFiles(tmp_path / "missing.pem", files.private_key),
            f"TLS certificate chain {tmp_path}/missing.pem: cannot read: No such file or directory",
        ),
        (
            TlsFiles(files.cert_chain, tmp_path),
            f"TLS private key {tmp_path}: cannot read: Is a directory",
        ),
        (
            TlsFiles(tmp_path / "junk", files.private_key),
            f"TLS certificate chain {tmp_path}/junk: no PEM certificate in it",
        ),
        (
            TlsFiles(tmp_path / "broken.pem", files.private_key),
            f"TLS certificate chain {tmp_path}/broken.pem: not a valid PEM certificate",
        ),
        (
            TlsFiles(files.cert_chain, tmp_path / "junk"),
            f"TLS private key {tmp_path}/junk: no PEM private key in it",
        ),
        (
            TlsFiles(files.cert_chain, tmp_path / "encrypted.key"),
            f"TLS private key {tmp_path}/encrypted.key: is encrypted",
        ),
        (
            TlsFiles(files.cert_chain, tmp_path / "other.key"),
            f"TLS certificate {files.cert_chain} and private key {tmp_path}/other.key do not match",
        ),
        (
            TlsFiles(files.cert_chain, files.private_key, tmp_path / "junk"),
            f"TLS client CA {tmp_path}/junk: no PEM certificate in it",
        ),
        (
            TlsFiles(files.cert_chain, files.private_key, tmp_path / "none.pem"),
            f"TLS client CA {tmp_path}/none.pem: cannot read: No such file or directory",
        ),
    ]
    for bad, message in cases:
        with pytest.raises(TlsConfigError) as err:
            ServerCertificates(bad)
        assert str(err.value).startswith(message), (bad, str(err.value))
        assert "\n" not in str(err.value)
    assert load_material(files).cert_chain == files.cert_chain.read_bytes()
